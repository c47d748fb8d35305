"""Which incoming Authentication-Results headers claim our authserv-id (RFC 8601 §2.2, §5).

Contract: pure functions on one header's name and value; no I/O, no Twisted, never raises
on any input.

- ``is_authres(name)``: the header name is Authentication-Results (any case).
- ``authserv_id(value)``: the authserv-id the value claims, normalised for comparison
  (case folded, one trailing dot dropped), or ``None`` when the value cannot be parsed.
- ``claims(value, ours)``: whether the header must be deleted as a forgery: its authserv-id
  is ours, or it cannot be parsed and ours appears in it as a token.
- ``forged_authres(ours)``: ``claims`` as a ``(name, value) -> bool`` predicate for the
  milter session, which marks such headers as they arrive (see ``MilterSession``).

The grammar (RFC 8601 §2.2, with RFC 5322 §3.2.2 CFWS and RFC 2045 tokens)::

    authres-payload = [CFWS] authserv-id [CFWS authres-version] (no-result / 1*resinfo)
    authserv-id     = value = token / quoted-string     ; RFC 2045
    comment         = "(" *([FWS] ccontent) [FWS] ")"   ; ccontent: ctext, quoted-pair, comment

So ``(a\\) b)mx.example.com; dkim=pass`` and ``((((x))))mx.example.com; ...`` claim
``mx.example.com`` (a quoted pair and nesting inside comments), as does
``"mx.example.com."; none``. A regular expression that strips "(...)" gets these wrong.

Why an unparseable value with our id in it is deleted: a receiver downstream may parse
more leniently than RFC 8601 and read our id there; keeping such a header would let a sender
forge a result in our name. Deleting a header that only looks like ours costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["is_authres", "authserv_id", "claims", "forged_authres", "AR_NAME"]

AR_NAME = "Authentication-Results"
_AR_KEY = AR_NAME.lower().encode()
# RFC 2045 token: any US-ASCII CHAR except SPACE, CTLs and tspecials. Bytes above 127 are
# let in too (RFC 6532 allows UTF-8 in header values; they never make our id match).
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
_FWS = " \t\r\n"
_WORD = re.compile(r"[^\s()<>@,;:\\\"/\[\]?=]+")  # token-like runs, for the fallback
_MAX_DEPTH = 100  # deeper comment nesting is treated as unparseable (bounded recursion)


class _Unparseable(Exception):
    pass


def is_authres(name: bytes) -> bool:
    """Whether a header name is Authentication-Results (Postfix matches names in any case)."""
    return name.strip().lower() == _AR_KEY


def _normal(ident: str) -> str:
    # Case does not matter in an authserv-id (a domain name in practice), nor does the
    # trailing dot of a fully qualified name.
    ident = ident.casefold()
    return ident[:-1] if ident.endswith(".") else ident


def _skip_cfws(text: str, i: int) -> int:
    """The index after any folding white space and comments starting at ``i``."""
    while i < len(text):
        if text[i] in _FWS:
            i += 1
        elif text[i] == "(":
            i = _skip_comment(text, i)
        else:
            break
    return i


def _skip_comment(text: str, i: int) -> int:
    """``text[i]`` is "("; the index after the matching ")" (quoted pairs and nesting)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # quoted-pair: the next character, whatever it is, is comment text
            continue
        if c == "(":
            depth += 1
            if depth > _MAX_DEPTH:
                raise _Unparseable("comments nested too deep")
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise _Unparseable("unterminated comment")


def _quoted(text: str, i: int) -> tuple[str, int]:
    """``text[i]`` is '"'; the unquoted content and the index after the closing quote."""
    out = []
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        if c not in "\r\n":  # folding inside a quoted-string is not part of the value
            out.append(c)
        i += 1
    raise _Unparseable("unterminated quoted-string")


def _token(text: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(text) and text[i] not in _TSPECIALS and text[i] not in _FWS \
            and text[i].isprintable():
        i += 1
    if i == start:
        raise _Unparseable("no authserv-id")
    return text[start:i], i


def _parse(text: str) -> str:
    i = _skip_cfws(text, 0)
    if i < len(text) and text[i] == '"':
        ident, i = _quoted(text, i)
    else:
        ident, i = _token(text, i)
    i = _skip_cfws(text, i)
    start = i
    while i < len(text) and text[i].isdigit():  # authres-version
        i += 1
    if i > start:
        i = _skip_cfws(text, i)
    # What follows the id is ";" (a result or "none"); anything else is not RFC 8601.
    if i >= len(text) or text[i] != ";" or not ident:
        raise _Unparseable("no ';' after the authserv-id")
    return _normal(ident)


def authserv_id(value: bytes | str) -> str | None:
    """The normalised authserv-id of an Authentication-Results value, or None if the value
    is not RFC 8601 up to the first ";"."""
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    try:
        return _parse(text)
    except _Unparseable:
        return None


def claims(value: bytes | str, ours: str) -> bool:
    """Whether an Authentication-Results value claims ``ours`` (see the module docstring)."""
    ours = _normal(ours)
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    try:
        return _parse(text) == ours
    except _Unparseable:
        return any(_normal(word) == ours for word in _WORD.findall(text))


def forged_authres(ours: str) -> Callable[[bytes, bytes], bool]:
    """A ``(name, value) -> bool`` predicate: an Authentication-Results header claiming
    ``ours``."""
    return lambda name, value: is_authres(name) and claims(value, ours)
