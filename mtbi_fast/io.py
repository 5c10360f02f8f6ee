"""Small file helpers shared by the modules that write results: atomic writes, file hashes,
moving a folder's contents aside, seeds derived from a run seed and a key."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place: a reader
    never sees a half-written file, and a crash leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_files(paths, *, names: bool = False, separator: bytes = b"", digest_each: bool = False) -> str:
    """sha256 over ``paths`` in order, each file read in 4 MiB blocks. Per file: its name and a NUL
    first when ``names``; then its bytes (or, with ``digest_each``, the sha256 digest of its
    bytes); then ``separator``. The formats recorded in run, behaviors and shard folders are
    fixed combinations of these (a change would make every recorded fingerprint differ)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        if names:
            h.update(p.name.encode() + b"\0")
        inner = hashlib.sha256() if digest_each else h
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                inner.update(block)
        if digest_each:
            h.update(inner.digest())
        h.update(separator)
    return h.hexdigest()


def sha256_and_lines(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256 of the file's bytes, its number of newlines), in one read."""
    h, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            lines += block.count(b"\n")
    return h.hexdigest(), lines


def move_aside(folder: Path, *, first: str | None = None, keep=lambda p: False) -> Path:
    """Move what ``folder`` holds (but the entries ``keep(path)`` is true for) into a new sibling
    ``<folder>.replaced-<time>`` (``-2``, ``-3``, ... when taken), the entry named ``first`` before
    the others (so that a move cut short leaves what would be mistaken for a whole folder behind
    last); returns the new folder. A move that fails is a ``ValueError`` naming both paths."""
    folder = Path(folder)
    base = folder.parent / f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    dest, k = base, 1
    while dest.exists():
        k += 1
        dest = base.with_name(f"{base.name}-{k}")
    dest.mkdir()
    entries = sorted((p for p in folder.iterdir() if not keep(p)), key=lambda p: (p.name != first, p.name))
    for p in entries:
        try:
            os.rename(p, dest / p.name)
        except OSError as exc:
            raise ValueError(f"cannot move {p} aside to {dest} ({exc.strerror or exc}); move it away "
                             f"yourself or use another folder") from None
    return dest


def derived_seed(seed: int, key: str) -> int:
    """A 64-bit seed of its own for ``key`` under the run seed ``seed`` (independent of what ran
    before: plans, splits and sampling are the same whichever part runs first, and whatever else
    exists)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
