"""Untrusted text made safe for a reply or a log line: bounded, quoted characters escaped.

Contract: ``printable(text, limit=200)`` returns ``text`` cut to ``limit`` characters (with
``...`` when cut), every character outside printable ASCII, and ``"`` and ``\\``, escaped as
``\\xNN``/``\\uNNNN``/``\\UNNNNNNNN``, so the result can sit inside a double-quoted log value or
an SMTP reply. It never raises on any string. No I/O.
"""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str, limit: int = 200) -> str:
    """Untrusted text bounded to ``limit`` characters, non-printable ones escaped as \\xNN."""
    clipped = text[:limit]
    if clipped.isascii() and clipped.isprintable() and '"' not in clipped and "\\" not in clipped:
        return clipped if len(text) <= limit else clipped + "..."  # the common case, at C speed
    out = "".join(
        ch if (32 <= ord(ch) < 127 and ch not in '"\\') else _escape(ch) for ch in clipped
    )
    return out + ("..." if len(text) > limit else "")


def _escape(ch: str) -> str:
    if ch in '"\\':
        return "\\" + ch
    code = ord(ch)
    if code < 256:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 65536 else f"\\U{code:08x}"
