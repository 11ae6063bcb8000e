"""Atomic file writes: a crash never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

from .errors import ExistingOutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        share_file(tmp)  # mkstemp (and safetensors) create 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write ``data`` as indented JSON atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, parameter: str = "output_dir") -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it takes ``path``'s place.

    An existing ``path`` is refused unless ``overwrite`` (then it is replaced only once the new folder is
    complete). On an error the temporary folder is removed and ``path`` is left as it was.
    """
    import shutil

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise ExistingOutputError(f"`{parameter}` {path!r} already exists; choose a new folder or pass `overwrite`")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
        share_tree(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def share_file(path: str | os.PathLike) -> None:
    """Give a written file the permissions a plain ``open()`` would (0644 under umask 022).

    safetensors' ``save_file`` creates 0600 files: the adapter and merged weights were private while
    every other output was readable.
    """
    os.chmod(path, 0o666 & ~_umask())


def share_tree(folder: str | os.PathLike) -> None:
    """``share_file`` on every file under ``folder``; folders get 0777 & ~umask (mkdtemp makes them 0700)."""
    os.chmod(folder, 0o777 & ~_umask())
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~_umask())
        for name in files:
            share_file(os.path.join(root, name))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
