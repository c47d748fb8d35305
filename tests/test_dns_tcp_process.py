"""The DNS client's TCP tries on real loopback sockets and the real reactor: answered or
refused on their length prefix, they leave no cyclic garbage behind (the
daemon's collector freezes survivors, so a cycle holding a 64 KiB read would outlive the
try by up to a minute)."""

from __future__ import annotations

import gc
import socket
import struct

import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from cyclic import cyclic_garbage, instances_of
from realtime import wait
from twisted.internet import defer, protocol, tcp

from policyd_ipv6.resolver import client as client_module
from policyd_ipv6.resolver import tries
from policyd_ipv6.resolver.client import DnsClient, ReplyTooLarge
from policyd_ipv6.resolver.reply import Reply
from policyd_ipv6.resolver.tries import TcpTry
from policyd_ipv6.resolver.wire import Nameserver, encode_name, encode_query

pytestmark = pytest.mark.process


class _Answer(protocol.Protocol):
    """Reads one length-prefixed query, answers it with ``factory.strings`` TXT strings."""

    def dataReceived(self, data: bytes) -> None:
        wire = data[2:]
        response = dns.message.make_response(dns.message.from_wire(wire))
        rdata = " ".join(['"' + "x" * 250 + '"'] * self.factory.strings)
        response.answer.append(dns.rrset.from_text("big.example.", 300, "IN", "TXT", rdata))
        message = response.to_wire(max_size=65535)
        self.transport.write(struct.pack("!H", len(message)) + message)


def tcp_query(server: Nameserver, max_size: int) -> defer.Deferred:
    from twisted.internet import reactor

    client = DnsClient(reactor, [server], 5.0)
    wire = encode_query(0x1234, encode_name("big.example"), dns.rdatatype.TXT)
    result: defer.Deferred = defer.Deferred()
    query = client_module._Query(client, wire, [], max_size, lambda reply_or_error: (
        result.errback(reply_or_error) if isinstance(reply_or_error, Exception)
        else result.callback(reply_or_error)))
    TcpTry(query, server).start()
    return result


def outcome(d: defer.Deferred):
    """The query's reply or its Failure, without raising (a raised exception's traceback
    would be a cycle of the test's own)."""
    return wait(d.addBoth(lambda result: [result]))[0]


def test_tcp_tries_leave_no_cyclic_garbage():
    """Answered and refused as too large (62 KB): every query gets its outcome, and with the
    collector off nothing is left for gc.collect() to find; a refused connection fails."""
    from twisted.internet import reactor

    factory = protocol.Factory.forProtocol(_Answer)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    server = Nameserver("127.0.0.1", port.getHost().port)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = Nameserver("127.0.0.1", closed.getsockname()[1])
    try:
        gc.collect()
        gc.disable()
        try:
            outcomes = []
            for strings in (4, 245):  # about 1 KB and 62 KB
                factory.strings = strings
                outcomes += [outcome(tcp_query(server, 36 * 1024)) for _ in range(10)]
            assert [isinstance(o, Reply) for o in outcomes[:10]] == [True] * 10
            assert [o.check(ReplyTooLarge) for o in outcomes[10:20]] == [ReplyTooLarge] * 10
            del outcomes
            wait(defer.succeed(None))
            for _ in range(20):  # the closes of the last connections take reactor turns
                reactor.iterate(0.01)
            # Counted: the queries, tries and their factories, Twisted's TCP client objects,
            # read buffers (another test's leftovers may make garbage of their own here).
            found = cyclic_garbage(instances_of(
                client_module._Query, TcpTry, tries._Once, tcp.Client, tcp.Connector,
                bytearray))
            assert found == []
        finally:
            gc.enable()
        # Not counted: Twisted's own client keeps bound methods of itself after a failed
        # connect (a cycle of four small objects, on a path that has read nothing).
        assert "TCP connect failed" in str(outcome(tcp_query(nobody, 36 * 1024)).value)
    finally:
        port.stopListening()
