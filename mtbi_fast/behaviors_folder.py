"""The behaviors folder format, and its one owner: ``BehaviorsFolder``.

    folder = BehaviorsFolder("runs/demo/behaviors")
    records = folder.records(vocab=512)       # every record, in plan order, ids checked
    states = folder.hidden_states()           # {record id: [response tokens, H]} (--cache-hidden)

What ``mtbi-fast behaviors`` writes:

    plan.json                  what was asked, with which teacher and settings (``provenance``)
    split.json                 the task split the prompts were drawn from
    part-00000.jsonl, ...      the records, one JSON object a line, ``part_size`` records a file
    part-00000.safetensors     with ``--cache-hidden``: the teacher's states, one tensor per record
    index.json                 once every part is there: each file's records and sha256

Folders made before 2026-12-03 name their parts ``shard-NNNNN.*`` ("shard" now means a Lhotse Shar
shard only). They are read as they are and resume writing under their own names; a folder holding
both kinds is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from .io import atomic_write_text, sha256_and_lines
from .provenance import read_plan

PART_PREFIX = "part-"
LEGACY_PREFIX = "shard-"  # the older name of the JSONL files: such folders are read and resumed as they are
PLAN_NAME, SPLIT_NAME, INDEX_NAME = "plan.json", "split.json", "index.json"
INDEX_FORMAT = 1
ID_FIELDS = ("prefix_ids", "transcript_ids", "suffix_ids", "response_ids")


class BehaviorsFolder:
    """A behaviors folder: its file names, records, plan, cached states, index and the file list
    a run's data fingerprint reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"BehaviorsFolder({str(self.path)!r})"

    # -- names -------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """The parts' name prefix: ``part-``, or ``shard-`` in a folder made before the rename."""
        legacy = any(self.path.glob(f"{LEGACY_PREFIX}*.jsonl")) if self.path.is_dir() else False
        if legacy and any(self.path.glob(f"{PART_PREFIX}*.jsonl")):
            raise ValueError(f"{self.path} holds both {PART_PREFIX}*.jsonl and {LEGACY_PREFIX}*.jsonl "
                             f"behavior files; keep one kind (move the other aside)")
        return LEGACY_PREFIX if legacy else PART_PREFIX

    def part(self, k: int, ext: str = "jsonl") -> Path:
        """Part ``k``'s records (``jsonl``) or cached states (``safetensors``)."""
        return self.path / f"{self.prefix}{k:05d}.{ext}"

    @staticmethod
    def states_of(records_file: Path) -> Path:
        """The cached states that go with a records file."""
        return records_file.with_suffix(".safetensors")

    def record_files(self) -> list[Path]:
        return sorted(self.path.glob(f"{self.prefix}*.jsonl"))

    def state_files(self) -> list[Path]:
        return sorted(self.path.glob(f"{self.prefix}*.safetensors"))

    def fingerprint_files(self, with_states: bool) -> list[Path]:
        """The files whose bytes a training run's data fingerprint covers (``runfolder``)."""
        return self.record_files() + (self.state_files() if with_states else [])

    def holds_behaviors(self) -> bool:
        """Whether anything of a behaviors run is here (plan, split, index or parts)."""
        if not self.path.is_dir():
            return False
        return any(p.name in (PLAN_NAME, SPLIT_NAME, INDEX_NAME) or p.name.startswith((PART_PREFIX, LEGACY_PREFIX))
                   for p in self.path.iterdir())

    # -- reading -----------------------------------------------------------------------------

    def plan(self) -> dict:
        return read_plan(self.path)

    def iter_records(self, vocab: int | None = None) -> Iterator[tuple[Path, int, dict]]:
        """(file, line number, record) of every record in plan order; the part names and record
        counts are checked against ``index.json`` when it is there, and with ``vocab`` every
        token id (``check_record_ids``). Errors name the file and line."""
        files = self.record_files()
        listed = self._indexed(files)
        if not files:
            raise FileNotFoundError(f"no behavior files in {self.path} (run `mtbi-fast behaviors`)")
        for f in files:
            n = 0
            with open(f, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{f}:{lineno}: not valid JSON ({exc.msg})") from None
                    if vocab is not None:
                        if not isinstance(record, dict):
                            raise ValueError(f"{f}:{lineno}: a behavior record is a JSON object")
                        check_record_ids(record, vocab, f"{f}:{lineno}")
                    n += 1
                    yield f, lineno, record
            if listed is not None and n != listed[f.name]:
                raise ValueError(f"{f} has {n} records, {self.path / INDEX_NAME} lists "
                                 f"{listed[f.name]}: the file changed after the index was written")

    def records(self, vocab: int | None = None) -> list[dict]:
        """All records, in plan order (``iter_records``)."""
        return [r for _, _, r in self.iter_records(vocab)]

    def hidden_states(self) -> dict[str, torch.Tensor]:
        """The teacher's cached states: a tensor [response tokens, hidden] per record id."""
        from safetensors.torch import load_file

        files = self.state_files()
        if not files:
            raise FileNotFoundError(f"data.teacher_cache is on but {self.path} has no cached teacher "
                                    "states; run `mtbi-fast behaviors ... --cache-hidden`")
        cache = {}
        for f in files:
            cache.update(load_file(str(f)))
        return cache

    def check_complete(self, n_records: int) -> None:
        """All the behaviors the plan asked for are there (a behaviors run still going, or killed,
        would otherwise be read with utterances or records missing)."""
        if not (self.path / PLAN_NAME).is_file():
            return
        jobs = self.plan().get("jobs")
        if isinstance(jobs, int) and n_records != jobs:
            raise ValueError(f"{self.path} holds {n_records} of the {jobs} behaviors its plan.json asks "
                             f"for: `mtbi-fast behaviors` has not finished there (run it again to finish)")

    # -- the index ---------------------------------------------------------------------------

    def all_parts_there(self, n_parts: int, hidden: bool) -> bool:
        exts = ("jsonl", "safetensors") if hidden else ("jsonl",)
        return all(self.part(k, ext).exists() for k in range(n_parts) for ext in exts)

    def write_index(self, n_parts: int) -> dict:
        """Write ``index.json`` for a folder whose ``n_parts`` parts are all there, atomically;
        returns it. Cached states count when every part has them."""
        hidden = all(self.part(k, "safetensors").exists() for k in range(n_parts))
        files, total = [], 0
        for k in range(n_parts):
            path = self.part(k)
            sha, lines = sha256_and_lines(path)
            files.append({"name": path.name, "records": lines, "sha256": sha})
            total += lines
            if hidden:
                path = self.part(k, "safetensors")
                files.append({"name": path.name, "records": _safetensors_count(path),
                              "sha256": sha256_and_lines(path)[0]})
        index = {"format": INDEX_FORMAT, "parts": n_parts, "records": total, "hidden_states": hidden,
                 "files": files}
        atomic_write_text(self.path / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        return index

    def _indexed(self, files: list[Path]) -> dict | None:
        """{file name: records} from ``index.json`` (None without one), after checking that the
        folder's record files are exactly the ones it lists."""
        path = self.path / INDEX_NAME
        if not path.is_file():
            return None
        try:
            index = json.loads(path.read_text())
            listed = {f["name"]: f["records"] for f in index["files"] if f["name"].endswith(".jsonl")}
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a behaviors index ({exc})") from None
        present = {f.name for f in files}
        missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
        if missing:
            raise FileNotFoundError(
                f"{self.path / missing[0]} is missing: {path} lists {len(listed)} files and "
                f"{len(missing)} of them are not there ({', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}); rerun `mtbi-fast behaviors` into {self.path}")
        if extra:
            raise ValueError(f"{self.path / extra[0]} is not in {path} ({len(extra)} behavior file"
                             f"{'s' if len(extra) > 1 else ''} it does not list: "
                             f"{', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})")
        return listed


def read_behaviors(folder: str | os.PathLike, vocab: int | None = None) -> list[dict]:
    """All records of a behaviors folder (``BehaviorsFolder.records``)."""
    return BehaviorsFolder(folder).records(vocab)


def check_record_ids(record: dict, vocab: int, where: str) -> None:
    """Every token id of a behavior record is an int in ``[0, vocab)`` (a negative id would be
    read as a speech-frame reference, one past the table fails only in the step): else a
    ValueError naming ``where`` (file and line, or shard and cut), the record and the field."""
    for field in ID_FIELDS:
        ids = record.get(field)
        if not isinstance(ids, list):
            raise ValueError(f"{where}: record {record.get('id')!r}: {field} must be a list of token ids, "
                             f"got {type(ids).__name__}")
        for k, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"{where}: record {record.get('id')!r}: {field}[{k}] = {t!r} is not a "
                                 f"token id of the LLM's vocabulary [0, {vocab})")


def _safetensors_count(path: Path) -> int:
    """Tensors in a safetensors file, from its header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return sum(k != "__metadata__" for k in header)
