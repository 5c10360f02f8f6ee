"""Manifests of paired speech and transcripts: JSONL, one utterance a line.

    {"id": "utt1", "audio": "wav/utt1.flac", "text": "the cat sat", "duration": 1.42,
     "words": [{"word": "the", "start": 0.12, "end": 0.25}, ...]}

``audio`` may be relative to the manifest's folder; ``words`` is optional until alignment
(``mtbi-fast align``). ``read_manifest`` checks every line and reports every bad one at once
(file, line number, id, what is wrong); with ``skip_bad=True`` it keeps the good lines and returns
the problems instead. ``import_librispeech`` turns the LibriSpeech folder layout (``*.trans.txt``
beside the flac files) into this format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .interleave import Word, check_alignment

DURATION_TOLERANCE = 0.1  # seconds between the "duration" field and the audio file


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
    """Bad manifest lines; ``problems`` lists them all as "file:line: id: what"."""

    def __init__(self, path, problems: list[str]):
        self.problems = problems
        head = f"{path}: {len(problems)} bad line{'s' if len(problems) != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(problems[:50])
                         + (f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""))


def read_manifest(path: str | os.PathLike, *, check_audio: bool = True, skip_bad: bool = False,
                  require_words: bool = False):
    """Utterances of a manifest. Raises ``ManifestError`` listing every bad line, unless
    ``skip_bad`` (then returns ``(utterances, problems)``; otherwise just the utterances)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    base = path.parent
    good, problems, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            utt, errs = _parse_line(line, base, check_audio, require_words)
            uid = utt.id if utt else "?"
            if utt and uid in seen:
                errs.append(f"duplicate id (first on line {seen[uid]})")
            if errs:
                problems += [f"{path}:{lineno}: {uid}: {e}" for e in errs]
            else:
                seen[uid] = lineno
                good.append(utt)
    if skip_bad:
        return good, problems
    if problems:
        raise ManifestError(path, problems)
    return good


def _parse_line(line: str, base: Path, check_audio: bool, require_words: bool):
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
            if real is not None:
                if duration is None:
                    duration = real
                elif abs(float(duration) - real) > DURATION_TOLERANCE:
                    errs.append(f"duration {duration} s does not match the audio ({real:.2f} s)")
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


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance], relative: bool = True):
    """Write a manifest atomically (temp file, then rename); audio paths relative to it."""
    from .io import atomic_write_text

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
