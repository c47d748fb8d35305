"""SPF macro-strings (RFC 7208 §7): the domain-spec's syntax, and macro expansion.

Contract: pure functions on text, no DNS and no Twisted. ``check_domain_spec(spec)`` raises
``SpfPermError`` unless a domain-spec ends as §7.1 requires. ``expand(text, values, in_exp,
limit)`` expands the macros of a domain-spec or an explanation from the letter values given
(the caller fetches ``p`` first, when ``needs_p(text)``), and raises ``SpfPermError`` for a
malformed macro (anywhere in the text, also past what is built), a count of 0 among them
(§7.1: "If a DIGIT is specified, the value MUST be nonzero"; pyspf 2.0.14 takes ``%{d0}`` for
all labels but the first, with the dot before them). An explanation is built only as far as
its first ``limit`` characters; a domain-spec's name still over 253 octets after §7.3's cut
(one label, longer than any DNS name has: it is never looked up) is given as its last 254.

The grammar follows pyspf 2.0.14 in strict mode (see ``spf_terms``): the regular expressions
below are pyspf's, except where pyspf's take quadratic time on a hostile record. Records come
from the sender's DNS and are read on the reactor, so every function here takes time linear
in its input. An explanation is built from the left and stops at ``limit`` characters (the
fact keeps 512): a 32 KB text of ``%{s}`` over a 2 KB sender built 8 MB and threw most of it
away. A domain-spec's expansion, of which §7.3's cut keeps 253 octets (or, given as its last
254, a longer last label), is built from the right and stops there: the macros left of the
cut are checked, never expanded, and each one expanded is for at most 255 characters of its
value (a 32 KB record of distinct reversed macros over a 2 KB sender took 0.4 s, one of a
long label without a dot 34 ms; now a few milliseconds).
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
    """(how many right-hand parts to keep, None for all; reversed; delimiters) of a checked
    macro's transformers (RFC 7208 §7.3; a count is never 0: ``expand`` refuses it). A count of
    10 digits or more is over the parts of any value (int() refuses 4,300 digits)."""
    digits, reverse, delimiters = _TRANSFORMERS.match(spec).groups()  # type: ignore[union-attr]
    count = digits.lstrip("0")
    return (int(count) if count and len(count) < 10 else None, reverse == "r",
            delimiters or ".")


def _zero_count(spec: str) -> bool:
    """Whether a macro's transformers have a count of 0, which RFC 7208 §7.1 forbids ("If a
    DIGIT is specified, the value MUST be nonzero"). pyspf 2.0.14 differs: it takes %{d0} for
    all labels but the first, with the dot before them; the RFC holds here."""
    digits = _TRANSFORMERS.match(spec)[1]  # type: ignore[index]
    return bool(digits) and not digits.lstrip("0")


def _transform(value: str, spec: str, joiner: str | None, keep: int | None = None) -> str:
    """RFC 7208 §7.3 transformers and delimiters, as pyspf applies them: the value split into
    parts and the delimiters between them, reversed with "r", the last DIGITS parts kept.
    With ``keep``, only the last ``keep`` characters of that, in time bounded by ``keep`` (and
    a search in C through one part)."""
    if not spec:
        return value if keep is None else value[-keep:]
    count, reverse, delimiters = _transformers(spec)
    pattern = _delimiter(delimiters)
    if keep is not None and keep < len(value):
        if not reverse:  # the last characters hold the parts the count keeps, or the last
            return _transform(value[-keep:], spec, joiner)
        # Reversed, the last characters are the first parts': taken until there are enough.
        taken: list[str] = []
        size = 0
        for index, element in enumerate(_elements(value, pattern, joiner)):
            if count is not None and index >= 2 * count - 1:
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


def _elements(value: str, pattern: re.Pattern[str], joiner: str | None) -> Iterator[str]:
    """The parts of ``value`` and the delimiters between them, from the left, one at a time."""
    position = 0
    for match in pattern.finditer(value):
        yield value[position:match.start()]
        yield joiner or match.group()
        position = match.end()
    yield value[position:]


@lru_cache(maxsize=64)
def _delimiter(delimiters: str) -> re.Pattern[str]:
    """Any one of ``delimiters``, as a group (a split keeps them), matched in C."""
    return re.compile(f"([{re.escape(delimiters)}])")


def _empty(value: str, spec: str) -> bool:
    """Whether a macro's transformers leave nothing of ``value`` (not empty): a count of 1
    with a delimiter at the end the parts are taken from."""
    if not spec:
        return False
    count, reverse, delimiters = _transformers(spec)
    return count == 1 and (value[0] if reverse else value[-1]) in delimiters


def expand(text: str, values: dict[str, str], in_exp: bool = False,
           limit: int | None = None) -> str:
    """Expand the macros of ``text`` (RFC 7208 §7.3). ``values`` maps each macro letter to its
    value; ``in_exp`` allows c, r and t and keeps a trailing dot (explanation text), of which
    ``limit`` keeps the first characters. A domain-spec (not ``in_exp``) keeps its right-hand
    labels within 253 octets (see the module docstring for a longer last label)."""
    if not in_exp and "%" not in text:  # most domain-specs: no macro, only the final dot goes
        name = text[:-1] if text.endswith(".") else text
        if len(name) <= _NAME_OCTETS:
            return name
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
        if text[start + 3] == "0" and _zero_count(text[start + 3:stop - 1]):
            raise SpfPermError("a macro's DIGIT must be nonzero", text[start:stop])
    if not in_exp:
        return _expand_name(text, macros, values)
    return _expand_text(text, macros, values, limit)


def _expand_text(text: str, macros: list[tuple[int, int]], values: dict[str, str],
                 limit: int | None) -> str:
    """The explanation ``text`` expanded, built from the left and only until it holds
    ``limit`` characters: the macros after them are never expanded."""
    out: list[str] = []
    size = end = 0
    seen: dict[str, str] = {}  # a macro written again expands the same
    for start, stop in macros:
        if limit is not None and size >= limit:
            break
        macro = text[start:stop]
        piece = seen.get(macro)
        if piece is None:
            piece = seen[macro] = _piece(macro, values, None)
        out += (text[end:start], piece)
        size += start - end + len(piece)
        end = stop
    else:
        out.append(text[end:])
    return "".join(out) if limit is None else "".join(out)[:limit]


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
    only as far as the cut can keep: once over 253 octets, the name's cut is that of what is
    built. A record of thousands of macros over a long sender costs a few."""
    built: list[str] = []  # right to left
    size = 0
    final_dot = False  # the final dot (dropped)

    def add(piece: str) -> bool:
        nonlocal size, final_dot
        if not piece:
            return False
        if not built:
            final_dot = piece.endswith(".")
        built.append(piece)
        size += len(piece)
        return size - final_dot > _NAME_OCTETS

    end = len(text)
    seen: dict[str, str] = {}  # a macro expanded in full: written again, expands the same
    for start, stop in reversed(macros):
        if add(text[stop:end]):
            break
        end = start
        macro = text[start:stop]
        piece = seen.get(macro)
        if piece is None:
            # Enough characters to pass 253 octets (a final dot dropped): then the cut keeps
            # what is built, or without a dot in it, a last label longer than any name's.
            keep = _NAME_OCTETS + 2 - size
            piece = _piece(macro, values, keep)
            if len(piece) < keep:
                seen[macro] = piece
        if add(piece):
            break
    else:
        add(text[:end])
    name = "".join(reversed(built))
    if name.endswith("."):
        name = name[:-1]
    name = name[_cut_at(name) + 1:]
    # Still over 253 octets: one label (RFC 7208 §4.3: no DNS name, never looked up), of
    # which what is built holds the last 254 octets or more.
    return name if len(name) <= _NAME_OCTETS else name[-_NAME_OCTETS - 1:]


def _cut_at(name: str) -> int:
    """Where RFC 7208 §7.3 cuts ``name``: the index of the dot ending the left-hand labels it
    drops, -1 for none. Dropping one label at a time while the name is over 253 octets and
    has a dot (copying the name each time: quadratic) ends at the first dot with at most 253
    octets after it, or else at the last dot."""
    if len(name) <= _NAME_OCTETS:
        return -1
    cut = name.find(".", len(name) - _NAME_OCTETS - 1)
    return cut if cut >= 0 else name.rfind(".")
