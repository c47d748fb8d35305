"""A DNS server on loopback that serves one scenario of the SPF test suites (tests/spf_suite).

``ZoneServer(zonedata)`` answers over UDP and TCP on 127.0.0.1 (``port``) from a scenario's
``zonedata`` exactly as the suites' reference driver (pyspf's test/testspf.py) reads it: a
``TIMEOUT`` entry makes the name time out for every type not listed before it, a
``TYPE: TIMEOUT`` entry times out that type, ``TXT: NONE`` means no TXT records, SPF (type 99)
records stand in for TXT when a name lists no TXT, a missing name under ``error.`` times out
and any other missing name is NXDOMAIN. CNAMEs are followed as a recursive resolver would,
the chain in the answer. Timing out means not answering at all, so the daemon's own client
sees a real timeout. Answers over the client's EDNS payload are truncated (TC) and served
again over TCP.
"""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.TXT import TXT
from twisted.internet import error, protocol

_TTL = 300


class _Timeout(Exception):
    """The scenario says this question gets no answer."""


def _entries(zonedata: dict) -> dict[str, list]:
    """Each name's entries as (type, value) pairs or "TIMEOUT", as testspf.loadZone reads them."""
    zone: dict[str, list] = {}
    for name, records in zonedata.items():
        out, spf_copies, has_txt = [], [], False
        for record in records or []:
            if record == "TIMEOUT":
                out.append("TIMEOUT")
                continue
            ((rtype, value),) = record.items()
            if rtype in ("TXT", "SPF") and isinstance(value, str):
                value = [value]
            if rtype == "TXT":
                has_txt = True
            elif rtype == "SPF":
                spf_copies.append(("TXT", value))
            if value != ["NONE"]:
                out.append((rtype, value))
        if not has_txt:
            out += spf_copies
        zone[name.lower().rstrip(".")] = out
    return zone


def _rdata(rtype: str, value):
    if rtype == "TXT" or rtype == "SPF":
        chunks = []
        for text in value:
            raw = text.encode("utf-8")
            chunks += [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
        # A TXT record of no strings cannot be sent: one empty string joins to the same.
        return TXT(dns.rdataclass.IN, dns.rdatatype.from_text(rtype), chunks or [b""])
    if rtype == "MX":
        return dns.rdata.from_text("IN", "MX", f"{value[0]} {value[1]}.")
    if rtype in ("PTR", "CNAME"):
        return dns.rdata.from_text("IN", rtype, value.rstrip(".") + ".")
    return dns.rdata.from_text("IN", rtype, str(value))


def _name(text: str) -> dns.name.Name:
    return dns.name.Name([label.encode() for label in text.split(".") if label] + [b""])


class ZoneServer:
    def __init__(self, reactor, zonedata: dict) -> None:
        self.zone = _entries(zonedata)
        factory = protocol.Factory.forProtocol(lambda: _Tcp(self))
        # UDP and TCP on one port: the kernel picks the UDP port, which may be taken for TCP.
        for _attempt in range(50):
            self.udp = reactor.listenUDP(0, _Udp(self), interface="127.0.0.1")
            self.port = self.udp.getHost().port
            try:
                self.tcp = reactor.listenTCP(self.port, factory, interface="127.0.0.1")
                return
            except error.CannotListenError:
                self.udp.stopListening()
        raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")

    def stop(self):
        self.tcp.stopListening()
        return self.udp.stopListening()

    def records(self, name: str, rtype: str) -> tuple[list, str | None, bool]:
        """(values of rtype, CNAME target or None, whether the name exists); _Timeout."""
        entries = self.zone.get(name)
        if entries is None:
            if name.startswith("error."):
                raise _Timeout
            return [], None, False
        found, cname, seen = [], None, False
        for entry in entries:
            if entry == "TIMEOUT":
                if not seen:
                    raise _Timeout
                break
            etype, value = entry
            if etype == rtype:
                seen = True
                if value == "TIMEOUT":
                    raise _Timeout
                found.append(value)
            elif etype == "CNAME" and value != "TIMEOUT":
                cname = value
        return found, cname, True

    def respond(self, wire: bytes, limit: int | None) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        rtype = dns.rdatatype.to_text(question.rdtype)
        name = b".".join(question.name.labels[:-1]).decode("utf-8", "replace").lower()
        response = dns.message.make_response(query)
        try:
            for _hop in range(10):
                values, cname, exists = self.records(name, rtype)
                if values:
                    response.answer.append(dns.rrset.from_rdata_list(
                        _name(name), _TTL, [_rdata(rtype, v) for v in values]))
                    break
                if cname is None:
                    if not exists:
                        response.set_rcode(dns.rcode.NXDOMAIN)
                    break
                response.answer.append(dns.rrset.from_rdata_list(
                    _name(name), _TTL, [_rdata("CNAME", cname)]))
                name = cname.lower().rstrip(".")
        except _Timeout:
            return None
        try:
            return response.to_wire(max_size=limit or 65535)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC
            return truncated.to_wire()


class _Udp(protocol.DatagramProtocol):
    noisy = False

    def __init__(self, server: ZoneServer) -> None:
        self.server = server

    def datagramReceived(self, data: bytes, addr) -> None:
        query = dns.message.from_wire(data)
        limit = max(512, query.payload) if query.edns >= 0 else 512
        reply = self.server.respond(data, limit)
        if reply is not None:
            self.transport.write(reply, addr)


class _Tcp(protocol.Protocol):
    def __init__(self, server: ZoneServer) -> None:
        self.server = server
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            (length,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) < 2 + length:
                return
            wire, self.buffer = self.buffer[2:2 + length], self.buffer[2 + length:]
            reply = self.server.respond(wire, None)
            if reply is not None:
                self.transport.write(struct.pack("!H", len(reply)) + reply)
