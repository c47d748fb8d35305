"""The DNS wire format of the queries the daemon sends, and the check that a reply is theirs.

Contract (RFC 1035 §4.1, RFC 6891 for the OPT record): ``encode_name(text)`` turns an absolute
domain name given as text (no trailing dot needed) into its uncompressed wire form, or raises
``ValueError`` for a name DNS cannot carry (an empty or over-63-octet label, over 255 octets in
all, a non-ASCII character). ``encode_query(qid, name_wire, rdtype)`` builds a recursive query
with EDNS0. ``is_reply_to(query, reply)`` says whether the reply bytes answer that query: same
ID, the QR bit, the same opcode and the same single question (names compared without regard
to ASCII case, RFC 4343). Pure functions: no I/O; parsing a reply is dnspython's job.

Why not dnspython's ``make_query().to_wire()``: rendering with name compression hashes every
suffix of the name, which for a 34-label ip6.arpa name was a fifth of the daemon's CPU time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["encode_name", "encode_query", "is_reply_to", "EDNS_PAYLOAD", "Nameserver"]

# EDNS0 with a 1232-byte payload (the 2020 "DNS flag day" value): large TXT sets arrive in one
# datagram where the path allows, and TCP handles the rest.
EDNS_PAYLOAD = 1232
_FLAGS_RD = 0x0100
_OPT = b"\x00" + struct.pack("!HHIH", 41, EDNS_PAYLOAD, 0, 0)  # root, type OPT, no options


def encode_name(text: str) -> bytes:
    """Wire form of an absolute name; ValueError if DNS cannot carry it."""
    text = text.rstrip(".")
    if not text:
        return b"\x00"
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"not an ASCII name: {text[:80]!r}") from None
    out = bytearray()
    for label in raw.split(b"."):
        if not 0 < len(label) < 64:
            raise ValueError(f"bad label length in {text[:80]!r}")
        out.append(len(label))
        out += label
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"name longer than 255 octets: {text[:80]!r}")
    return bytes(out)


def encode_query(qid: int, name_wire: bytes, rdtype: int) -> bytes:
    """A recursive (RD) query for ``name_wire``/``rdtype`` in class IN, with an OPT record."""
    header = struct.pack("!HHHHHH", qid, _FLAGS_RD, 1, 0, 0, 1)
    return header + name_wire + struct.pack("!HH", rdtype, 1) + _OPT


def is_reply_to(query: bytes, reply: bytes) -> bool:
    """True if ``reply`` carries the same ID and question as ``query`` and is a response."""
    if len(reply) < 12 or reply[:2] != query[:2]:
        return False
    flags = reply[2]
    if not flags & 0x80 or (flags & 0x78) != (query[2] & 0x78):  # QR set, same opcode
        return False
    if reply[4:6] != b"\x00\x01":
        return False
    question_length = len(query) - 12 - len(_OPT)
    return reply[12:12 + question_length].lower() == query[12:12 + question_length].lower()


@dataclass(frozen=True)
class Nameserver:
    host: str
    port: int = 53

    @property
    def ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.ipv6 else f"{self.host}:{self.port}"
