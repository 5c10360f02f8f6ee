"""Speech synthesis with word times: espeak-ng (through ctypes) and Piper (piper-tts, ONNX).

    audio, sr, words = espeak("The cat sat on the mat.", voice="en-us", rate=150)
    voice = PiperVoice("en_US-joe-medium.onnx")
    audio, sr, words = voice.synthesize("The cat sat on the mat.")

``words`` are ``Word(text, start, end)`` in seconds, one per whitespace token of the text (its
punctuation attached, so the words joined by spaces give the text back).

espeak-ng: a word starts at its WORD event's sample and ends at the first pause phoneme after it
(before the next word starts), else where the next word starts (the last word: at the end of the
audio). The library is the system's ``libespeak-ng.so.1`` (Debian ``espeak-ng``), or one given to
``use_espeak`` (``mtbi-fast corpus build`` fetches the one the PyPI package espeakng-loader ships).

Piper: the model's own phoneme durations (piper-tts >= 1.3 adds them to the ONNX graph; needs the
``onnx`` package). espeak-ng (inside Piper) joins and expands words in its phoneme stream ("of the"
comes out as one group), so each token is phonemized alone and its phonemes are matched against the
spoken phoneme sequence (``difflib``, stress marks ignored): a word runs from its first matched
phoneme to its last. A token with no matched phoneme shares the gap between its neighbours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import difflib
import os
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
_where: dict = {}  # use_espeak's library and data folder


def use_espeak(library: str | os.PathLike, data: str | os.PathLike) -> None:
    """Synthesize with this libespeak-ng and its data folder (``espeak-ng-data``), e.g. those the
    PyPI package espeakng-loader bundles, instead of the system's; before the first synthesis."""
    if _lib is not None and _where != {"library": str(library), "data": str(data)}:
        raise RuntimeError("another espeak-ng is already loaded in this process")
    _where.update(library=str(library), data=str(data))


def _load():
    global _lib, _rate, _cb
    if _lib is not None:
        return _lib
    name = _where.get("library") or ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise RuntimeError("libespeak-ng not found: apt-get install espeak-ng, or `mtbi-fast corpus "
                           "build`, which fetches the PyPI package espeakng-loader") from None
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    data = _where.get("data")
    _rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode() if data else None,
                                  _INIT_PHONEME_EVENTS)
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


def espeak(text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50):
    """(float32 waveform, sample rate, words with times) for one sentence, by espeak-ng."""
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


# ---------------------------------------------------------------------------------------------
# Piper

_STRESS = "ˈˌː"  # stress and length marks: not matched
_SKIP = re.compile(r"[\s.,;:!?\"'()\-—^$_]")  # pauses, punctuation, Piper's begin/end/pad symbols


class PiperVoice:
    """A Piper voice (``model.onnx`` with its ``model.onnx.json``) that gives word times."""

    def __init__(self, model: str | os.PathLike, threads: int = 1):
        import onnx
        import onnxruntime
        from piper import PiperVoice as _Voice
        from piper.patch_voice_with_alignment import add_alignment_output

        self.voice = _Voice.load(str(model))
        graph = onnx.load(str(model))
        add_alignment_output(graph)  # the phoneme durations as a second output
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.voice.session = onnxruntime.InferenceSession(graph.SerializeToString(), options,
                                                          providers=["CPUExecutionProvider"])
        self.sample_rate = self.voice.config.sample_rate

    def synthesize(self, text: str, *, length_scale: float | None = None,
                   noise_scale: float | None = None, noise_w_scale: float | None = None):
        """(float32 waveform, sample rate, words with times) for ``text``; ``match``, the share of
        the words' phonemes found in the spoken sequence, is kept in ``self.last_match``."""
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale,
                                 noise_w_scale=noise_w_scale, normalize_audio=False)
        chunks = list(self.voice.synthesize(text, config, include_alignments=True))
        spoken, spans, offset = [], [], 0
        for chunk in chunks:  # one chunk per sentence
            if chunk.phoneme_alignments is None:
                raise RuntimeError(f"Piper gave no phoneme alignment for {text!r}")
            t = offset
            for a in chunk.phoneme_alignments:
                spoken.append(a.phoneme)
                spans.append((t, t + a.num_samples))
                t += a.num_samples
            offset += len(chunk.audio_float_array)
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        words, self.last_match = _match_words(text.split(), spoken, spans, self._phonemes)
        sr = self.sample_rate
        return audio, sr, _fill_gaps(words, len(audio), sr)

    def _phonemes(self, token: str) -> str:
        return "".join("".join(s) for s in self.voice.phonemize(token))


def _match_words(tokens, spoken, spans, phonemize):
    """Per token: (first sample, last sample) of its matched phonemes, or None; and the match ratio."""
    ref, owner = [], []
    for k, token in enumerate(tokens):
        for ch in phonemize(token):
            if ch not in _STRESS and not _SKIP.match(ch):
                ref.append(ch)
                owner.append(k)
    keep = [i for i, ch in enumerate(spoken) if ch not in _STRESS and not _SKIP.match(ch)]
    matcher = difflib.SequenceMatcher(None, ref, [spoken[i] for i in keep], autojunk=False)
    first, last = {}, {}
    for a, b, n in matcher.get_matching_blocks():
        for j in range(n):
            k = owner[a + j]
            start, end = spans[keep[b + j]]
            first.setdefault(k, start)
            last[k] = end
    return [(tok, first.get(k), last.get(k)) for k, tok in enumerate(tokens)], matcher.ratio()


def _fill_gaps(words, n_samples: int, sr: int) -> list[Word]:
    out = []
    for k, (tok, start, end) in enumerate(words):
        if start is None:  # no phoneme matched: the gap between the neighbours
            start = out[-1].end * sr if out else 0
            end = next((w[1] for w in words[k + 1:] if w[1] is not None), n_samples)
            end = max(start, end)
        out.append(Word(tok, start / sr, end / sr))
    return out
