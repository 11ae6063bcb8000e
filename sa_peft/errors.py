"""The project's input errors, and how the command line reports them: one line, no traceback.

An ``InputError`` is what sa-peft raises after checking a value, a file or a folder the caller gave; its
message says what to change. The library names what it checked as the caller's parameter, in backquotes
(```fisher_num_timesteps` must be in 1..1000``); the command line (``sa-peft``, ``train_sa_lora.py``)
prints the same message with each parameter it has a flag for written as that flag
(``--fisher_num_timesteps must be in 1..1000``). Path problems are also the matching ``OSError`` kind, so
``except FileNotFoundError`` keeps working for library users.

Only these are caught by the command line: a ``ValueError``, ``TypeError`` or ``OSError`` from anywhere else
is a bug (or a failure the project did not foresee) and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterable, Mapping

__all__ = ["ExistingOutputError", "InputError", "MissingDependencyError", "MissingInputError", "UnwritableOutputError",
           "flags_of", "input_errors_as_flags", "report_input_errors", "with_flags"]


class InputError(ValueError):
    """A parameter, file or folder the caller gave is wrong; the message names it and says what to change."""


class MissingInputError(InputError, FileNotFoundError):
    """An input path (a model folder, a data folder, a file to read) does not exist."""


class ExistingOutputError(InputError, FileExistsError):
    """An output path exists and would be overwritten (or is held by another run)."""


class UnwritableOutputError(InputError, PermissionError):
    """An output path cannot be written."""


class MissingDependencyError(InputError, ImportError):
    """An optional package a parameter needs is not installed (or cannot work on this machine)."""


_PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def flags_of(parsers: Iterable[argparse.ArgumentParser]) -> dict[str, str]:
    """``{parameter: flag}`` for every argument of ``parsers``: its ``dest`` and first long option, or for a
    positional argument its name as ``--help`` shows it."""
    flags: dict[str, str] = {}
    for parser in parsers:
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if action.dest in ("help", "version") or isinstance(action, argparse._SubParsersAction):
                continue
            if longs:
                flags.setdefault(action.dest, longs[0])
            elif not action.option_strings:
                flags.setdefault(action.dest, action.metavar if isinstance(action.metavar, str) else action.dest)
    return flags


def with_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with each backquoted parameter that has a flag written as the flag; other quotes stay."""
    return _PARAMETER.sub(lambda m: flags.get(m.group(1), m.group(0)), message)


@contextlib.contextmanager
def input_errors_as_flags(flags: Mapping[str, str]):
    """Inside, an ``InputError`` is re-raised (same class, same traceback) with its parameters written as
    ``flags``: for a command-line entry point that is also called as a function (``main(argv)``)."""
    try:
        yield
    except InputError as err:
        raise type(err)(with_flags(str(err), flags)).with_traceback(err.__traceback__) from None


def report_input_errors(prog: str, func, *args, **kwargs) -> int:
    """Run ``func``; an ``InputError`` prints ``<prog>: error: <message>`` on stderr and returns 2 (``func``
    names the flags, e.g. inside ``input_errors_as_flags``). Anything else propagates with its traceback."""
    try:
        func(*args, **kwargs)
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
