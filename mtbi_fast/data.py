"""Manifests of paired speech and transcripts: JSONL, one utterance a line.

    {"id": "utt1", "audio": "wav/utt1.flac", "text": "the cat sat", "duration": 1.42,
     "words": [{"word": "the", "start": 0.12, "end": 0.25}, ...]}

``audio`` may be relative to the manifest's folder; ``words`` is optional until alignment
(``mtbi-fast align``). ``read_manifest`` checks every line and reports every bad one at once
(file, line number, id, what is wrong; one problem per bad line, its faults joined by "; ");
with ``skip_bad=True`` it keeps the good lines and returns the problems instead. By default the
audio checks read only the file headers (readable, duration matches); ``decode=True`` also decodes
every file (``load_audio``: truncated or unreadable data, NaN or infinite samples, a decoded length
short of the header's), and ``max_seconds`` rejects clips longer than the model takes
(``encoders.max_audio_seconds`` of a model config). ``import_librispeech`` turns the LibriSpeech folder
layout (``*.trans.txt`` beside the flac files) into this format.

The data model: an ``Utterance`` (one manifest line) with its ``Word`` list (a transcript word and
its time span), checked by ``check_alignment``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .audio import SAMPLE_RATE, load_audio
from .io import atomic_write_text

DURATION_TOLERANCE = 0.1  # seconds between the "duration" field and the audio file


@dataclass(frozen=True)
class Word:
    """A transcript word and its time span in seconds."""

    word: str
    start: float
    end: float


@dataclass
class Utterance:
    id: str
    audio: str           # absolute path
    text: str
    duration: float
    words: list[Word] | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self, base: Path | None = None) -> dict:
        audio = os.path.relpath(self.audio, base) if base else self.audio
        out = {"id": self.id, "audio": audio, "text": self.text, "duration": round(self.duration, 4)}
        if self.words is not None:
            out["words"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)}
                            for w in self.words]
        out.update(self.extra)
        return out


class ManifestError(ValueError):
    """Bad manifest lines; ``problems`` lists them all as "file:line: id: what" (one per line).

    The message's first line says how many lines are bad and shows the first (one line in all
    when only one is bad); the others follow, one a line."""

    def __init__(self, path, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0])
            return
        head = f"{path}: {len(problems)} bad lines, the first: {problems[0]}"
        rest = problems[1:50]
        super().__init__("\n".join([head, *rest])
                         + (f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""))


def read_manifest(path: str | os.PathLike, *, check_audio: bool = True, skip_bad: bool = False,
                  require_words: bool = False, decode: bool = False,
                  max_seconds: float | None = None, progress: bool = False):
    """Utterances of a manifest. Raises ``ManifestError`` listing every bad line, unless
    ``skip_bad`` (then returns ``(utterances, problems)``, one problem per bad line; otherwise
    just the utterances). ``decode``: decode every audio file (slower: about 3400x real time on
    one core, against headers only); ``max_seconds``: the longest clip allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    base = path.parent
    good, problems, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        lines = f.readlines() if progress else f
        if progress:
            from tqdm import tqdm

            lines = tqdm(lines, desc="decode" if decode else "check", unit="line")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            utt, errs = _parse_line(line, base, check_audio, require_words, decode, max_seconds)
            uid = utt.id if utt else "?"
            if utt and uid in seen:
                errs.append(f"duplicate id (first on line {seen[uid]})")
            if errs:
                problems.append(f"{path}:{lineno}: {uid}: {'; '.join(errs)}")
            else:
                seen[uid] = lineno
                good.append(utt)
    if skip_bad:
        return good, problems
    if problems:
        raise ManifestError(path, problems)
    return good


def check_alignment(words: Sequence[Word | dict], duration: float, utt_id: str = "?",
                    tolerance: float = 0.0) -> list[Word]:
    """Validated ``Word`` list; a ValueError names the utterance and the first bad word."""
    out: list[Word] = []
    if not words:
        raise ValueError(f"utterance {utt_id!r}: no words")
    for i, w in enumerate(words):
        if isinstance(w, dict):
            missing = [k for k in ("word", "start", "end") if w.get(k) is None]
            if missing:
                raise ValueError(f"utterance {utt_id!r}: word {i} {w.get('word')!r} has no "
                                 f"{' or '.join(missing)}")
            w = Word(str(w["word"]), w["start"], w["end"])
        where = f"utterance {utt_id!r}: word {i} {w.word!r}"
        if not w.word or not w.word.strip():
            raise ValueError(f"{where} is empty")
        try:
            start, end = float(w.start), float(w.end)
        except (TypeError, ValueError):
            raise ValueError(f"{where} has non-numeric times ({w.start!r}, {w.end!r})") from None
        if not (math.isfinite(start) and math.isfinite(end)):
            raise ValueError(f"{where} has missing times ({w.start!r}, {w.end!r})")
        if start < 0 or end < start:
            raise ValueError(f"{where} has times out of order (start {start}, end {end})")
        if out and start < out[-1].end:
            raise ValueError(f"{where} (start {start}) overlaps the previous word "
                             f"{out[-1].word!r} (end {out[-1].end})")
        if end > duration + tolerance:
            raise ValueError(f"{where} ends at {end} s, beyond the audio ({duration:.3f} s)")
        out.append(Word(w.word, start, end))
    return out


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance], relative: bool = True):
    """Write a manifest atomically (temp file, then rename); audio paths relative to it."""
    path = Path(path)
    base = path.parent.resolve() if relative else None
    atomic_write_text(path, "".join(json.dumps(u.to_json(base), ensure_ascii=False) + "\n"
                                    for u in utterances))


def import_librispeech(root: str | os.PathLike) -> list[Utterance]:
    """Utterances of a LibriSpeech-style folder: ``SPK/CHAPTER/SPK-CHAPTER.trans.txt`` lines
    "ID TEXT" beside ``ID.flac``. Transcripts are lower-cased; durations read from the files."""
    import soundfile as sf

    root = Path(root)
    trans = sorted(root.rglob("*.trans.txt"))
    if not trans:
        raise FileNotFoundError(f"no *.trans.txt files under {root} (not a LibriSpeech folder?)")
    out = []
    for t in trans:
        for lineno, line in enumerate(t.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            uid, _, text = line.partition(" ")
            audio = t.parent / f"{uid}.flac"
            if not text.strip():
                raise ValueError(f"{t}:{lineno}: {uid}: empty transcript")
            if not audio.is_file():
                raise FileNotFoundError(f"{t}:{lineno}: {uid}: audio file not found: {audio}")
            out.append(Utterance(uid, str(audio.resolve()), text.strip().lower(),
                                 sf.info(str(audio)).duration))
    return out


def _parse_line(line: str, base: Path, check_audio: bool, require_words: bool,
                decode: bool = False, max_seconds: float | None = None):
    try:
        d = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, [f"not valid JSON ({exc.msg} at column {exc.colno})"]
    if not isinstance(d, dict):
        return None, ["not a JSON object"]
    errs = []
    uid = d.get("id")
    if not isinstance(uid, str) or not uid:
        return None, ["missing or empty 'id'"]
    text = d.get("text")
    if not isinstance(text, str) or not text.strip():
        errs.append("empty or missing 'text'")
    audio = d.get("audio")
    if not isinstance(audio, str) or not audio:
        errs.append("missing 'audio'")
        audio_path = None
    else:
        audio_path = (base / audio).resolve() if not os.path.isabs(audio) else Path(audio)
    duration = d.get("duration")
    if check_audio and audio_path is not None:
        if not audio_path.is_file():
            errs.append(f"audio file not found: {audio_path}")
        else:
            try:
                import soundfile as sf

                real = sf.info(str(audio_path)).duration
            except Exception as exc:  # noqa: BLE001 - any unreadable file
                errs.append(f"cannot read audio {audio_path}: {exc}")
                real = None
            if real is not None and decode:
                errs += _decode_problems(audio_path, real)
            if real is not None:
                if duration is None:
                    duration = real
                elif isinstance(duration, (int, float)) and abs(float(duration) - real) > DURATION_TOLERANCE:
                    errs.append(f"duration {duration} s does not match the audio ({real:.2f} s)")
                if max_seconds is not None and real > max_seconds:
                    errs.append(f"audio is {real:.2f} s long, over the model's limit of {max_seconds:g} s")
    if duration is None or not isinstance(duration, (int, float)) or duration <= 0:
        errs.append(f"bad or missing 'duration': {duration!r}")
    words = d.get("words")
    parsed_words = None
    if words is None:
        if require_words:
            errs.append("no word times ('words'); run `mtbi-fast align` first")
    elif not errs:
        try:
            parsed_words = check_alignment(words, float(duration), uid, tolerance=0.05)
        except ValueError as exc:
            errs.append(str(exc).replace(f"utterance {uid!r}: ", ""))
    if errs:
        return Utterance(uid, "", "", 0.0), errs
    extra = {k: v for k, v in d.items() if k not in ("id", "audio", "text", "duration", "words")}
    return Utterance(uid, str(audio_path), text.strip(), float(duration), parsed_words, extra), []


def _decode_problems(audio_path: Path, header_seconds: float) -> list[str]:
    """What decoding the file finds wrong: unreadable or truncated data, no samples, NaN or
    infinite samples (``load_audio``'s errors), or fewer samples than the header declares."""
    try:
        wave = load_audio(audio_path)
    except (OSError, ValueError) as exc:
        return [str(exc)]
    decoded = wave.numel() / SAMPLE_RATE
    if decoded < header_seconds - DURATION_TOLERANCE:
        return [f"audio file {audio_path} is truncated: it decodes to {decoded:.2f} s of the "
                f"{header_seconds:.2f} s its header declares"]
    return []
