"""The syntax of SPF records (RFC 7208 §4.6, §5, §7): terms, CIDR lengths and macros.

Contract: pure functions on text, no DNS and no Twisted. ``parse_term(term, domain, v6)``
checks one directive and returns a ``Mechanism`` (its domain-spec still unexpanded), or raises
``SpfPermError``; ``modifier(term)`` splits a modifier into (name, value), or None for a
directive. ``expand(text, values, in_exp)`` expands the macros of a domain-spec or an
explanation from the letter values given (the caller fetches ``p`` first, when
``needs_p(text)``), and raises ``SpfPermError`` for a malformed macro.

The grammar follows pyspf 2.0.14 in strict mode, term for term, so that results and
explanations stay exactly those the RFC 7208 and RFC 4408 test suites expect (pyspf passes
them all): the regular expressions below are pyspf's, except where pyspf's take quadratic
time on a hostile record. Records come from the sender's DNS and are read on the reactor, so
every function here takes time linear in its input (``expand``: in its text, and in the
value of each distinct macro in it).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote

__all__ = ["SpfError", "SpfPermError", "SpfTempError", "Mechanism", "parse_term", "modifier",
           "expand", "needs_p", "check_domain_spec", "cidr_match", "split_sender"]


class SpfError(Exception):
    """An SPF evaluation that ends before a match; the message joins the arguments."""

    def __str__(self) -> str:
        return ": ".join(str(a) for a in self.args if a is not None)


class SpfPermError(SpfError):
    """RFC 7208 §2.6.7 permerror: the record cannot be interpreted."""


class SpfTempError(SpfError):
    """RFC 7208 §2.6.6 temperror: a transient DNS fault."""


_MODIFIER = re.compile(r"^([a-z][a-z0-9_\-.]*)=", re.IGNORECASE)
_BAD_MACRO = re.compile(r"(?<!%)%[^{%_-]|%$")
_TRANSFORMERS = re.compile(r"([0-9]*)(r?)([^0-9a-zA-Z]*)")
_DUAL_CIDR = re.compile(r"//(0|[1-9]\d*)$")
_CIDR = re.compile(r"/(0|[1-9]\d*)$")
_IP4_OCTET = r"(?:\d|[1-9]\d|1\d\d|2[0-4]\d|25[0-5])"
_IP4 = re.compile(r"\.".join([_IP4_OCTET] * 4) + "$")
# RFC 7208 §7.1 toplabel: pyspf's [0-9a-z]*[a-z][0-9a-z]* | [0-9a-z]+-[0-9a-z-]*[0-9a-z],
# its first half written so that it cannot backtrack quadratically on a long label (the same
# labels: letters and digits, at least one letter).
_TOPLABEL = re.compile(r"[0-9]*[a-z][0-9a-z]*|[0-9a-z]+-[0-9a-z-]*[0-9a-z]", re.IGNORECASE)
# A CIDR length has at most 3 digits (RFC 7208 §5.6); a longer one is over any limit.
_OVER_ANY_LENGTH = 1000
# RFC 7208 §7.3: an expanded domain-spec keeps its right-hand labels within 253 octets.
_NAME_OCTETS = 253
# expand() drops the labels already bound to go once it holds this much (see there).
_TRIM_AT = 4096
_QUALIFIERS = {"+": "pass", "-": "fail", "?": "neutral", "~": "softfail"}
MECHANISMS = ("a", "mx", "ptr", "exists", "include", "ip4", "ip6", "all")
_COMMON_MISTAKES = ("prt", "ip", "ipv4", "ipv6", "all.")
# RFC 7208 §7.3: l and s are split on their delimiters and joined again with dots.
_JOINERS = {"l": ".", "s": "."}


@dataclass(frozen=True)
class Mechanism:
    term: str  # as written, for error messages
    name: str  # a, mx, ptr, exists, include, ip4, ip6, all
    qualifier: str  # the result on a match: pass, fail, softfail, neutral
    target: str  # the domain-spec (unexpanded) or the network address; "" for all
    cidr: int  # the prefix length that applies to the client's address family


def modifier(term: str) -> tuple[str, str] | None:
    """(name in lower case, value) for a modifier (RFC 7208 §4.6.1), None for a directive."""
    match = _MODIFIER.match(term)
    if match is None:
        return None
    return match.group(1).lower(), term[match.end():]


def _parse_cidrs(term: str) -> tuple[str, int | None, int | None]:
    if "/" not in term:  # most terms: no regular expression to run
        return term, None, None
    cidr6 = cidr4 = None
    match = _DUAL_CIDR.search(term)
    if match:
        term, cidr6 = term[:match.start()], _cidr_length(match.group(1))
    match = _CIDR.search(term)
    if match:
        term, cidr4 = term[:match.start()], _cidr_length(match.group(1))
    return term, cidr4, cidr6


def _cidr_length(digits: str) -> int:
    """The length written, or one over any limit for more than 3 digits (without leading
    zeros: at least 1000), which ``int()`` would refuse past 4,300 digits (ValueError)."""
    return int(digits) if len(digits) <= 3 else _OVER_ANY_LENGTH


def parse_term(term: str, domain: str, v6: bool) -> Mechanism:
    """One directive, checked (RFC 7208 §4.6.1, §5); SpfPermError if it is malformed."""
    if term.endswith(","):
        raise SpfPermError("Do not separate mechnisms with commas", term)
    body, cidr4, cidr6 = _parse_cidrs(term)
    name, colon, target = body.partition(":")
    if not colon:
        name = name.lower()
        target = "" if name.lstrip("+-?~") == "exists" else domain
        has_target = False
    else:
        name = name.lower()
        has_target = True
    qualifier = _QUALIFIERS.get(name[:1])
    if qualifier:
        name = name[1:]
    else:
        qualifier = "pass"
    if name in _COMMON_MISTAKES:
        raise SpfPermError("Unknown mechanism found", term)
    if name == "a" and _IP4.match(target):
        raise SpfPermError("Use the ip4 mechanism for ip4 addresses", term)
    if name in ("a", "mx"):
        if cidr4 is not None and cidr4 > 32:
            raise SpfPermError("Invalid IP4 CIDR length", term)
        if cidr6 is not None and cidr6 > 128:
            raise SpfPermError("Invalid IP6 CIDR length", term)
        cidr = (128 if cidr6 is None else cidr6) if v6 else (32 if cidr4 is None else cidr4)
    elif name == "ip4" or (name[:1].isdigit() and _IP4.match(name)):
        if name != "ip4":
            raise SpfPermError("Missing IP4", term)
        if cidr6 is not None:
            raise SpfPermError("Dual CIDR not allowed", term)
        if cidr4 is not None and cidr4 > 32:
            raise SpfPermError("Invalid IP4 CIDR length", term)
        if not _IP4.match(target):
            raise SpfPermError("Invalid IP4 address", term)
        cidr = 32 if cidr4 is None else cidr4
    elif name == "ip6":
        if cidr6 is not None:
            raise SpfPermError("Dual CIDR not allowed", term)
        if cidr4 is not None and cidr4 > 128:
            raise SpfPermError("Invalid IP6 CIDR length", term)
        try:
            ipaddress.IPv6Address(target)
        except ValueError:
            raise SpfPermError("Invalid IP6 address", term) from None
        if "%" in target or not target:
            raise SpfPermError("Invalid IP6 address", term)
        cidr = 128 if cidr4 is None else cidr4
    else:
        if (cidr4 is not None or cidr6 is not None) and name in MECHANISMS:
            raise SpfPermError("CIDR not allowed", term)
        cidr = 128 if v6 else 32
    if name in ("a", "mx", "ptr", "exists", "include"):
        if name == "exists" and not has_target:
            raise SpfPermError("implicit exists not allowed", term)
        return Mechanism(term, name, qualifier, target, cidr)
    if name == "all" and ":" in term:
        raise SpfPermError("Invalid all mechanism format - only qualifier allowed with all",
                           term)
    if name in MECHANISMS:
        return Mechanism(term, name, qualifier, target if name != "all" else "", cidr)
    if name[1:] in MECHANISMS:
        raise SpfPermError("Unknown qualifier, RFC 4408 para 4.6.1, found in", term)
    raise SpfPermError("Unknown mechanism found", term)


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


def _transform(value: str, spec: str, joiner: str | None) -> str:
    """RFC 7208 §7.3 transformers and delimiters, as pyspf applies them: the value split into
    parts and the delimiters between them, reversed with "r", the last DIGITS parts kept."""
    if not spec:
        return value
    digits, reverse, delimiters = _TRANSFORMERS.match(spec).groups()  # type: ignore[union-attr]
    # [part, delimiter, part, ..., part], as pyspf's loop over the characters builds it
    parts = _splitter(delimiters or ".")(value)
    if joiner:
        parts[1::2] = [joiner] * (len(parts) // 2)
    if reverse:
        parts.reverse()
    if digits:
        count = digits.lstrip("0")
        # A count with more digits than the number of parts takes them all, as any count
        # over it does (RFC 7208 §7.3); int() would refuse one over 4,300 digits.
        if len(count) <= len(str(len(parts))):
            parts = parts[-int(count or "0") * 2 + 1:]
    return "".join(parts)


@lru_cache(maxsize=64)
def _splitter(delimiters: str) -> Callable[[str], list[str]]:
    """A split on any of ``delimiters`` that keeps them, in C (the whole value at once)."""
    return re.compile(f"([{re.escape(delimiters)}])").split


def expand(text: str, values: dict[str, str], in_exp: bool = False) -> str:
    """Expand the macros of ``text`` (RFC 7208 §7.3). ``values`` maps each macro letter to its
    value; ``in_exp`` allows c, r and t and keeps a trailing dot (explanation text)."""
    if "%" in text and _BAD_MACRO.search(text):
        raise SpfPermError("invalid-macro-char ", text)
    out: list[str] = []
    size, trim_at = 0, _TRIM_AT
    end = 0
    seen: dict[str, str] = {}  # a macro written again expands the same
    for start, stop in _macros(text):
        macro = text[start:stop]
        if macro in seen:
            piece = seen[macro]
        elif macro == "%%":
            piece = "%"
        elif macro == "%_":
            piece = " "
        elif macro == "%-":
            piece = "%20"
        else:
            letter = macro[2].lower()
            if letter in "crt" and not in_exp:
                raise SpfPermError("c,r,t macros allowed in exp= text only", macro)
            value = values.get(letter) if len(letter) == 1 and letter.isalpha() else None
            if value is None:
                raise SpfPermError("Unknown Macro Encountered", macro)
            piece = _transform(value, macro[3:-1], _JOINERS.get(letter)) if value else ""
            if letter != macro[2]:
                piece = quote(piece, "~")
            seen[macro] = piece
        out += (text[end:start], piece)
        size += start - end + len(piece)
        end = stop
        if size > trim_at and not in_exp:
            # Only right-hand labels are kept (_cut_at): those already bound to go are dropped
            # now, so that a record of many macros does not build a name of megabytes. The
            # cut may not take the last character: the final dot is removed before it.
            kept = "".join(out)
            kept = kept[_cut_at(kept[:-1]) + 1:]
            out, size = [kept], len(kept)
            trim_at = max(_TRIM_AT, 2 * size)  # a long label left: joined again as it doubles
    out.append(text[end:])
    result = "".join(out)
    if not in_exp:
        if result.endswith("."):
            result = result[:-1]
        result = result[_cut_at(result) + 1:]
    return result


def _cut_at(name: str) -> int:
    """Where RFC 7208 §7.3 cuts ``name``: the index of the dot ending the left-hand labels it
    drops, -1 for none. Dropping one label at a time while the name is over 253 octets and
    has a dot (copying the name each time: quadratic) ends at the first dot with at most 253
    octets after it, or else at the last dot."""
    if len(name) <= _NAME_OCTETS:
        return -1
    cut = name.find(".", len(name) - _NAME_OCTETS - 1)
    return cut if cut >= 0 else name.rfind(".")


def cidr_match(client: ipaddress.IPv4Address | ipaddress.IPv6Address, addresses: list[str],
               prefix: int) -> bool:
    """Whether ``client`` lies in the /prefix network around any of ``addresses``.

    An address of the client's family is read by ``socket.inet_pton`` and compared on its top
    ``prefix`` bits (a tenth of ``ipaddress``'s cost); anything else (another family, text
    inet_pton refuses) takes ``ipaddress``'s path, whose ValueError is a permerror.
    """
    family, bits = (socket.AF_INET6, 128) if client.version == 6 else (socket.AF_INET, 32)
    fast = 0 <= prefix <= bits
    shift = bits - prefix
    wanted = int(client) >> shift if fast else 0
    for address in addresses:
        if fast:
            try:
                packed = socket.inet_pton(family, address)
            except (OSError, ValueError):
                pass
            else:
                if int.from_bytes(packed, "big") >> shift == wanted:
                    return True
                continue
        try:
            if client in ipaddress.ip_network(address).supernet(new_prefix=prefix):
                return True
        except ValueError as error:
            raise SpfPermError(str(error)) from None
    return False


def split_sender(sender: str, helo: str) -> tuple[str, str]:
    """(local part, domain) of the identity (RFC 7208 §4.3): postmaster for an empty local
    part or the null sender, whose domain is the HELO name."""
    if not sender:
        return "postmaster", helo
    local, at, domain = sender.rpartition("@")
    if not at:
        return "postmaster", sender
    return local or "postmaster", domain
