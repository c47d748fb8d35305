"""Test fakes with the same interface as the real parts they replace.

``FakeDnsClient`` stands in for ``policyd_ipv6.dns_client.DnsClient``: ``query(qname, rdtype)``
returns a Deferred firing with a real ``dns.message`` response built from a small record
table, or failing with ``TransientDnsError`` for names listed as broken; with a ``clock`` and a
``delay`` it answers later (never, for names listed as ``silent``). ``test_fake_contract.py``
runs the same lookups through this fake and through the real client against Knot, so the fake
stays honest.
"""

from __future__ import annotations

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from twisted.internet import defer

from policyd_ipv6.resolver.client import MAX_REPLY_SIZE, ReplyTooLarge, TransientDnsError


class _FakeQuery:
    """``FakeDnsClient.ask``'s query: delivers once what ``query``'s Deferred gives."""

    def __init__(self, d: defer.Deferred, deliver) -> None:
        self.d = d
        self.deliver = deliver
        d.addCallbacks(self._end, lambda failure: self._end(failure.value))

    def _end(self, result) -> None:
        deliver, self.deliver = self.deliver, None
        if deliver is not None:
            deliver(result)

    def cancel(self) -> None:
        self.deliver = None
        self.d.cancel()


class FakeDnsClient:
    def __init__(self, records: dict[tuple[str, str], list[str]] | None = None,
                 broken: set[str] = frozenset(), silent: set[str] = frozenset(),
                 clock=None, delay: float = 0.0, ttl: int = 300) -> None:
        self.records = {(n.lower().rstrip("."), t): list(v)
                        for (n, t), v in (records or {}).items()}
        self.broken = {b.lower().rstrip(".") for b in broken}
        self.silent = {s.lower().rstrip(".") for s in silent}
        self.clock = clock
        self.delay = delay
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []

    def add(self, name: str, rtype: str, *values: str) -> FakeDnsClient:
        self.records.setdefault((name.lower().rstrip("."), rtype), []).extend(values)
        return self

    def response(self, qname, rdtype: int) -> dns.message.Message:
        if isinstance(qname, str):
            qname = dns.name.from_text(qname, origin=dns.name.root)
        request = dns.message.make_query(qname, rdtype)
        response = dns.message.make_response(request)
        name = qname.to_text(omit_final_dot=True).lower()
        rtype = dns.rdatatype.to_text(rdtype)
        hops = 0
        while True:
            values = self.records.get((name, rtype))
            if values:
                response.answer.append(dns.rrset.from_text_list(
                    dns.name.from_text(name), self.ttl, "IN", rtype, values))
                return self._on_the_wire(response)
            cname = self.records.get((name, "CNAME"))
            if cname and hops < 20:
                response.answer.append(dns.rrset.from_text_list(
                    dns.name.from_text(name), self.ttl, "IN", "CNAME", cname))
                name = cname[0].lower().rstrip(".")
                hops += 1
                continue
            break
        if not any(n == name for n, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return self._on_the_wire(response)

    @staticmethod
    def _on_the_wire(response: dns.message.Message) -> dns.message.Message:
        # Through wire format and back, as the real client receives it (this also builds the
        # message's rrset index, which resolve_chaining relies on).
        return dns.message.from_wire(response.to_wire())

    def ask(self, wire_name: bytes, rdtype: int, deliver,
            max_size: int = MAX_REPLY_SIZE) -> _FakeQuery:
        """Same contract as DnsClient.ask (the lookups' way in), over ``query``: the name in its
        wire form; ``deliver`` gets the response or the exception; ``cancel()`` stops it."""
        name = dns.name.from_wire(wire_name, 0)[0].to_text()
        return _FakeQuery(self.query(name, rdtype, max_size), deliver)

    def query(self, qname: str, rdtype: int, max_size: int = MAX_REPLY_SIZE) -> defer.Deferred:
        """Same signature as DnsClient.query: the name as absolute text, the type as a number;
        a response longer than ``max_size`` on the wire fails with ``ReplyTooLarge``."""
        name = qname.rstrip(".").lower()
        self.queries.append((name, dns.rdatatype.to_text(rdtype)))
        if name in self.silent:
            return defer.Deferred()  # never answers, like a black-holed server
        if name in self.broken:
            result = defer.fail(TransientDnsError("SERVFAIL from fake"))
        else:
            response = self.response(qname, rdtype)
            size = len(response.to_wire())
            result = (defer.fail(ReplyTooLarge(size, max_size)) if size > max_size
                      else defer.succeed(response))
        if self.clock is None or self.delay <= 0:
            return result
        later = defer.Deferred()
        self.clock.callLater(self.delay, lambda: result.chainDeferred(later))
        return later
