"""One run per output folder: a lock file naming the run that holds it, taken over when that run is gone.

Two runs with one ``--output_dir`` both exited 0 with their checkpoints, log and adapter mixed, and
``--resume_from_checkpoint latest`` resumed one run from the other. The lock is a file created with
``O_EXCL`` holding the owner's PID, host, start time and the kernel's start tick of that PID; a lock
whose PID is gone (kill -9), or now belongs to another process (PID reuse: the start tick differs), is
stale and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator

from .errors import ExistingOutputError

LOCK_NAME = ".sa-peft.lock"
TEMP_PREFIXES = (".tmp-", ".old-")


class RunLockedError(ExistingOutputError):
    """Another live run holds the folder."""


def _process_start_tick(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks since boot); ``None`` where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the process that wrote ``owner`` still runs (on this host; another host's lock counts as live)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    tick = _process_start_tick(pid)
    return tick is None or owner.get("start_tick") in (None, tick)


def _read_owner(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as stale


def _try_create(path: str, owner: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(owner, f)
    return True


def acquire(lock_path: str, parameter: str) -> dict:
    """Create ``lock_path`` for this process; refuse (``RunLockedError``) when a live run holds it."""
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start_tick": _process_start_tick(os.getpid()),
             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for _ in range(3):
        if _try_create(lock_path, owner):
            return owner
        held = _read_owner(lock_path)
        if _alive(held) and held:
            folder = os.path.dirname(lock_path) or "."
            raise RunLockedError(
                f"`{parameter}` {folder!r} is in use by another sa-peft run (PID {held.get('pid')} on {held.get('host')}, "
                f"started {held.get('started')}); wait for it to end or choose another `{parameter}`. If that run is gone, "
                f"delete {lock_path!r}")
        with contextlib.suppress(FileNotFoundError):  # stale: the owner was killed; take it over
            os.remove(lock_path)
    raise RunLockedError(f"`{parameter}`: could not take the lock {lock_path!r}; another run keeps taking it")


def release(lock_path: str, owner: dict) -> None:
    """Remove the lock if it is still ours."""
    if _read_owner(lock_path) == owner:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)


def remove_leftover_temporaries(folder: str, max_depth: int = 3) -> list[str]:
    """Delete ``.tmp-*`` / ``.old-*`` files and folders that a killed run left in ``folder`` and up to
    ``max_depth`` levels below (``cache/<set>/images`` is the deepest sa-peft writes). Call it holding the
    lock: then no other run can be writing them. Returns what was removed."""
    removed = []
    top = os.path.abspath(folder).rstrip(os.sep).count(os.sep)
    for root, dirs, files in os.walk(folder):
        if os.path.abspath(root).rstrip(os.sep).count(os.sep) - top >= max_depth:
            dirs[:] = []
        for name in [*dirs, *files]:
            if name.startswith(TEMP_PREFIXES):
                path = os.path.join(root, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                removed.append(path)
        dirs[:] = [d for d in dirs if not d.startswith(TEMP_PREFIXES)]
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, parameter: str, clean: bool = True, enabled: bool = True) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; with ``clean``, first remove leftover temporaries in it.

    ``enabled=False`` (non-main processes of a distributed run) makes it a no-op: the main process
    holds the lock for all of them.
    """
    if not enabled:
        yield
        return
    folder = os.fspath(folder)
    lock_path = os.path.join(folder, LOCK_NAME)
    owner = acquire(lock_path, parameter)
    try:
        if clean:
            remove_leftover_temporaries(folder)
        yield
    finally:
        release(lock_path, owner)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, parameter: str) -> Iterator[None]:
    """Hold a lock beside the file ``path`` (``<path>.lock``) for the block, e.g. a shared Fisher file."""
    lock_path = os.fspath(path) + ".lock"
    owner = acquire(lock_path, parameter)
    try:
        yield
    finally:
        release(lock_path, owner)
