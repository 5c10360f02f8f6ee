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


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """Exclusive, non-blocking lock of ``folder`` (created if missing) for one job."""

    def __init__(self, folder: str | os.PathLike, job: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.job = job
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
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
