"""Showing untrusted strings (header metadata, prompts) without letting them act.

A safetensors header or a prompt is text anyone can write: printed raw it can move the cursor or
recolour the terminal (escape sequences), forge extra lines (newlines), break a Markdown table (``|``)
or, pasted into a Python snippet, become code.
"""

from __future__ import annotations

import json
import unicodedata

# Cc: C0/C1 controls (ESC, CR, LF, DEL, ...); Cf: format characters (bidi overrides); Zl/Zp: line separators.
_UNSAFE_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")


def _escape_char(c: str) -> str:
    code = ord(c)
    if c in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_controls(text: str) -> str:
    """``text`` with every control, format and line-separator character written as a visible escape."""
    return "".join(_escape_char(c) if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in str(text))


def safe_json(data) -> str:
    """Indented JSON whose strings cannot carry a raw control character (JSON escapes only C0 ones itself)."""
    return _escape_unsafe(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))


def _escape_unsafe(text: str) -> str:
    """JSON text with the unsafe characters JSON leaves raw (DEL, C1, bidi, U+2028) as four-hex-digit ``\\u`` escapes."""
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in _UNSAFE_CATEGORIES and c != "\n" else c
                   for c in text)


def python_literal(text: str) -> str:
    """A double-quoted Python string literal of ``text`` (repr-style escapes), safe to paste into a snippet.

    JSON's string escapes are all valid in Python; controls and format characters are escaped too.
    """
    return _escape_unsafe(json.dumps(str(text), ensure_ascii=False))


def markdown_cell(text: str) -> str:
    """``text`` for one Markdown table cell: controls escaped (no line breaks) and ``|`` escaped."""
    return escape_controls(text).replace("|", "\\|")


def markdown_code(text: str) -> str:
    """``text`` as inline Markdown code: controls escaped; a run of backticks inside gets a longer fence."""
    text = escape_controls(text)
    longest, run = 0, 0
    for c in text:
        run = run + 1 if c == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
