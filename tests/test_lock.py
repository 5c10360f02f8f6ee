"""mtbi_fast/lock.py: one writer per folder, the holder named, a killed holder's lock taken over."""

import os
import signal
import subprocess
import sys
import time

import pytest

from mtbi_fast.lock import FolderLock, FolderLockedError

HOLD = """
import sys, time
from mtbi_fast.lock import FolderLock
FolderLock(sys.argv[1], "training").acquire()
print("held", flush=True)
time.sleep(60)
"""


def hold_in_child(folder):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_second_writer_fails_naming_the_holder(tmp_path):
    child = hold_in_child(tmp_path / "run")
    try:
        with pytest.raises(FolderLockedError, match=rf"run is in use by process {child.pid} on "
                                                    r".*\(training, since .*\.lock"):
            FolderLock(tmp_path / "run", "behaviors").acquire()
    finally:
        child.kill()
        child.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    child = hold_in_child(tmp_path / "run")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert (tmp_path / "run" / ".lock").exists()  # the file stays, the lock does not
    with FolderLock(tmp_path / "run", "training") as lock:
        assert f'"pid": {os.getpid()}' in lock.path.read_text()


def test_released_lock_can_be_taken_again(tmp_path):
    with FolderLock(tmp_path, "a"):
        pass
    with FolderLock(tmp_path, "b"):
        with pytest.raises(FolderLockedError, match=rf"process {os.getpid()} .*\(b, since"):
            FolderLock(tmp_path, "c").acquire()
    start = time.monotonic()
    FolderLock(tmp_path, "d").acquire().release()
    assert time.monotonic() - start < 1.0  # non-blocking
