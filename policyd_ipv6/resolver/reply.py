"""Sans-IO parsing of the DNS replies the daemon receives, without dnspython's message objects.

Contract: ``parse_reply(wire)`` reads a whole reply (RFC 1035 §4.1; trailing bytes ignored) and
returns a ``Reply``, or raises ``MalformedReply`` (and nothing else) for bytes that are not
one. Every owner name and every name inside the rdata of A, AAAA, PTR, CNAME, MX, TXT, SOA and
NS records is checked (A and AAAA in class IN only); other types are skipped by their length.
Names are decompressed safely: a pointer must point before the name part that holds it, at most
16 pointers per name, no label over 63 octets, no name over 255. ``Reply.rcode()`` includes the
EDNS extended bits; ``Reply.answer`` lists the answer section's RRsets. ``resolve(reply)``
follows the CNAME chain from the question as dnspython's ``resolve_chaining`` does (at most 16
links; an RRset's TTL is the smallest of its records', duplicates dropped, a CNAME or SOA RRset
keeps its last record) and returns a ``Resolution``: the answer's values, the smallest TTL on
the way and, when there is no answer, the negative TTL of the closest enclosing SOA in the
authority section (RFC 2308), or ``None`` without one. Values are plain Python, the shapes
``resolver.lookups`` caches: PTR/CNAME/NS targets as lower-case text without the final dot
(escaped as dnspython's ``to_text`` does), A/AAAA as address text, MX as (preference, name),
TXT as a tuple of ``bytes`` strings. Pure: no I/O, no Twisted.

Why: dnspython builds a Python object per name, RRset and rdata and indexes them; for the
small answers the daemon gets, parsing was the largest single cost of a cold decision
(bench/README.md, "Parsing answers"), and a 62 KB TXT answer cost milliseconds.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["MalformedReply", "Reply", "Resolution", "parse_reply", "resolve", "name_text",
           "MAX_POINTERS", "MAX_CHAIN"]

MAX_POINTERS = 16  # compression pointers followed in one name
MAX_CHAIN = 16  # CNAME links followed from the question (dnspython's MAX_CHAIN)

A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, OPT, TSIG = 1, 2, 5, 6, 12, 15, 16, 28, 41, 250
_NAME_TYPES = (NS, CNAME, PTR)
_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_ESCAPED = frozenset(b'"().;\\@$')
_TO_QUESTION = b"\xc0\x0c"  # a compression pointer to offset 12: the question's name


class MalformedReply(ValueError):
    """The bytes are not a DNS reply this parser accepts."""


def _read_name(wire: bytes, offset: int, end: int) -> tuple[bytes, int]:
    """The name at ``offset`` as lower-case uncompressed wire form, and the offset after it.

    ``end`` bounds the bytes the name may occupy where it starts (the message, or the rdata);
    after a pointer, the target must lie wholly before the part of the name that pointed.
    """
    labels = bytearray()
    after = -1  # where the name ends in the message: after its first pointer
    limit = end
    pointers = 0
    start = offset
    while True:
        if offset >= limit:
            raise MalformedReply("name runs past its bounds")
        length = wire[offset]
        if length == 0:
            offset += 1
            break
        if length < 64:
            stop = offset + 1 + length
            if stop > limit:
                raise MalformedReply("label runs past its bounds")
            labels += wire[offset:stop]
            offset = stop
            if len(labels) > 254:
                raise MalformedReply("name longer than 255 octets")
            continue
        if length < 192 or offset + 2 > limit:
            raise MalformedReply("bad label type or cut pointer")
        target = ((length & 0x3F) << 8) | wire[offset + 1]
        if target >= start:
            raise MalformedReply("compression pointer not backwards")
        pointers += 1
        if pointers > MAX_POINTERS:
            raise MalformedReply("too many compression pointers")
        if after < 0:
            after = offset + 2
        limit = start  # the target must not overlap what pointed to it
        offset = start = target
    if after < 0:
        after = offset
    labels.append(0)
    return bytes(labels).lower(), after


def name_text(name: bytes) -> str:
    """Text of a wire name without the final dot, escaped as dnspython's ``to_text``."""
    if name == b"\x00":
        return "."
    parts = []
    offset = 0
    while name[offset]:
        label = name[offset + 1:offset + 1 + name[offset]]
        offset += 1 + name[offset]
        if label.isalnum() or all(0x20 < c < 0x7F and c not in _ESCAPED for c in label):
            parts.append(label.decode("ascii"))
        else:
            parts.append("".join(
                "\\" + chr(c) if c in _ESCAPED
                else chr(c) if 0x20 < c < 0x7F else f"\\{c:03d}" for c in label))
    return ".".join(parts)


def _rdata(wire: bytes, rtype: int, start: int, end: int) -> object:
    """The value of one record's rdata (see the module docstring), checked to fill it."""
    if rtype == A:
        if end - start != 4:
            raise MalformedReply("A rdata not 4 octets")
        return "%d.%d.%d.%d" % tuple(wire[start:end])
    if rtype == AAAA:
        if end - start != 16:
            raise MalformedReply("AAAA rdata not 16 octets")
        # The C library's text is dnspython's (RFC 5952, ::ffff:a.b.c.d for mapped addresses),
        # checked in tests/test_dns_reply.py; dnspython's own costs ten times as much.
        return socket.inet_ntop(socket.AF_INET6, wire[start:end])
    if rtype in _NAME_TYPES:
        name, after = _read_name(wire, start, end)
        if after != end:
            raise MalformedReply("junk after a name in rdata")
        return name
    if rtype == MX:
        if end - start < 3:
            raise MalformedReply("MX rdata too short")
        name, after = _read_name(wire, start + 2, end)
        if after != end:
            raise MalformedReply("junk after the MX exchange")
        return ((wire[start] << 8) | wire[start + 1], name)
    if rtype == TXT:
        strings = []
        offset = start
        while offset < end:
            stop = offset + 1 + wire[offset]
            if stop > end:
                raise MalformedReply("TXT string runs past its rdata")
            strings.append(wire[offset + 1:stop])
            offset = stop
        if not strings:
            raise MalformedReply("TXT rdata without strings")
        return tuple(strings)
    if rtype == SOA:
        _mname, offset = _read_name(wire, start, end)
        _rname, offset = _read_name(wire, offset, end)
        if end - offset != 20:
            raise MalformedReply("SOA rdata of the wrong length")
        return struct.unpack_from("!I", wire, offset + 16)[0]  # the minimum: all we use
    return None


class _RRset:
    """Records of one owner, type and class in one section, as dnspython merges them."""

    __slots__ = ("owner", "rtype", "rclass", "ttl", "values")

    def __init__(self, owner: bytes, rtype: int, rclass: int, ttl: int) -> None:
        self.owner = owner
        self.rtype = rtype
        self.rclass = rclass
        self.ttl = ttl
        self.values: dict[Any, None] = {}  # insertion-ordered set

    def add(self, value: Any, ttl: int) -> None:
        if ttl < self.ttl or not self.values:
            self.ttl = ttl
        if self.rtype in (CNAME, SOA):  # singleton types: the last record wins
            self.values.clear()
        self.values.setdefault(value, None)

    def __repr__(self) -> str:
        return f"_RRset({self.owner!r}, {self.rtype}, {self.rclass}, {self.ttl}, {self.values})"


# Reply and Resolution live for one reply's reading: plain slotted classes, not frozen ones (a
# frozen dataclass sets each field through object.__setattr__, three times the cost).
@dataclass(slots=True)
class Reply:
    id: int
    flags: int
    qname: bytes
    qtype: int
    qclass: int
    answer: tuple[_RRset, ...]
    authority: tuple[_RRset, ...]
    extended_rcode: int = 0

    def rcode(self) -> int:
        return (self.flags & 0xF) | self.extended_rcode

    @property
    def truncated(self) -> bool:
        return bool(self.flags & 0x0200)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF


def _section(wire: bytes, offset: int, count: int, kind: str,
             rrsets: dict[tuple[bytes, int, int], _RRset] | None,
             question: bytes) -> tuple[int, int | None]:
    """Read ``count`` records from ``offset``; RRsets into ``rrsets`` (None: check only).
    ``question`` is the question's name as ``_read_name`` read it at offset 12, which a
    compression pointer to that offset (``_TO_QUESTION``) names: what reading it again would
    give, since the question lies wholly before any record.

    Returns the offset after the section and the OPT record's TTL field, if it had one.
    """
    opt_ttl = None
    size = len(wire)
    for _ in range(count):
        if wire[offset:offset + 2] == _TO_QUESTION:  # most owners: the question's name
            owner, offset = question, offset + 2
        else:
            owner, offset = _read_name(wire, offset, size)
        if offset + 10 > size:
            raise MalformedReply("record header cut short")
        rtype, rclass, ttl, rdlength = _RR.unpack_from(wire, offset)
        offset += 10
        end = offset + rdlength
        if end > size:
            raise MalformedReply("rdata runs past the message")
        if rtype == OPT:
            if kind != "additional" or opt_ttl is not None or owner != b"\x00":
                raise MalformedReply("misplaced OPT record")
            opt_ttl = ttl
        elif rtype == TSIG:
            raise MalformedReply("TSIG in a reply to an unsigned query")
        else:
            value = (_rdata(wire, rtype, offset, end) if rclass == 1 or rtype not in (A, AAAA)
                     else None)  # A and AAAA are class IN formats: others only skipped
            if rrsets is not None:
                if ttl > 0x7FFFFFFF:
                    ttl = 0
                key = (owner, rtype, rclass)
                rrset = rrsets.get(key)
                if rrset is None:
                    rrset = rrsets[key] = _RRset(owner, rtype, rclass, ttl)
                rrset.add(value, ttl)
        offset = end
    return offset, opt_ttl


def parse_reply(wire: bytes) -> Reply:
    """The ``Reply`` in ``wire``; ``MalformedReply`` if it is not one (module docstring)."""
    if len(wire) < 12:
        raise MalformedReply("shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    if qdcount != 1:
        raise MalformedReply("not exactly one question")
    qname, offset = _read_name(wire, 12, len(wire))
    if offset + 4 > len(wire):
        raise MalformedReply("question cut short")
    qtype, qclass = struct.unpack_from("!HH", wire, offset)
    answer: dict[tuple[bytes, int, int], _RRset] = {}
    authority: dict[tuple[bytes, int, int], _RRset] = {}
    offset, opt = _section(wire, offset + 4, ancount, "answer", answer, qname)
    offset, opt = _section(wire, offset, nscount, "authority", authority, qname)
    offset, opt = _section(wire, offset, arcount, "additional", None, qname)
    extended = ((opt >> 20) & 0xFF0) if opt is not None else 0
    return Reply(qid, flags, qname, qtype, qclass, tuple(answer.values()),
                 tuple(authority.values()), extended)


@dataclass(slots=True)
class Resolution:
    """What ``resolve`` found: ``kind`` is answer, nxdomain, nodata, chain-too-long or
    answer-for-nxdomain; ``ttl`` None means a negative answer without an SOA."""

    kind: str
    values: tuple = ()
    ttl: int | None = None


def _value(rtype: int, value):
    if rtype in _NAME_TYPES:
        return name_text(value)
    if rtype == MX:
        return (value[0], name_text(value[1]))
    return value


def resolve(reply: Reply) -> Resolution:
    """Follow the question's CNAME chain through the answer (module docstring)."""
    answers = {(r.owner, r.rtype, r.rclass): r for r in reply.answer}
    qname, qtype, qclass = reply.qname, reply.qtype, reply.qclass
    ttl: int | None = None
    found = None
    links = 0
    while links < MAX_CHAIN:
        found = answers.get((qname, qtype, qclass))
        if found is not None:
            ttl = found.ttl if ttl is None else min(ttl, found.ttl)
            break
        cname = answers.get((qname, CNAME, qclass)) if qtype != CNAME else None
        if cname is None:
            break
        ttl = cname.ttl if ttl is None else min(ttl, cname.ttl)
        qname = next(iter(cname.values))
        links += 1
    if links >= MAX_CHAIN:
        return Resolution("chain-too-long")
    nxdomain = reply.rcode() == 3
    if found is not None:
        if nxdomain:
            return Resolution("answer-for-nxdomain")
        if qtype in _NAME_TYPES or qtype == MX:
            return Resolution("answer", tuple(_value(qtype, v) for v in found.values), ttl)
        return Resolution("answer", tuple(found.values), ttl)  # TXT, A, AAAA: as read
    soas = {r.owner: r for r in reply.authority if r.rtype == SOA and r.rclass == qclass}
    zone = qname
    while True:
        soa = soas.get(zone)
        if soa is not None:
            minimum = next(iter(soa.values))
            negative = min(soa.ttl, minimum) if ttl is None else min(ttl, soa.ttl, minimum)
            return Resolution("nxdomain" if nxdomain else "nodata", (), negative)
        if zone == b"\x00":
            return Resolution("nxdomain" if nxdomain else "nodata", (), None)
        zone = zone[1 + zone[0]:]
