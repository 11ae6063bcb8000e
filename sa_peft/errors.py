"""Which exceptions are the user's input and how they are reported: one line, no traceback.

Input errors are what sa-peft raises after checking a flag, a file or a folder: ``ValueError`` and the
``OSError`` kinds that name a path (missing, existing, a file where a folder belongs, not writable).
Everything else (``TypeError``, ``RuntimeError``, ``KeyError``, ...) is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def input_error_line(prog: str, err: BaseException) -> str:
    """The one line printed for an input error: ``<prog>: error: <message>``."""
    return f"{prog}: error: {err}"


def report_input_errors(prog: str, func, *args, **kwargs) -> int:
    """Run ``func``; an input error prints one line on stderr and returns 2, a bug propagates."""
    try:
        func(*args, **kwargs)
    except INPUT_ERRORS as err:
        print(input_error_line(prog, err), file=sys.stderr)
        return 2
    return 0
