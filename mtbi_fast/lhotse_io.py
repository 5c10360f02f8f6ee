"""Lhotse interop: the project's manifests as Lhotse CutSets and back.

    cuts = manifest_to_cutset(read_manifest("train.jsonl"))   # one cut per utterance
    cuts.to_file("train_cuts.jsonl.gz")                       # a Lhotse CutSet manifest
    utts = read_utterances("train_cuts.jsonl.gz")             # either format, by content

The mapping, one utterance to one cut (cut id = recording id = supervision id = utterance id):

- ``Recording.from_file(audio)``: the whole audio file (absolute path).
- The cut covers the whole recording (start 0, the file's duration). A mono file gives a
  ``MonoCut``; a multi-channel file gives a ``MultiCut`` over all its channels, since the
  project mixes channels to mono (``load_audio``) where a ``MonoCut`` would pick one.
- One ``SupervisionSegment`` over the whole cut with the text and, when the utterance has word
  times, ``alignment["word"]``: ``AlignmentItem(symbol=word, start, duration=end - start)``.
- ``Utterance.extra`` (other manifest fields) goes to ``cut.custom`` and comes back from it.

Back (``cutset_to_manifest``), a cut must be what the project's data model can hold: exactly one
supervision with text, word alignment (unless ``require_words=False``), audio from one file on
disk, covering the whole recording (start 0, its full duration) and all of its channels.
Anything else is reported, every bad cut at once, as a ``ManifestError`` naming each cut.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterable

from .data import ManifestError, Utterance, Word, check_alignment, read_manifest

_JSON_TYPES = (str, int, float, bool, type(None), list, dict)


def manifest_to_cutset(utterances: Iterable[Utterance]):
    """A Lhotse ``CutSet`` with one cut per utterance (see the module docstring)."""
    from lhotse import CutSet, MonoCut, MultiCut, Recording, SupervisionSegment
    from lhotse.supervision import AlignmentItem

    cuts = []
    for u in utterances:
        rec = Recording.from_file(u.audio, recording_id=u.id)
        alignment = None
        if u.words is not None:
            alignment = {"word": [AlignmentItem(symbol=w.word, start=round(w.start, 6),
                                                duration=round(w.end - w.start, 6))
                                  for w in u.words]}
        channel = rec.channel_ids[0] if len(rec.channel_ids) == 1 else list(rec.channel_ids)
        sup = SupervisionSegment(id=u.id, recording_id=rec.id, start=0.0, duration=rec.duration,
                                 channel=channel, text=u.text, alignment=alignment)
        kind = MonoCut if len(rec.channel_ids) == 1 else MultiCut
        cuts.append(kind(id=u.id, start=0.0, duration=rec.duration, channel=channel,
                         recording=rec, supervisions=[sup], custom=dict(u.extra) or None))
    return CutSet.from_cuts(cuts)


def cutset_to_manifest(cuts, *, require_words: bool = True, source: str = "CutSet") -> list[Utterance]:
    """Utterances of a CutSet (or any iterable of cuts). Raises ``ManifestError`` listing every
    cut that does not fit the data model, each as "SOURCE: cut ID: what"; a cut id seen before is
    one (behaviors, shards and the cached teacher states are keyed by it, as a JSONL manifest's
    ids are)."""
    good, problems, seen = [], [], {}
    for n, cut in enumerate(cuts, 1):
        if cut.id in seen:
            problems.append(f"{source}: cut {cut.id!r}: duplicate id (cut {n}; first as cut {seen[cut.id]})")
            continue
        seen[cut.id] = n
        utt, err = _cut_to_utterance(cut, require_words)
        if err:
            problems.append(f"{source}: cut {cut.id!r}: {err}")
        else:
            good.append(utt)
    if problems:
        raise ManifestError(source, problems)
    return good


def _cut_to_utterance(cut, require_words: bool):
    rec = getattr(cut, "recording", None)
    if rec is None:
        return None, "no recording (audio); a cut needs its audio file"
    if len(rec.sources) != 1 or rec.sources[0].type != "file":
        kinds = ", ".join(s.type for s in rec.sources)
        return None, (f"audio is not one file on disk (sources: {kinds}); save it first, "
                      f"e.g. cuts.save_audios(DIR)")
    audio = Path(rec.sources[0].source)
    if not audio.is_absolute():
        audio = audio.resolve()
    if not audio.is_file():
        return None, f"audio file not found: {audio}"
    if abs(cut.start) > 1e-6 or abs(cut.duration - rec.duration) > 1e-3:
        return None, (f"covers {cut.start:.3f}-{cut.end:.3f} s of a {rec.duration:.3f} s "
                      f"recording; a manifest utterance is a whole audio file "
                      f"(save the segment with cuts.save_audios(DIR))")
    channels = cut.channel if isinstance(cut.channel, list) else [cut.channel]
    if sorted(channels) != sorted(rec.channel_ids):
        return None, (f"uses channel(s) {channels} of a recording with channels "
                      f"{rec.channel_ids}; the project mixes all channels to mono")
    if len(cut.supervisions) != 1:
        return None, (f"has {len(cut.supervisions)} supervisions; one per cut is required "
                      f"(split it with cuts.trim_to_supervisions() and save the audio)")
    sup = cut.supervisions[0]
    if not sup.text or not sup.text.strip():
        return None, "supervision has no text"
    try:
        words = cut_words(cut)
    except ValueError as exc:
        return None, str(exc).replace(f"utterance {cut.id!r}: ", "")
    if words is None and require_words:
        return None, ('no word alignment (supervision.alignment["word"]); '
                      "run `mtbi-fast align` to add word times")
    extra = {k: v for k, v in (cut.custom or {}).items() if isinstance(v, _JSON_TYPES)}
    return Utterance(cut.id, str(audio), sup.text.strip(), float(cut.duration), words, extra), None


def cut_words(cut) -> list[Word] | None:
    """The word times of a cut's first supervision (``alignment["word"]``), checked
    (``check_alignment``), or None without them. Items with an empty symbol (the silences of the
    LibriSpeech alignments Lhotse's recipe reads) are left out."""
    items = (cut.supervisions[0].alignment or {}).get("word") if cut.supervisions else None
    items = [a for a in items or () if a.symbol and a.symbol.strip()]
    if not items:
        return None
    # rounded to 1 us: start + duration can pass the next start by 1e-16
    return check_alignment([Word(a.symbol, round(a.start, 6), round(a.start + a.duration, 6)) for a in items],
                           cut.duration, cut.id, tolerance=0.05)


def is_cutset_manifest(path: str | os.PathLike) -> bool:
    """Whether a (possibly gzipped) JSONL file holds Lhotse cuts: its first non-empty line is a
    JSON object with "type" ending in "Cut" (MonoCut, MultiCut, ...)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and str(first.get("type", "")).endswith("Cut")
    return False


def read_utterances(path: str | os.PathLike, *, require_words: bool = False, **manifest_kw):
    """Utterances of a project manifest (``read_manifest``, which gets ``require_words`` and
    ``manifest_kw``) or of a Lhotse CutSet manifest (detected by content, ``.jsonl`` or
    ``.jsonl.gz``; read lazily; ``require_words`` as in ``cutset_to_manifest``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if is_cutset_manifest(path):
        from lhotse import CutSet

        return cutset_to_manifest(CutSet.from_jsonl_lazy(path), require_words=require_words,
                                  source=str(path))
    if path.suffix == ".gz":
        raise ValueError(f"{path}: a gzipped file that is not a Lhotse CutSet manifest "
                         f"(its first line has no \"type\": \"MonoCut\"); project manifests are "
                         f"plain JSONL")
    return read_manifest(path, require_words=require_words, **manifest_kw)
