"""User errors on the command line: one line (the file, key or utterance it names), exit code 2.

A bad config key, a missing file, a bad manifest line or a folder in use is the user's to fix, and
a traceback only hides the message. ``guard`` runs a command and prints such an error as
``<prog>: error: <message>``; ``--debug`` or ``MTBI_FAST_DEBUG=1`` shows the traceback instead.
Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from .lock import FolderLockedError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, FolderLockedError)
DEBUG_ENV = "MTBI_FAST_DEBUG"


def debug_requested(debug_flag: bool = False) -> bool:
    return debug_flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def guard(run: Callable[[], int], prog: str = "mtbi-fast", debug: bool = False) -> int:
    """``run()``'s exit code, or 2 after one line on stderr for a user error."""
    try:
        return run()
    except USER_ERRORS as exc:
        if debug_requested(debug):
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def one_line(exc: BaseException) -> str:
    """The error's message on one line: its first line, and how many more lines it had (a
    manifest error lists every bad line; the command that validates prints them all)."""
    text = str(exc) if not isinstance(exc, (FileNotFoundError, PermissionError)) or not exc.filename \
        else f"{exc.strerror or exc}: {exc.filename}"
    lines = [ln for ln in text.splitlines() if ln.strip()] or [type(exc).__name__]
    more = len(lines) - 1
    suffix = f" (+{more} more line{'s' if more != 1 else ''}: run with --debug or {DEBUG_ENV}=1)" \
        if more else ""
    return lines[0] + suffix
