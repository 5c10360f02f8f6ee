"""Speech synthesis with word times through libespeak-ng (ctypes), for the bundled demo corpus.

    audio, sr, words = synthesize("The cat sat on the mat.", voice="en-us", rate=150)

``words`` are ``Word(text, start, end)`` in seconds, one per whitespace token of the text (its
punctuation attached, so the words joined by spaces give the text back): a word starts at its WORD event's sample and
ends at the first pause phoneme after it (before the next word starts), else where the next word
starts (the last word: at the end of the audio). Needs the Debian package ``espeak-ng``
(``libespeak-ng.so.1``); only the corpus script uses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re

import numpy as np

from mtbi_fast.data import Word

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 1
_EV_WORD, _EV_END, _EV_PHONEME = 1, 5, 7
_RATE, _PITCH = 1, 3


class _Event(ctypes.Structure):
    class _Id(ctypes.Union):
        _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _Id)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))
_lib = None
_rate = 0
_state: dict = {}


def _load():
    global _lib, _rate, _cb
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise RuntimeError("libespeak-ng not found: apt-get install espeak-ng") from None
    lib.espeak_Initialize.restype = ctypes.c_int
    _rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INIT_PHONEME_EVENTS)
    if _rate <= 0:
        raise RuntimeError("espeak_Initialize failed")
    _cb = _CALLBACK(_on_audio)
    lib.espeak_SetSynthCallback(_cb)
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    _lib = lib
    return lib


def _on_audio(wav, n, events):
    if n > 0:
        _state["pcm"].append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    i = 0
    while events[i].type != 0:  # LIST_TERMINATED
        e = events[i]
        if e.type == _EV_WORD:
            _state["events"].append(("word", e.sample, e.text_position, e.length))
        elif e.type == _EV_PHONEME:
            name = bytes(e.id.string).split(b"\0")[0].decode("utf-8", "replace")
            _state["events"].append(("phoneme", e.sample, name, 0))
        i += 1
    return 0


def synthesize(text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50):
    """(float32 waveform, sample rate, words with times) for one sentence."""
    lib = _load()
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"espeak-ng has no voice {voice!r}")
    lib.espeak_SetParameter(_RATE, rate, 0)
    lib.espeak_SetParameter(_PITCH, pitch, 0)
    _state.update(pcm=[], events=[])
    data = text.encode("utf-8") + b"\0"
    lib.espeak_Synth(data, len(data), 0, 0, 0, 0, None, None)
    lib.espeak_Synchronize()
    pcm = np.concatenate(_state["pcm"]) if _state["pcm"] else np.zeros(0, np.int16)
    audio = pcm.astype(np.float32) / 32768.0
    return audio, _rate, _word_times(text, _state["events"], len(audio), _rate)


def _word_times(text: str, events, n_samples: int, sr: int) -> list[Word]:
    """Whitespace words of ``text`` with times from the WORD and pause-phoneme events."""
    raw = text.encode("utf-8")
    tokens = [(m.start(), m.end()) for m in re.finditer(rb"\S+", raw)]
    words_ev = [e for e in events if e[0] == "word"]
    starts = [e[1] for e in words_ev] + [n_samples]
    by_token: dict[int, list[int]] = {}
    for k, (_, _, pos, _) in enumerate(words_ev):
        for t, (a, b) in enumerate(tokens):
            if a <= pos - 1 < b:
                by_token.setdefault(t, []).append(k)
                break
    spans = {}
    for t, ks in sorted(by_token.items()):
        begin, last = starts[ks[0]], ks[-1]
        nxt = starts[last + 1]
        end = nxt
        for kind, sample, name, _ in events:
            if kind == "phoneme" and starts[last] < sample <= nxt and name.startswith("_"):
                end = sample
                break
        spans[t] = (begin, max(end, begin + 1))
    # espeak-ng sometimes speaks a short word with its neighbour under one WORD event: such
    # tokens share the span of the token that has the event, split by character length
    groups, current = [], []
    for t in range(len(tokens)):
        if t in spans and current and any(g in spans for g in current):
            groups.append(current)
            current = []
        current.append(t)
    if current:
        groups.append(current)
    texts = [raw[a:b].decode("utf-8") for a, b in tokens]
    out = []
    for group in groups:
        owners = [t for t in group if t in spans]
        if not owners:
            continue
        begin, end = spans[owners[0]][0], spans[owners[-1]][1]
        kept = [t for t in group if re.search(r"\w", texts[t])]
        total = sum(len(texts[t]) for t in kept)
        pos = begin
        for t in kept:
            nxt = pos + (end - begin) * len(texts[t]) / total
            out.append(Word(texts[t], pos / sr, nxt / sr))
            pos = nxt
    return out
