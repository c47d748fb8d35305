"""The DNS client's shared UDP sockets on real loopback sockets and the real reactor.

A small echo-style DNS server in the test (a thread-free non-blocking socket read from the
reactor's turns) answers or stays silent; a closed port gives the kernel's ICMP "port
unreachable". Proves what the fake reactor of test_dns_client.py cannot: the kernel delivers
the error to a connected, shared socket, and the sockets really are reused and closed.
"""

from __future__ import annotations

import socket
import time

import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from realtime import wait
from twisted.internet import defer, task

from policyd_ipv6.resolver.client import (
    QUERIES_PER_SOCKET,
    DnsClient,
    TransientDnsError,
)
from policyd_ipv6.resolver.wire import Nameserver, encode_name

pytestmark = pytest.mark.process


class Answerer:
    """A UDP DNS server on 127.0.0.1 polled by a LoopingCall: answers every query with an AAAA."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.sources: list[int] = []
        self.poll = task.LoopingCall(self.answer)
        self.poll.start(0.002)

    def answer(self) -> None:
        for _ in range(256):  # bounded: what has arrived since the last turn
            try:
                data, peer = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN",
                                                       "AAAA", "2001:db8::1"))
            self.sources.append(peer[1])
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.poll.stop()
        self.sock.close()


@pytest.fixture
def answerer():
    server = Answerer()
    yield server
    server.close()


def test_queries_share_sockets_and_all_are_answered(answerer):
    """Three sockets' worth of concurrent queries all get their own answer; the sockets close."""
    from twisted.internet import reactor

    client = DnsClient(reactor, [Nameserver("127.0.0.1", answerer.port)], 2.0, 1)
    count = 3 * QUERIES_PER_SOCKET
    replies = wait(defer.gatherResults(
        [client.query(f"q{i}.example", dns.rdatatype.AAAA) for i in range(count)]))
    assert [reply.qname for reply in replies] == [encode_name(f"q{i}.example")
                                                  for i in range(count)]
    assert len(set(answerer.sources)) == 3
    wait(task.deferLater(reactor, 0.05, lambda: None))  # closing a port takes a reactor turn
    ours = [reader for reader in reactor.getReaders()
            if getattr(getattr(reader, "protocol", None), "client", None) is client]
    assert ours == [client.sockets[Nameserver("127.0.0.1", answerer.port)].port]


def test_port_unreachable_fails_at_once():
    """A server port with nobody behind it fails the query long before the timeout."""
    from twisted.internet import reactor

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    client = DnsClient(reactor, [Nameserver("127.0.0.1", port)], 5.0, 2)
    start = time.monotonic()
    with pytest.raises(TransientDnsError, match="port unreachable"):
        wait(defer.gatherResults([client.query(f"q{i}.example", dns.rdatatype.AAAA)
                                  for i in range(5)], consumeErrors=True).addErrback(
            lambda failure: failure.value.subFailure), timeout=4.0)
    assert time.monotonic() - start < 2.0
