"""The syntax of SPF records (RFC 7208 §4.6, §5): terms, CIDR lengths, and the errors.

Contract: pure functions on text, no DNS and no Twisted. ``parse_term(term, domain, v6)``
checks one directive and returns a ``Mechanism`` (its domain-spec still unexpanded), or raises
``SpfPermError``; ``modifier(term)`` splits a modifier into (name, value), or None for a
directive. Domain-specs and their macros (§7) are ``spf_macros``'.

The grammar follows pyspf 2.0.14 in strict mode, term for term, so that results and
explanations stay exactly those the RFC 7208 and RFC 4408 test suites expect (pyspf passes
them all): the regular expressions below are pyspf's. Records come from the sender's DNS and
are read on the reactor, so every function here takes time linear in its input.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

__all__ = ["SpfError", "SpfPermError", "SpfTempError", "Mechanism", "parse_term", "modifier",
           "cidr_match", "split_sender"]


class SpfError(Exception):
    """An SPF evaluation that ends before a match; the message joins the arguments."""

    def __str__(self) -> str:
        return ": ".join(str(a) for a in self.args if a is not None)


class SpfPermError(SpfError):
    """RFC 7208 §2.6.7 permerror: the record cannot be interpreted."""


class SpfTempError(SpfError):
    """RFC 7208 §2.6.6 temperror: a transient DNS fault."""


_MODIFIER = re.compile(r"^([a-z][a-z0-9_\-.]*)=", re.IGNORECASE)
_DUAL_CIDR = re.compile(r"//(0|[1-9]\d*)$")
_CIDR = re.compile(r"/(0|[1-9]\d*)$")
_IP4_OCTET = r"(?:\d|[1-9]\d|1\d\d|2[0-4]\d|25[0-5])"
_IP4 = re.compile(r"\.".join([_IP4_OCTET] * 4) + "$")
# A CIDR length has at most 3 digits (RFC 7208 §5.6); a longer one is over any limit.
_OVER_ANY_LENGTH = 1000
_QUALIFIERS = {"+": "pass", "-": "fail", "?": "neutral", "~": "softfail"}
MECHANISMS = ("a", "mx", "ptr", "exists", "include", "ip4", "ip6", "all")
_COMMON_MISTAKES = ("prt", "ip", "ipv4", "ipv6", "all.")


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
        # inet_pton takes exactly the text forms ipaddress.IPv6Address takes, less the scope
        # id ("%eth0"), which SPF has no use for (tests/test_spf_terms.py), at a fifth of
        # its cost: every cold evaluation reads a few ip6: terms.
        try:
            socket.inet_pton(socket.AF_INET6, target)
        except (OSError, ValueError):
            raise SpfPermError("Invalid IP6 address", term) from None
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
