"""Reading a user-supplied safetensors file's header, with an error that names the flag it came from."""

from __future__ import annotations

from safetensors import SafetensorError, safe_open

from .errors import InputError


def read_safetensors_header(path: str, parameter: str, hint: str = "") -> dict[str, str]:
    """The header metadata of ``path``; a ``ValueError`` naming ``flag`` (and ``hint``) when it is not safetensors."""
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as err:
        raise InputError(f"`{parameter}` {path!r} is not a valid safetensors file ({err})" + (f"; {hint}" if hint else "")) from None
