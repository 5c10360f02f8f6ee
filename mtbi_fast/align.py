"""``mtbi-fast align IN.jsonl -o OUT.jsonl``: word times for a manifest with pocketsphinx.

pocketsphinx's PyPI wheel ships an en-us acoustic model, language model and dictionary, so this
runs offline. Each transcript is normalized for the dictionary (lower case, punctuation removed,
digits spelled out); the decoder is forced to that word sequence (``set_align_text``) and its
segmentation (at ``frate`` frames per second, silences and sentence markers skipped) gives each
word's start and end. The manifest keeps its original words (with punctuation): a word spelled
as several dictionary words ("42" -> "forty two") takes the span of all of them.

Utterances with words missing from the dictionary, or that fail to align, are reported and left
out of the output (never written with bad times). Worker processes align in parallel.

Coverage check: forced alignment always finds *some* path, so a transcript that covers only part
of its audio (a 10-minute clip with an 18-word transcript) gets its words squeezed into a few
seconds without an error. An utterance is flagged when its words (first start to last end) span
less than ``min_coverage`` (default 0.5) of the audio *and* leave more than ``min_uncovered``
(default 2 s) uncovered (so a one-word clip with ordinary silence around it is not flagged). A
flagged utterance is kept, with an ``align_warning`` field in the output manifest saying so, and
``mtbi-fast align`` prints a warning for each and their count.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from dataclasses import dataclass

from tqdm import tqdm

from .data import Utterance, Word
from .procs import pool_initializer

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen " \
        "fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> list[str]:
    """English words for 0 <= n < 10^9."""
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    for size, name in ((10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = n % size
            return number_words(n // size) + [name] + (number_words(rest) if rest else [])
    raise AssertionError(n)


def normalize_word(word: str) -> list[str]:
    """Dictionary tokens for one transcript word ("Hello," -> ["hello"], "42" -> ["forty", "two"])."""
    w = word.lower().replace("\u2019", "'")
    out = []
    for part in re.findall(r"\d+|[a-z]+(?:'[a-z]+)*", w):
        out += number_words(int(part)) if part.isdigit() and len(part) < 10 else [part]
    return out


MIN_COVERAGE = 0.5    # share of the audio the words must span ...
MIN_UNCOVERED = 2.0   # ... unless at most this many seconds are left uncovered


def coverage_warning(words: list[Word], duration: float, min_coverage: float = MIN_COVERAGE,
                     min_uncovered: float = MIN_UNCOVERED) -> str | None:
    """Why the aligned ``words`` look wrong for ``duration`` s of audio (module docstring), or
    None when they cover it plausibly."""
    if not words or duration <= 0:
        return None
    span = words[-1].end - words[0].start
    if span < min_coverage * duration and duration - span > min_uncovered:
        return (f"the {len(words)} words span only {span / duration:.0%} of the audio "
                f"({words[0].start:.2f}-{words[-1].end:.2f} s of {duration:.2f} s): the transcript "
                "may cover only part of the clip")
    return None


@dataclass
class AlignResult:
    id: str
    words: list[Word] | None
    problem: str | None = None


_decoders = None
# the default search first; when it finds no path through the text (long or fast utterances),
# again with much wider beams and no HMM limit
_BEAMS = [dict(), dict(beam=1e-200, wbeam=1e-200, pbeam=1e-200, maxhmmpf=-1)]


def _init_worker():
    global _decoders
    from pocketsphinx import Decoder

    _decoders = [Decoder(samprate=16000, bestpath=False, loglevel="FATAL", **kw) for kw in _BEAMS]


def align_one(utt: Utterance) -> AlignResult:
    """Word times of one utterance (in a worker with a decoder)."""
    import numpy as np

    from .audio import load_audio

    if _decoders is None:
        _init_worker()
    dec = _decoders[0]
    originals = utt.text.split()
    tokens = [normalize_word(w) for w in originals]
    flat = [t for ts in tokens for t in ts]
    if not flat:
        return AlignResult(utt.id, None, "no words to align after normalization")
    oov = sorted({t for t in flat if dec.lookup_word(t) is None})
    if oov:
        return AlignResult(utt.id, None, f"words not in the pocketsphinx dictionary: {', '.join(oov)}")
    try:
        wave = load_audio(utt.audio)
    except (OSError, ValueError) as exc:
        return AlignResult(utt.id, None, str(exc))
    pcm = (np.clip(wave.numpy(), -1.0, 1.0) * 32767).astype("<i2").tobytes()
    segs = None
    for dec in _decoders:
        try:
            segs = _force_align(dec, " ".join(flat), pcm)
        except RuntimeError as exc:
            return AlignResult(utt.id, None, f"alignment failed: {exc}")
        if segs is not None:
            break
    if segs is None:
        return AlignResult(utt.id, None, "alignment failed (no path through the text)")
    if [s[0] for s in segs] != flat:
        return AlignResult(utt.id, None, "alignment failed (the decoder did not follow the text)")
    duration = wave.numel() / 16000
    out, k = [], 0
    for word, ts in zip(originals, tokens):
        if not ts:  # a word with no dictionary tokens (e.g. a lone dash) cannot be timed
            return AlignResult(utt.id, None, f"word {word!r} has no pronounceable letters")
        start, end = segs[k][1], segs[k + len(ts) - 1][2]
        k += len(ts)
        out.append(Word(word, round(start, 3), round(min(end, duration), 3)))
    return AlignResult(utt.id, out)


def _force_align(dec, text: str, pcm: bytes):
    """[(word, start s, end s)] without silences, or None when no path was found."""
    dec.set_align_text(text)
    dec.start_utt()
    dec.process_raw(pcm, full_utt=True)
    dec.end_utt()
    frate = float(dec.config["frate"])
    seg = dec.seg()
    if seg is None:
        return None
    return [(re.sub(r"\(\d+\)$", "", s.word), s.start_frame / frate, (s.end_frame + 1) / frate)
            for s in seg if s.word not in ("<s>", "</s>", "<sil>", "[NOISE]")]


def align_manifest(utts: list[Utterance], workers: int = 2, progress: bool = True, *,
                   min_coverage: float = MIN_COVERAGE, min_uncovered: float = MIN_UNCOVERED):
    """(aligned utterances, problems as "id: what"). Aligned utterances whose words cover too
    little of the audio (``coverage_warning``) carry an ``align_warning`` in ``extra``."""
    results = []
    if workers > 1 and len(utts) > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=pool_initializer, initargs=(os.getpid(), _init_worker)) as pool:
            for r in tqdm(pool.imap(align_one, utts, chunksize=4), total=len(utts), desc="align",
                          unit="utt", disable=not progress):
                results.append(r)
    else:
        for u in tqdm(utts, desc="align", unit="utt", disable=not progress):
            results.append(align_one(u))
    aligned, problems = [], []
    for u, r in zip(utts, results):
        if r.words is None:
            problems.append(f"{u.id}: {r.problem}")
            continue
        extra = {k: v for k, v in u.extra.items() if k != "align_warning"}
        warning = coverage_warning(r.words, u.duration, min_coverage, min_uncovered)
        if warning is not None:
            extra["align_warning"] = warning
        aligned.append(Utterance(u.id, u.audio, u.text, u.duration, r.words, extra))
    return aligned, problems
