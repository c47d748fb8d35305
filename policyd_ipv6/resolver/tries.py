"""A query's tries: what a UDP and a TCP try share, and the TCP try (RFC 7766).

Contract: ``Try(query, server)`` is one attempt of ``client``'s query at one nameserver: it
arms the query's timeout (the client's ``timeouts``), ends exactly once (``stop()`` from
outside; ``_fail(why)`` tells the query to go on to its next try) and closes what it opened
(``_close``, the subclass's).
``TcpTry(query, server).start()`` sends the query over a new TCP connection with its two-byte
length prefix (RFC 1035 §4.2.2) and reads one reply into one buffer: a reply whose length
prefix is over the query's ``max_size`` is refused unread (``query.too_large``), a reply that
does not answer the question or cannot be parsed fails the try, a usable one goes to
``query.answered``. The connection and every object around it are let go when the try ends,
so a try leaves no reference cycle for the garbage collector. The UDP try and its shared
sockets are ``client``'s.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

from twisted.internet import protocol

from policyd_ipv6.resolver.reply import MalformedReply, Reply, parse_reply
from policyd_ipv6.resolver.wire import Nameserver, is_reply_to
from policyd_ipv6.timeouts import Timeout

__all__ = ["Try", "TcpTry", "Query"]


class Query(Protocol):
    """What a try needs of its query (``client``'s): the client's reactor and timeout, the
    query on the wire, the largest reply the caller can use, and where each ending goes."""

    client: Any  # its reactor, timeouts and timeout_seconds
    wire: bytes
    max_size: int

    def answered(self, server: Nameserver, response: Reply) -> None: ...

    def failed(self, server: Nameserver, why: str) -> None: ...

    def too_large(self, size: int) -> None: ...


class Try:
    """What UDP and TCP tries share: the server, a timer, and ending exactly once."""

    # Set by the Twisted protocol this is mixed into. Typed Any: Twisted declares it as a
    # zope.interface type, whose methods mypy cannot call (they are declared without self).
    transport: Any

    def __init__(self, query: Query, server: Nameserver) -> None:
        self.query = query
        self.server = server
        self.timer: Timeout | None = None
        self.done = False

    def _arm(self, why: str) -> None:
        client = self.query.client
        self.timer = client.timeouts.call(client.timeout_seconds, self._fail, why)

    def _fail(self, why: str) -> None:
        """End this try as failed (once) and let the query go on to the next one."""
        if self.timer is not None and not self.timer.active():
            self.timer = None  # we are the timer's call
        if not self.done:
            self._finish()
            self.query.failed(self.server, why)

    def stop(self) -> None:
        self._finish()

    def _finish(self) -> None:
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self._close()

    def _close(self) -> None:
        raise NotImplementedError


class TcpTry(Try, protocol.Protocol):
    """One query over TCP (RFC 1035 §4.2.2: a two-byte length before each message)."""

    def __init__(self, query: Query, server: Nameserver) -> None:
        super().__init__(query, server)
        self.buffer = bytearray()
        self.length: int | None = None  # of the reply, once its two-byte prefix is in
        self.connector: Any = None  # reactor.connectTCP's, until the connection is made

    def start(self) -> None:
        # reactor.connectTCP, not an endpoint: an endpoint's wrapping factory, protocol and
        # Deferreds made a dozen objects of cyclic garbage per try.
        self._arm("TCP timeout")
        self.connector = self.query.client.reactor.connectTCP(
            self.server.host, self.server.port, _Once(self),
            timeout=self.query.client.timeout_seconds)

    def connectionMade(self) -> None:
        self.connector = None
        wire = self.query.wire
        self.transport.write(struct.pack("!H", len(wire)) + wire)

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        self.buffer += data
        if self.length is None:
            if len(self.buffer) < 2:
                return
            (self.length,) = struct.unpack("!H", self.buffer[:2])
            if self.length > self.query.max_size:  # refused unread: the caller cannot use it
                self.buffer = bytearray()  # what one read brought of it (up to 64 KiB) too
                self._finish()
                self.query.too_large(self.length)
                return
            del self.buffer[:2]
        if len(self.buffer) < self.length:
            return
        with memoryview(self.buffer) as view:  # one copy, not a slice's and then bytes'
            wire = bytes(view[:self.length])
        self._finish()  # which lets go of the buffer
        if not is_reply_to(self.query.wire, wire):
            self.query.failed(self.server, "mismatched TCP response")
            return
        try:
            response = parse_reply(wire)
        except MalformedReply:
            self.query.failed(self.server, "malformed TCP response")
            return
        self.query.answered(self.server, response)

    def connectionLost(self, reason=None) -> None:
        self._fail("TCP connection closed")
        # The transport and its connector point back at this try (a cycle the collector
        # would have to find): let go of them, and of whatever was read.
        self.transport = None
        self.buffer = bytearray()

    def _close(self) -> None:
        self.buffer = bytearray()
        if self.transport is not None:
            self.transport.loseConnection()
        elif self.connector is not None:
            connector, self.connector = self.connector, None
            connector.stopConnecting()


class _Once(protocol.ClientFactory):
    """A factory that hands out one already-built protocol, once, and tells it when the
    connection could not be made."""

    noisy = False  # no "Starting factory" log line per try

    def __init__(self, proto: TcpTry) -> None:
        self.proto: TcpTry | None = proto

    def buildProtocol(self, addr) -> protocol.Protocol | None:
        proto, self.proto = self.proto, None  # the connector keeps this factory
        return proto

    def clientConnectionLost(self, connector, reason) -> None:
        # The connector and its transport point at each other: a cycle per try otherwise.
        connector.transport = None

    def clientConnectionFailed(self, connector, reason) -> None:
        proto, self.proto = self.proto, None
        if proto is not None:
            proto.connector = None
            proto._fail("TCP connect failed")
