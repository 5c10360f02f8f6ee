"""One writer per folder: an exclusive lock on ``<folder>/.lock`` for as long as a job writes there.

    with FolderLock(output_dir, "training"):
        ...

The lock is a ``flock`` on the file, so the kernel releases it when the holder dies, however it
dies (kill -9 included): a lock left by a killed process is stale by construction and the next
job takes it over. The file holds the holder's pid, host and job, so a second job started into
the same folder fails at once with an error that names them.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"
RANKS_LOCK = LOCK_NAME + ".ranks"  # shared by the working ranks > 0; exclusive to move files aside
RANKS_LOCK_PATIENCE_S = 10.0  # how long a rank > 0 waits out an exclusive .lock.ranks


def rank_lock_name(rank: int) -> str:
    """The lock file of rank ``rank`` of a launch (``FolderLock(..., name=rank_lock_name(r))``)."""
    return f"{LOCK_NAME}.rank-{rank:05d}"


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """Exclusive, non-blocking lock of ``folder`` (created if missing) for one job, on the file
    ``name`` in it (``.lock``; a rank of a launch takes its own, ``rank_lock_name``)."""

    def __init__(self, folder: str | os.PathLike, job: str, name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.job = job
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd, fcntl.LOCK_EX, 0.0):
            holder = describe_lock(self.path)
            os.close(fd)
            raise FolderLockedError(
                f"{self.folder} is in use by {holder} (lock file {self.path}); wait for it to "
                f"finish or stop it, or use another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), job=self.job,
                                     since=time.strftime("%Y-%m-%dT%H:%M:%S"))).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RanksLock:
    """``flock`` on ``<folder>/.lock.ranks``: shared (``fcntl.LOCK_SH``) by the working ranks > 0
    of a launch, exclusive (``LOCK_EX``) for a single process while it works and for moving a
    folder aside. A shared lock waits out an exclusive one ``patience_s`` seconds (rank 0 holds it
    while it writes a new plan); an exclusive one does not wait."""

    def __init__(self, folder: str | os.PathLike, mode: int, patience_s: float | None = None):
        self.folder, self.mode, self._fd = Path(folder), mode, None
        self.path = self.folder / RANKS_LOCK
        self.patience_s = (RANKS_LOCK_PATIENCE_S if patience_s is None else patience_s) \
            if mode == fcntl.LOCK_SH else 0.0

    def __enter__(self) -> "RanksLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd, self.mode, self.patience_s):
            os.close(fd)
            raise FolderLockedError(
                f"{self.folder} is in use by {self._holders()} (lock file {self.path}); wait for it "
                "to finish or stop it, or use another folder")
        self._fd = fd
        return self

    def _holders(self) -> str:
        if self.mode == fcntl.LOCK_SH:  # a single process, or rank 0 moving files aside
            return describe_lock(self.folder / LOCK_NAME)
        ranks = []
        for p in sorted(self.folder.glob(LOCK_NAME + ".rank-*")):
            fd = os.open(p, os.O_RDONLY)
            try:
                if not _flock(fd, fcntl.LOCK_SH, 0.0):
                    ranks.append(describe_lock(p))
            finally:
                os.close(fd)
        return "the ranks of a launch: " + ("; ".join(ranks) or "(ranks unknown)")

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _flock(fd: int, mode: int, patience_s: float) -> bool:
    """Take ``flock(fd, mode)`` without blocking, retrying for ``patience_s`` seconds; whether it
    was taken."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def describe_lock(path: Path) -> str:
    """"process 1234 on host (training, since ...)" from a lock file, as far as it reads."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not info:
        return "another process"
    return (f"process {info.get('pid')} on {info.get('host')} ({info.get('job')}, since "
            f"{info.get('since')})")
