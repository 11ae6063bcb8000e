"""Early checks of user input: numbers finite and in range, outputs apart from inputs and writable.

Each check raises ``ValueError`` (or ``PermissionError``) naming the flag and what to change, so a bad
value stops the run before any model is loaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from .errors import InputError, UnwritableOutputError


def check_number(value, parameter: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """``value`` must be finite and inside ``[low, high]`` (``(low, …`` with ``low_open``); ``None`` passes.

    ``nan`` fails every comparison, so a plain ``value > 0`` test lets it through (``--ewc_lambda nan``
    silently turned EWC off); finiteness is checked first.
    """
    if value is None:
        return
    if not math.isfinite(value):
        raise InputError(f"`{parameter}` must be a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise InputError(f"`{parameter}` must be in {span}, got {value}")


def check_positive_int(value, parameter: str) -> None:
    """A count (steps, images, rank): a positive integer; ``None`` passes."""
    if value is not None and value <= 0:
        raise InputError(f"`{parameter}` must be a positive integer, got {value}")


def check_numbers(args, rules: dict[str, dict]) -> None:
    """Apply ``check_number`` to each ``args.<name>`` with its rule (``{"low": 0, "low_open": True}``, ...)."""
    for name, rule in rules.items():
        check_number(getattr(args, name), name, **rule)


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_apart(output: str | os.PathLike, output_parameter: str,
                       inputs: Iterable[tuple[str, str | os.PathLike | None]], allow_inside: bool = False) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (``(flag, path)`` pairs).

    ``--overwrite`` replaces the output folder, so an output equal to (or holding) an input would delete
    it: ``sa-peft merge --lora D --output_dir D --overwrite`` deleted the training folder D. Paths are
    compared after resolving symlinks; inputs that are not local paths (hub ids) are skipped.
    ``allow_inside`` accepts an output inside an input folder (``sa-peft evaluate --lora RUN --output_dir
    RUN/evaluation`` is how the model card finds the evaluation).
    """
    out = _real(output)
    for parameter, path in inputs:
        if path is None or not os.path.exists(path):
            continue
        src = _real(path)
        if out == src:
            relation = "is"
        elif _inside(src, out):
            relation = "contains"
        elif _inside(out, src) and os.path.isdir(src) and not allow_inside:
            relation = "lies inside"
        else:
            continue
        raise InputError(f"`{output_parameter}` {os.fspath(output)!r} {relation} the input `{parameter}` {os.fspath(path)!r}; "
                         f"choose an `{output_parameter}` outside the inputs")


def check_writable(path: str | os.PathLike, parameter: str) -> None:
    """The nearest existing folder at or above ``path`` must be writable (checked before the work)."""
    folder = os.path.abspath(os.fspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if os.path.isfile(folder) and folder != os.path.abspath(os.fspath(path)):
        raise InputError(f"`{parameter}` {os.fspath(path)!r}: {folder!r} is a file, not a folder; choose another path")
    if os.path.isfile(folder):
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UnwritableOutputError(f"`{parameter}` {os.fspath(path)!r}: cannot write in {folder!r}; choose a writable location")
