"""Worker processes that never outlive the process that started them.

A pool worker of ``mtbi-fast shard --workers N``, ``corpus build --workers N`` or ``align --workers
N`` holds a model or a synthesizer (hundreds of MB) and writes into the output folder. If the
parent is killed (``kill -9``, the OOM killer), nothing tells a ``ProcessPoolExecutor``'s workers:
they would go on writing into a folder whose lock the parent no longer holds, next to a rerun
that does. ``die_with_parent`` (a pool initializer, or the first call of one) asks the Linux kernel
to kill the worker when its parent dies (``PR_SET_PDEATHSIG``) and exits at once if the parent is
already gone. Elsewhere (not Linux) it is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Make this process receive SIGKILL when its parent exits; exit now if ``parent_pid`` (the
    pid of the process that started this one) is no longer its parent."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # (not allowed here: the pool's own shutdown still applies)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def pool_initializer(parent_pid: int, then=None, *args) -> None:
    """A pool ``initializer``: ``die_with_parent(parent_pid)``, then ``then(*args)``."""
    die_with_parent(parent_pid)
    if then is not None:
        then(*args)
