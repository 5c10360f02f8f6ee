"""Speech-text interleaving: which word spans of a transcript stay text and which become speech.

Given the words of an utterance with their times (``data.Word``, checked by
``data.check_alignment``), a word-aligned partition of the speech frames is
built once (``frame_cuts``): the cut between two words sits in the middle of the gap between them,
the first word owns the leading silence and the last word the trailing one, so the frames of any
run of words are one contiguous range and neighbouring runs never overlap or leave frames out.
``sample_segments`` then picks a fraction ``ratio`` of the words to keep as text, in spans of
geometric length with mean ``mean_span``, and returns the ordered segments::

    words = [Word("the", 0.10, 0.22), Word("cat", 0.25, 0.61), Word("sat", 0.70, 1.02)]
    segs = sample_segments(words, n_frames=14, frame_rate=12.5, ratio=0.5, mean_span=1.5,
                           generator=torch.Generator().manual_seed(0), utt_id="utt1")
    # e.g. [Segment("speech", 0, 1, 0, 3), Segment("text", 1, 2), Segment("speech", 2, 3, 8, 14)]

At ``ratio=1`` the single text segment is the whole transcript (the teacher's input); at
``ratio=0`` one speech segment spans every frame of the utterance. ``RatioSchedule`` moves the
ratio over training steps (constant, linear or cosine from ``start`` to ``end``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .data import Word, check_alignment
from .packing import Example, Speech, Text


@dataclass(frozen=True)
class Segment:
    """A run of words ``[word_start, word_end)`` given as text, or as speech frames
    ``[frame_start, frame_end)`` (speech segments only)."""

    kind: str  # "text" or "speech"
    word_start: int
    word_end: int
    frame_start: int = 0
    frame_end: int = 0

    @property
    def is_speech(self) -> bool:
        return self.kind == "speech"


def sample_segments(words: Sequence[Word | dict], n_frames: int, frame_rate: float, ratio: float,
                    mean_span: float = 3.0, *, generator: torch.Generator | None = None,
                    utt_id: str = "?", duration: float | None = None) -> list[Segment]:
    """Interleaved segments of one utterance (module docstring).

    ``words``: the transcript's words with times (``Word`` or dicts with word/start/end).
    ``n_frames``: speech frames after the adapter; ``frame_rate``: their rate in Hz.
    ``ratio``: the fraction of words kept as text (exactly ``round(ratio * len(words))``).
    ``mean_span``: mean words per text span (geometric lengths). ``duration``: the audio length in
    seconds, to check the alignment against (defaults to ``n_frames / frame_rate``).
    A speech span shorter than one frame (fast speech at a low frame rate) is given as text.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"utterance {utt_id!r}: ratio must be in [0, 1], got {ratio}")
    if mean_span < 1.0:
        raise ValueError(f"utterance {utt_id!r}: mean_span must be >= 1 word, got {mean_span}")
    words = check_alignment(words, duration if duration is not None else n_frames / frame_rate,
                            utt_id, tolerance=1.0 / frame_rate)
    cuts = frame_cuts(words, n_frames, frame_rate)
    is_text = _choose_text_words(len(words), ratio, mean_span, generator)
    return _segments(is_text, cuts)


def frame_cuts(words: Sequence[Word], n_frames: int, frame_rate: float) -> list[int]:
    """``len(words) + 1`` non-decreasing frame indices; word i owns frames [cuts[i], cuts[i+1]).

    ``cuts[0] == 0`` and ``cuts[-1] == n_frames``; inner cuts sit at the middle of the gap between
    two words (rounded to the nearest frame boundary).
    """
    cuts = [0]
    for prev, nxt in zip(words[:-1], words[1:]):
        c = round((prev.end + nxt.start) / 2 * frame_rate)
        cuts.append(min(max(c, cuts[-1]), n_frames))
    cuts.append(n_frames)
    return cuts


def _choose_text_words(n: int, ratio: float, mean_span: float,
                       generator: torch.Generator | None) -> list[bool]:
    """Mark exactly round(ratio * n) words as text, in geometric-length spans at random places."""
    goal = round(ratio * n)
    is_text = [False] * n
    if goal >= n:
        return [True] * n
    count = 0
    p = 1.0 / mean_span
    while count < goal:
        # geometric length >= 1 with mean 1/p, by inversion of one uniform draw
        u = torch.rand((), generator=generator).item()
        length = 1 if p >= 1.0 else 1 + int(math.log1p(-u) / math.log1p(-p))
        start = int(torch.randint(0, n, (), generator=generator))
        for i in range(start, min(start + length, n)):
            if count == goal:
                break
            if not is_text[i]:
                is_text[i] = True
                count += 1
    return is_text


def _segments(is_text: list[bool], cuts: list[int]) -> list[Segment]:
    """Runs of equal kind -> segments; speech runs without frames become text."""
    n = len(is_text)
    kinds = list(is_text)
    for a, b, text in _runs(kinds):
        if not text and cuts[a] == cuts[b]:
            kinds[a:b] = [True] * (b - a)
    segs = []
    for a, b, text in _runs(kinds):
        if text:
            segs.append(Segment("text", a, b))
        else:
            segs.append(Segment("speech", a, b, cuts[a], cuts[b]))
    assert sum(s.word_end - s.word_start for s in segs) == n
    return segs


def _runs(flags: list[bool]):
    start = 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            yield start, i, flags[start]
            start = i


def segment_text(words: Sequence[Word], seg: Segment) -> str:
    """The transcript text of a segment, with the leading space that separates it from what comes
    before (so that the text segments of a ratio-1 interleaving concatenate to the transcript)."""
    text = " ".join(w.word for w in words[seg.word_start:seg.word_end])
    return text if seg.word_start == 0 else " " + text


def transcript(words: Sequence[Word]) -> str:
    """The transcript as the teacher sees it: the words joined by single spaces."""
    return " ".join(w.word for w in words)


@dataclass(frozen=True)
class RatioSchedule:
    """The text ratio over training steps: ``constant`` (``start`` throughout), ``linear`` or
    ``cosine`` from ``start`` at step 0 to ``end`` at ``steps`` (then held).

    From YAML: ``interleave: {schedule: cosine, start: 0.8, end: 0.0, steps: 2000}``.
    """

    schedule: str = "constant"
    start: float = 0.5
    end: float = 0.5
    steps: int = 1

    KINDS = ("constant", "linear", "cosine")

    def __post_init__(self):
        if self.schedule not in self.KINDS:
            raise ValueError(f"interleave.schedule must be one of {self.KINDS}, got {self.schedule!r}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"interleave.{name} must be a number in [0, 1], got {v!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"interleave.steps must be a positive integer, got {self.steps!r}")

    @classmethod
    def from_config(cls, cfg: dict) -> "RatioSchedule":
        """From a config mapping; unknown keys are an error naming the key."""
        allowed = {"schedule", "start", "end", "steps"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"unknown key interleave.{unknown[0]} (allowed: {sorted(allowed)})")
        kw = dict(cfg)
        if kw.get("schedule", "constant") == "constant" and "end" not in kw and "start" in kw:
            kw["end"] = kw["start"]
        return cls(**kw)

    def __call__(self, step: int) -> float:
        if self.schedule == "constant":
            return float(self.start)
        frac = min(max(step, 0), self.steps) / self.steps
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * frac
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def render(segments: Sequence[Segment], words: Sequence[Word], tokenize) -> list:
    """Segments -> prompt parts for ``mtbi_fast.packing.Example``: ``Text(tokenize(text))`` for
    text runs, ``Speech(frame_start, frame_end)`` for speech runs. ``tokenize(str) -> list[int]``
    must not add special tokens; tokenizing each text run with its leading space matches the
    tokenization of the whole transcript (``transcript(words)``) at ratio 1 exactly."""
    parts = []
    for seg in segments:
        if seg.is_speech:
            parts.append(Speech(seg.frame_start, seg.frame_end))
        else:
            parts.append(Text(tokenize(segment_text(words, seg))))
    return parts


def example_pair(utt_id: str, words: Sequence[Word | dict], n_frames: int, frame_rate: float,
                 ratio: float, prefix: Sequence[int], suffix: Sequence[int],
                 response: Sequence[int], tokenize, *, mean_span: float = 3.0,
                 generator: torch.Generator | None = None, duration: float | None = None):
    """The (student, teacher) ``Example`` pair of one utterance and one prompt.

    The prompt is ``prefix`` + the utterance + ``suffix`` (token ids around the place of the
    transcript in the prompt template); the teacher gets the transcript as text, the student the
    interleaved segments. Both share ``response`` (the teacher's answer), so their loss positions
    line up. ``n_frames``: the model's speech frames for the clip (``SpeechLLM.n_frames``).
    """
    words = check_alignment(words, duration if duration is not None else n_frames / frame_rate,
                            utt_id, tolerance=1.0 / frame_rate)
    segs = sample_segments(words, n_frames, frame_rate, ratio, mean_span, generator=generator,
                           utt_id=utt_id, duration=duration)
    student = Example(utt_id, [Text(prefix), *render(segs, words, tokenize), Text(suffix)],
                      list(response), n_frames=n_frames)
    teacher = Example(utt_id, [Text(prefix), Text(tokenize(transcript(words))), Text(suffix)],
                      list(response), n_frames=0)
    return student, teacher
