"""``mtbi-fast shard``: a corpus (manifest + behaviors) written as Lhotse Shar shards, the storage
the streaming reader (``mtbi_fast.streaming``) trains from.

    write_shards("train.jsonl", "behaviors/", "shards/", shard_size=1000)
    index = read_index("shards/")        # shards.json: the shards, their counts and checksums

``shar/`` holds Shar files only (cuts with word alignments and their behavior records, flac
audio, optionally the teacher's cached states), so ``CutSet.from_shar(in_dir="shards/shar")``
reads it as it is; ``shards.json`` (the index, written last), ``shard_settings.json`` and the
behaviors' ``plan.json`` / ``split.json`` sit beside it. A shard's files are a function of its
inputs, whichever of the ``workers`` processes wrote them; each shard is written aside and renamed,
its cuts file last, so a killed run rewrites only the missing shards, and a rerun with other
inputs or settings is refused. The layout, the checks and resume: docs/data.md#the-shard-folder.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .behaviors_folder import PLAN_NAME, SPLIT_NAME, BehaviorsFolder
from .data import Utterance
from .io import atomic_write_text, move_aside, sha256_files
from .lhotse_io import manifest_to_cutset, read_utterances
from .lock import LOCK_NAME, FolderLock
from .procs import pool_initializer

FORMAT = 1
INDEX = "shards.json"
SETTINGS = "shard_settings.json"
SHAR = "shar"
FIELDS = {"recording": "flac", "behaviors": "jsonl"}
HIDDEN_FIELD = "teacher_hidden"
SUMMARIES = "shard_summaries"  # one JSON per finished shard: its entry of the index


def write_shards(manifest: str | os.PathLike, behaviors: str | os.PathLike, out_dir: str | os.PathLike,
                 *, shard_size: int = 1000, teacher_hidden: bool = False, overwrite: bool = False,
                 workers: int = 1, progress: bool = True) -> dict:
    """Write (or finish) the shards of ``manifest``'s utterances with their ``behaviors`` into
    ``out_dir`` (module docstring); returns the index (``shards.json``). ``teacher_hidden``: also
    the teacher's cached states (the behaviors folder's ``part-*.safetensors``). ``workers``:
    processes writing shards at once (the files are the same for any number)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out, folder = Path(out_dir), BehaviorsFolder(behaviors)
    behaviors = folder.path
    bfiles = folder.record_files()
    if not bfiles:
        raise FileNotFoundError(f"no behavior files in {behaviors} (run `mtbi-fast behaviors`)")
    if teacher_hidden:
        missing = [folder.states_of(f).name for f in bfiles if not folder.states_of(f).is_file()]
        if missing:
            raise FileNotFoundError(f"{behaviors}: no cached teacher states ({', '.join(missing[:3])}); "
                                    f"run `mtbi-fast behaviors ... --cache-hidden` first")
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "shard"):
        t0 = time.time()
        utts = {u.id: u for u in read_utterances(manifest, require_words=True)}
        ids, n_records = _utterances_with_behaviors(folder, utts, manifest)
        folder.check_complete(n_records)
        settings = {"format": FORMAT, "shard_size": shard_size, "teacher_hidden": teacher_hidden,
                    "manifest_sha256": sha256_files([Path(manifest)]),
                    "behaviors_sha256": sha256_files(bfiles), "utterances": len(ids)}
        _check_settings(out, settings, overwrite)
        atomic_write_text(out / SETTINGS, json.dumps(settings, indent=2))
        for name in (PLAN_NAME, SPLIT_NAME):  # the teacher's provenance (check_teacher)
            if (behaviors / name).is_file():
                atomic_write_text(out / name, (behaviors / name).read_text(encoding="utf-8"))
        shards = [ids[i:i + shard_size] for i in range(0, len(ids), shard_size)]
        (out / SHAR).mkdir(exist_ok=True)
        # a shard is done when every one of its files is there (a deleted one is written again)
        todo = {k for k in range(len(shards)) if not _shard_complete(out, k, teacher_hidden)}
        bar = tqdm(total=len(ids), initial=sum(len(shards[k]) for k in range(len(shards)) if k not in todo),
                   desc="shard", unit="utt", disable=None if progress else True)  # None: a terminal only
        written = 0
        groups = _records_by_utterance(folder, teacher_hidden)
        # the workers die with this process (kill -9 included): none writes after the lock is gone
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=pool_initializer,
                                   initargs=(os.getpid(),)) if workers > 1 else None
        pending: deque = deque()  # (future, utterances) of the shards being written
        try:
            for k, shard_ids in enumerate(shards):
                if k not in todo:
                    for _ in shard_ids:  # past this shard's records
                        next(groups)
                    continue
                items = [(utts[u], *_next_group(groups, u)) for u in shard_ids]
                if pool is None:
                    _write_shard(out, k, items, teacher_hidden)
                    pending.append((None, len(items)))
                else:  # at most two shards a worker in flight: memory stays bounded
                    pending.append((pool.submit(_write_shard, out, k, items, teacher_hidden), len(items)))
                while pending and (pool is None or len(pending) >= 2 * workers):
                    written += _finish(pending.popleft(), bar)
            while pending:
                written += _finish(pending.popleft(), bar)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        bar.close()
        index = _make_index(out, len(shards), settings, len(utts) - len(ids))
        atomic_write_text(out / INDEX, json.dumps(index, indent=2))
        shutil.rmtree(out / ".tmp", ignore_errors=True)
    elapsed = time.time() - t0
    if progress:
        print(f"shard: {len(shards)} shards, {index['cuts']} utterances ({written} written now), "
              f"{index['records']} behaviors in {elapsed:.1f} s "
              f"({written / max(elapsed, 1e-9):.0f} utterances/s) -> {out}")
    return index


def read_index(folder: str | os.PathLike, verify: str = "quick", progress: bool = False,
               bad: dict | None = None) -> dict:
    """The index of a shard folder (``shards.json``), checked against the folder: every shard's
    files present, its entry the one ``mtbi-fast shard`` recorded for it (``shard_summaries/``),
    and with ``verify`` "quick" (the default) each file's size and quick fingerprint
    (``quick_fingerprint``: 128 KiB a file), with "full" its whole sha256 (every byte read once;
    the trainer does it on resume and with ``data.verify_shards``), "none" presence only. A
    mismatch names the file: the folder may move but not change. With ``bad`` (a dict), a shard
    whose file contents do not match is recorded there (shard number: why) instead of refused:
    ``data.skip_bad_shards`` then leaves it out."""
    folder = Path(folder)
    path = folder / INDEX
    if not path.is_file():
        what = "an unfinished shard folder (run `mtbi-fast shard` again to finish it)" \
            if (folder / SETTINGS).is_file() else "not a shard folder (made by `mtbi-fast shard`)"
        raise FileNotFoundError(f"{path} not found: {folder} is {what}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: shard format {index.get('format')!r}, this version reads {FORMAT}")
    if verify not in ("none", "quick", "full"):
        raise ValueError(f"verify must be none, quick or full, got {verify!r}")
    redo = "rerun `mtbi-fast shard` with the same inputs to rewrite it"
    shards = index.get("shards")
    if not isinstance(shards, list) or index.get("cuts") != sum(sh.get("cuts", 0) for sh in shards):
        raise ValueError(f"{path}: its cut count does not add up over its shards (edited by hand?); {redo}")
    todo = [(k, sh, field, name) for k, sh in enumerate(shards) for field, name in sh["files"].items()]
    bar = tqdm(total=len(todo), desc="verify shards", unit="file", disable=not (progress and verify == "full"))
    for k, shard, field, name in todo:
        file = folder / SHAR / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing (listed in {path}); {redo}")
        if field == "cuts":  # the entry is the one recorded when the shard was written
            recorded = folder / SUMMARIES / f"{k:06d}.json"
            if recorded.is_file():
                entry = {key: v for key, v in json.loads(recorded.read_text(encoding="utf-8")).items()
                         if key != "tasks"}
                if entry != {key: shard.get(key) for key in entry}:
                    raise ValueError(f"{path}: the entry of shard {k} differs from {recorded}, written with "
                                     f"the shard (edited by hand?); {redo}")
        if verify == "none" or (bad is not None and k in bad):
            continue
        problem = None
        size = (shard.get("bytes") or {}).get(field)
        quick = (shard.get("quick") or {}).get(field)
        if size is not None and file.stat().st_size != size:
            problem = (f"{file}: {file.stat().st_size} bytes, {path} lists {size}: the file changed "
                       f"after `mtbi-fast shard` wrote it")
        elif quick is not None and quick_fingerprint(file) != quick:
            problem = f"{file}: its contents differ from what {path} recorded (quick fingerprint)"
        elif verify == "full" and sha256_files([file]) != shard["sha256"][field]:
            problem = f"{file}: its sha256 differs from {path}'s: the file changed after `mtbi-fast shard` wrote it"
        if problem is not None:
            if bad is None:
                raise ValueError(f"{problem}; {redo}")
            bad[k] = problem
        bar.update(1)
    bar.close()
    return index


def shard_paths(folder: str | os.PathLike, shard: dict) -> dict[str, str]:
    """The Shar field paths of one shard of the index, for ``LazySharIterator(fields=...)``."""
    return {field: str(Path(folder) / SHAR / name) for field, name in shard["files"].items()}


# ---------------------------------------------------------------------------------------------


def _write_shard(out: Path, k: int, items, teacher_hidden: bool) -> None:
    """Shard ``k`` from (utterance, records, hidden) items: written into ``.tmp/NNNNNN``, then
    renamed into ``shar/``, the cuts file last."""
    from lhotse.shar import SharWriter

    tmp = out / ".tmp" / f"{k:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fields = dict(FIELDS, **({HIDDEN_FIELD: "numpy"} if teacher_hidden else {}))
    with SharWriter(str(tmp), fields=fields, shard_size=None, shard_suffix=f".{k:06d}") as writer:
        for utt, records, hidden in items:
            cut = manifest_to_cutset([utt])[0]
            cut.custom = dict(cut.custom or {}, behaviors=records)
            if teacher_hidden:
                cut = cut.attach_tensor(HIDDEN_FIELD, hidden)
            writer.write(cut)
    names = sorted(p.name for p in tmp.iterdir())
    for name in names:  # gzip headers carry the time: rewritten without it, a shard's bytes are its inputs'
        if name.endswith(".gz"):
            _gzip_without_time(tmp / name)
    cuts = _cuts_file(out, k).name
    summary = _summarize(tmp, k, teacher_hidden)
    atomic_write_text(out / SUMMARIES / f"{k:06d}.json", json.dumps(summary))
    for name in [n for n in names if n != cuts] + [cuts]:
        os.replace(tmp / name, out / SHAR / name)
    tmp.rmdir()


def _gzip_without_time(path: Path) -> None:
    data = gzip.decompress(path.read_bytes())
    with open(path, "wb") as raw, gzip.GzipFile(path.name[:-3], "wb", fileobj=raw, mtime=0) as f:
        f.write(data)


def _finish(entry, bar) -> int:
    future, n = entry
    if future is not None:
        future.result()  # a worker's error is raised here
    bar.update(n)
    return n


def _cuts_file(out: Path, k: int) -> Path:
    return out / SHAR / f"cuts.{k:06d}.jsonl.gz"


def _shard_files(k: int, teacher_hidden: bool) -> dict[str, str]:
    files = {"cuts": f"cuts.{k:06d}.jsonl.gz", "recording": f"recording.{k:06d}.tar",
             "behaviors": f"behaviors.{k:06d}.jsonl.gz"}
    if teacher_hidden:
        files[HIDDEN_FIELD] = f"{HIDDEN_FIELD}.{k:06d}.tar"
    return files


def _shard_complete(out: Path, k: int, teacher_hidden: bool) -> bool:
    return (out / SUMMARIES / f"{k:06d}.json").is_file() and all(
        (out / SHAR / name).is_file() for name in _shard_files(k, teacher_hidden).values())


def _utterances_with_behaviors(folder: BehaviorsFolder, utts: dict[str, Utterance], manifest) -> list[str]:
    """The ids of the utterances that have behaviors, in the behaviors' order (which must group
    each utterance's records together, as ``mtbi-fast behaviors`` writes them), and the number
    of records."""
    ids, seen, n = [], set(), 0
    for f, lineno, r in folder.iter_records():
        n += 1
        u = r.get("utt_id")
        if u not in utts:
            raise ValueError(f"{f}:{lineno}: behavior {r.get('id')!r} refers to utterance {u!r}, "
                             f"which is not in {manifest}")
        if ids and ids[-1] == u:
            continue
        if u in seen:
            raise ValueError(f"{f}:{lineno}: the records of utterance {u!r} are not together; "
                             f"shards need behaviors in plan order (as `mtbi-fast behaviors` writes them)")
        seen.add(u)
        ids.append(u)
    return ids, n


def _records_by_utterance(folder: BehaviorsFolder, teacher_hidden: bool) -> Iterator[tuple[str, list, np.ndarray | None]]:
    """(utterance id, its records, its cached states as uint16 bf16 bits or None), in order."""
    current, records, states = None, [], []
    open_file, handle = None, None
    for f, _, r in folder.iter_records():
        if r["utt_id"] != current:
            if current is not None:
                yield current, records, _concat(states) if teacher_hidden else None
            current, records, states = r["utt_id"], [], []
        records.append(r)
        if teacher_hidden:
            if open_file != f:
                from safetensors import safe_open
                handle, open_file = safe_open(str(folder.states_of(f)), "pt"), f
            if r["id"] not in handle.keys():
                raise ValueError(f"{folder.states_of(f)}: no cached states for behavior {r['id']!r}")
            states.append(handle.get_tensor(r["id"]))
    if current is not None:
        yield current, records, _concat(states) if teacher_hidden else None


def _next_group(groups, utt_id: str):
    got, records, hidden = next(groups)
    assert got == utt_id, (got, utt_id)  # both follow the same record stream
    return records, hidden


def _concat(states) -> np.ndarray:
    import torch

    t = torch.cat([s.to(torch.bfloat16) for s in states]) if states else torch.zeros(0, 0, dtype=torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def _check_settings(out: Path, settings: dict, overwrite: bool) -> None:
    """A folder made from other inputs or settings is refused, or moved aside with ``overwrite``."""

    path = out / SETTINGS
    if not path.is_file():
        if any(p.name != ".lock" for p in out.iterdir()) and not overwrite:
            raise ValueError(f"{out} is not empty and holds no shards; pick another folder or pass "
                             f"--overwrite to move its contents aside")
        if overwrite and any(p.name != ".lock" for p in out.iterdir()):
            print(f"shard: moved the old contents of {out} to {move_aside(out, keep=lambda p: p.name == LOCK_NAME)}")
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    diffs = [f"{k} ({old.get(k)!r} -> {settings[k]!r})" for k in settings if old.get(k) != settings[k]]
    if not diffs:
        return
    if not overwrite:
        raise ValueError(f"{out} holds shards made from other inputs or settings: {', '.join(diffs)}; "
                         f"pass --overwrite to move them aside and start again")
    print(f"shard: moved the old shards of {out} to {move_aside(out, keep=lambda p: p.name == LOCK_NAME)}")


def _summarize(folder: Path, k: int, teacher_hidden: bool) -> dict:
    """Shard ``k``'s entry of the index: its files, cut and record counts, tasks and checksums."""
    files = _shard_files(k, teacher_hidden)
    cuts, records, tasks = 0, 0, Counter()
    with gzip.open(folder / files["behaviors"], "rt", encoding="utf-8") as f:
        for line in f:
            recs = json.loads(line).get("behaviors", [])
            cuts += 1
            records += len(recs)
            tasks.update(r["task"] for r in recs)
    with gzip.open(folder / files["cuts"], "rt", encoding="utf-8") as f:
        longest = max((json.loads(line)["duration"] for line in f), default=0.0)
    return {"files": files, "cuts": cuts, "records": records, "max_duration": longest, "tasks": dict(tasks),
            "sha256": {field: sha256_files([folder / name]) for field, name in files.items()},
            "bytes": {field: (folder / name).stat().st_size for field, name in files.items()},
            "quick": {field: quick_fingerprint(folder / name) for field, name in files.items()}}


QUICK_BYTES = 1 << 16  # the quick fingerprint reads 64 KiB at each end of a file


def quick_fingerprint(path: Path) -> str:
    """sha256 of a file's size and its first and last 64 KiB: read at every start (a full sum of
    a 10k-hour corpus would take minutes), it catches a file rewritten by hand or truncated."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(QUICK_BYTES))
        f.seek(max(path.stat().st_size - QUICK_BYTES, 0))
        h.update(f.read(QUICK_BYTES))
    return h.hexdigest()


def _make_index(out: Path, n_shards: int, settings: dict, without_behaviors: int) -> dict:
    shards, tasks = [], Counter()
    for k in range(n_shards):
        path = out / SUMMARIES / f"{k:06d}.json"
        summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else \
            _summarize(out / SHAR, k, settings["teacher_hidden"])
        tasks.update(summary.pop("tasks"))
        shards.append(summary)
    return {"format": FORMAT, "shards": shards, "cuts": sum(s["cuts"] for s in shards),
            "records": sum(s["records"] for s in shards), "tasks": dict(sorted(tasks.items())),
            "teacher_hidden": settings["teacher_hidden"], "without_behaviors": without_behaviors,
            "settings": settings}


