"""SPF macro-strings (RFC 7208 §7): the domain-spec's syntax, and macro expansion.

Contract: pure functions on text, no DNS and no Twisted. ``check_domain_spec(spec)`` raises
``SpfPermError`` unless a domain-spec ends as §7.1 requires. ``expand(text, values, in_exp)``
expands the macros of a domain-spec or an explanation from the letter values given (the caller
fetches ``p`` first, when ``needs_p(text)``), and raises ``SpfPermError`` for a malformed
macro.

The grammar follows pyspf 2.0.14 in strict mode (see ``spf_terms``): the regular expressions
below are pyspf's, except where pyspf's take quadratic time on a hostile record. Records come
from the sender's DNS and are read on the reactor, so every function here takes time linear
in its input (``expand`` of an explanation: in its text, and in the value of each distinct
macro in it). A domain-spec's expansion, of which §7.3's cut keeps 253 octets (or a longer
last label), is built from the right and stops there: the macros left of the cut are checked,
never expanded, and each one expanded is for at most 255 characters of its value (a 32 KB
record of distinct reversed macros over a 2 KB sender took 0.4 s; now a few milliseconds).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from urllib.parse import quote

from policyd_ipv6.checks.spf_terms import SpfPermError

__all__ = ["check_domain_spec", "needs_p", "expand"]

_BAD_MACRO = re.compile(r"(?<!%)%[^{%_-]|%$")
_TRANSFORMERS = re.compile(r"([0-9]*)(r?)([^0-9a-zA-Z]*)")
# RFC 7208 §7.1 toplabel: pyspf's [0-9a-z]*[a-z][0-9a-z]* | [0-9a-z]+-[0-9a-z-]*[0-9a-z],
# its first half written so that it cannot backtrack quadratically on a long label (the same
# labels: letters and digits, at least one letter).
_TOPLABEL = re.compile(r"[0-9]*[a-z][0-9a-z]*|[0-9a-z]+-[0-9a-z-]*[0-9a-z]", re.IGNORECASE)
# RFC 7208 §7.3: an expanded domain-spec keeps its right-hand labels within 253 octets.
_NAME_OCTETS = 253
# RFC 7208 §7.3: l and s are split on their delimiters and joined again with dots.
_JOINERS = {"l": ".", "s": "."}


def check_domain_spec(spec: str) -> None:
    """RFC 7208 §7.1: a domain-spec ends in "." toplabel ["."] or in a macro; SpfPermError if
    not. pyspf searches the whole spec with one expression, which backtracks quadratically on
    a long label (12 KB: 2 s of CPU); the last label alone is matched here, the same specs
    pass (and the empty one, which the caller refuses as empty)."""
    name = spec[:-1] if spec.endswith(".") else spec
    _, dot, label = name.rpartition(".")
    if not spec or (dot and _TOPLABEL.fullmatch(label)):
        return
    ends = [end for _, end in _macros(spec)]
    if not ends or ends[-1] != len(spec):
        raise SpfPermError("Invalid domain found (use FQDN)", spec)


def _macros(text: str) -> Iterator[tuple[int, int]]:
    r"""(start, end) of each macro in ``text``, left to right, as pyspf's
    ``%(%|_|-|(\{[^}]*\}))`` finds them, but in one pass: the expression looks for a "}"
    again from every "%{" that has none after it (16,000 of them: 0.5 s)."""
    closed = True  # whether a "}" may follow: false once a search for one failed
    start = text.find("%")
    while start >= 0:
        follower = text[start + 1:start + 2]
        end = -1
        if follower in ("%", "_", "-"):
            end = start + 2
        elif follower == "{" and closed:
            close = text.find("}", start + 2)
            closed = close >= 0
            if closed:
                end = close + 1
        if end < 0:
            start = text.find("%", start + 1)
        else:
            yield start, end
            start = text.find("%", end)


def needs_p(text: str) -> bool:
    """Whether expanding ``text`` needs the validated client name (the p macro)."""
    return any(text[start + 1:start + 3].lower() == "{p" for start, _ in _macros(text))


def _transformers(spec: str) -> tuple[int | None, bool, str]:
    """(how many right-hand parts to keep, None for all; reversed; delimiters) of a macro's
    transformers (RFC 7208 §7.3). A count of 0 keeps all parts but the first, as pyspf does;
    one of 10 digits or more is over the parts of any value (int() refuses 4,300 digits)."""
    digits, reverse, delimiters = _TRANSFORMERS.match(spec).groups()  # type: ignore[union-attr]
    count = digits.lstrip("0")
    return (int(count or "0") if digits and len(count) < 10 else None, reverse == "r",
            delimiters or ".")


def _transform(value: str, spec: str, joiner: str | None, keep: int | None = None) -> str:
    """RFC 7208 §7.3 transformers and delimiters, as pyspf applies them: the value split into
    parts and the delimiters between them, reversed with "r", the last DIGITS parts kept.
    With ``keep``, only the last ``keep`` characters of that, in time bounded by ``keep`` (and
    a search in C through one part, or through the value for a count of 0)."""
    if not spec:
        return value if keep is None else value[-keep:]
    count, reverse, delimiters = _transformers(spec)
    pattern = _delimiter(delimiters)
    if keep is not None and keep < len(value):
        if not reverse:
            # The last characters hold the parts the count keeps, or the last of them; but a
            # count of 0 keeps all the tail if a delimiter lies left of it.
            tail = value[-keep:]
            if count == 0 and pattern.search(value, 0, len(value) - keep):
                return "".join(_joined(pattern.split(tail), joiner))
            return _transform(tail, spec, joiner)
        # Reversed, the last characters are the first parts': taken until there are enough.
        taken: list[str] = []
        size = 0
        for index, (element, last) in enumerate(_elements(value, pattern, joiner)):
            if count is not None and (index >= 2 * count - 1 if count else last):
                break
            taken.append(element)
            size += len(element)
            if size >= keep:
                break
        return "".join(reversed(taken))[-keep:]
    parts = _joined(pattern.split(value), joiner)  # [part, delimiter, part, ..., part]
    if reverse:
        parts.reverse()
    if count is not None:
        parts = parts[-count * 2 + 1:]
    return "".join(parts) if keep is None else "".join(parts)[-keep:]


def _joined(parts: list[str], joiner: str | None) -> list[str]:
    """[part, delimiter, ..., part] with each delimiter replaced by ``joiner``, if any."""
    if joiner:
        parts[1::2] = [joiner] * (len(parts) // 2)
    return parts


def _elements(value: str, pattern: re.Pattern[str], joiner: str | None,
              ) -> Iterator[tuple[str, bool]]:
    """The parts of ``value`` and the delimiters between them, from the left, one at a time,
    each with whether it is the last part."""
    position = 0
    for match in pattern.finditer(value):
        yield value[position:match.start()], False
        yield joiner or match.group(), False
        position = match.end()
    yield value[position:], True


@lru_cache(maxsize=64)
def _delimiter(delimiters: str) -> re.Pattern[str]:
    """Any one of ``delimiters``, as a group (a split keeps them), matched in C."""
    return re.compile(f"([{re.escape(delimiters)}])")


@lru_cache(maxsize=16)
def _characters(value: str) -> frozenset[str]:
    """The characters in ``value`` (the macro values of one evaluation, asked again and again)."""
    return frozenset(value)


def _empty(value: str, spec: str) -> bool:
    """Whether a macro's transformers leave nothing of ``value`` (not empty): a count of 0
    without a delimiter in it, or of 1 with one at the end the parts are taken from."""
    if not spec:
        return False
    count, reverse, delimiters = _transformers(spec)
    if count == 0:
        return _characters(value).isdisjoint(delimiters)
    return count == 1 and (value[0] if reverse else value[-1]) in delimiters


def expand(text: str, values: dict[str, str], in_exp: bool = False) -> str:
    """Expand the macros of ``text`` (RFC 7208 §7.3). ``values`` maps each macro letter to its
    value; ``in_exp`` allows c, r and t and keeps a trailing dot (explanation text). A
    domain-spec (not ``in_exp``) keeps its right-hand labels within 253 octets."""
    if "%" in text and _BAD_MACRO.search(text):
        raise SpfPermError("invalid-macro-char ", text)
    macros = list(_macros(text))
    for start, stop in macros:  # each macro checked, in the order written
        if text[start + 1] != "{":
            continue
        letter = text[start + 2].lower()
        if letter in "crt" and not in_exp:
            raise SpfPermError("c,r,t macros allowed in exp= text only", text[start:stop])
        if not (letter.isalpha() and values.get(letter) is not None):
            raise SpfPermError("Unknown Macro Encountered", text[start:stop])
    if not in_exp:
        return _expand_name(text, macros, values)
    out: list[str] = []
    end = 0
    seen: dict[str, str] = {}  # a macro written again expands the same
    for start, stop in macros:
        macro = text[start:stop]
        piece = seen.get(macro)
        if piece is None:
            piece = seen[macro] = _piece(macro, values, None)
        out += (text[end:start], piece)
        end = stop
    out.append(text[end:])
    return "".join(out)


def _piece(macro: str, values: dict[str, str], keep: int | None) -> str:
    """What one checked macro expands to, or its last ``keep`` characters."""
    if macro[1] != "{":
        piece = {"%": "%", "_": " ", "-": "%20"}[macro[1]]
        return piece if keep is None else piece[-keep:]
    letter = macro[2].lower()
    value = values[letter]
    if not value or (keep is not None and _empty(value, macro[3:-1])):
        return ""
    piece = _transform(value, macro[3:-1], _JOINERS.get(letter), keep)
    if letter != macro[2]:  # URL-encoded, character by character: the last stay the last
        piece = quote(piece, "~")[-keep:] if keep is not None else quote(piece, "~")
    return piece


def _expand_name(text: str, macros: list[tuple[int, int]], values: dict[str, str]) -> str:
    """The domain-spec ``text`` expanded and cut (see ``_cut_at``), built from the right and
    only as far as the cut can keep: once over 253 octets with a dot, the name's cut is that
    of what is built. A record of thousands of macros over a long sender costs a few."""
    built: list[str] = []  # right to left
    size = 0
    final_dot = dotted = False  # the final dot (dropped), a dot before it

    def add(piece: str) -> bool:
        nonlocal size, final_dot, dotted
        if not piece:
            return False
        if not built:
            final_dot = piece.endswith(".")
        built.append(piece)
        size += len(piece)
        dotted = dotted or "." in (piece[:-1] if final_dot and len(built) == 1 else piece)
        return dotted and size - final_dot > _NAME_OCTETS

    end = len(text)
    seen: dict[str, str] = {}  # a macro expanded in full: written again, expands the same
    for start, stop in reversed(macros):
        if add(text[stop:end]):
            break
        end = start
        macro = text[start:stop]
        piece = seen.get(macro)
        if piece is None:
            # Enough characters to pass 253 octets (a final dot dropped), or all of them once
            # past that without a dot: the cut keeps all of the last label (RFC 7208 §7.3).
            keep = _NAME_OCTETS + 2 - size if size <= _NAME_OCTETS + 1 else None
            piece = _piece(macro, values, keep)
            if keep is None or len(piece) < keep:
                seen[macro] = piece
            elif not dotted and "." not in piece[:-1 if not built else None]:
                piece = seen[macro] = _piece(macro, values, None)
        if add(piece):
            break
    else:
        add(text[:end])
    name = "".join(reversed(built))
    if name.endswith("."):
        name = name[:-1]
    return name[_cut_at(name) + 1:]


def _cut_at(name: str) -> int:
    """Where RFC 7208 §7.3 cuts ``name``: the index of the dot ending the left-hand labels it
    drops, -1 for none. Dropping one label at a time while the name is over 253 octets and
    has a dot (copying the name each time: quadratic) ends at the first dot with at most 253
    octets after it, or else at the last dot."""
    if len(name) <= _NAME_OCTETS:
        return -1
    cut = name.find(".", len(name) - _NAME_OCTETS - 1)
    return cut if cut >= 0 else name.rfind(".")
