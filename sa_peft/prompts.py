"""Reading and checking prompt lists."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .errors import InputError, MissingInputError


def read_prompts_file(path: str | os.PathLike, parameter: str) -> list[str]:
    """One prompt per line; blank lines are skipped. ``flag`` names the option in error messages."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"`{parameter}` {path!r} does not exist; give a text file with one prompt per line")
    try:
        with open(path, encoding="utf-8-sig") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as err:
        raise InputError(f"`{parameter}` {path!r} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if any("\x00" in p for p in prompts):  # UTF-16 without a byte-order mark decodes as UTF-8 with NULs
        raise InputError(f"`{parameter}` {path!r} holds NUL characters (UTF-16 text?); save it as UTF-8")
    if not prompts:
        raise InputError(f"`{parameter}` {path!r} has no prompts; write one prompt per line")
    return prompts


def check_prompts(prompts: Sequence[str], parameter: str) -> list[str]:
    """Strip prompts and reject an empty list or empty prompts, naming ``flag``."""
    cleaned = [p.strip() for p in prompts]
    if not cleaned:
        raise InputError(f"`{parameter}`: no prompts given")
    if any(not p for p in cleaned):
        raise InputError(f"`{parameter}`: empty prompt in the list")
    return cleaned
