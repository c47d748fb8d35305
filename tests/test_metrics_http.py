"""The metrics listener's bounds, driven without sockets: its factory over ``StringTransport``.

The factory is built as ``listen_metrics`` builds it (``metrics_factory``), on a
``task.Clock`` whose thread pool runs the rendering at once; each connection is a protocol
from ``buildProtocol`` over its own ``StringTransport``, fed bytes as a client would send.
"""

from __future__ import annotations

import tempfile

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from policyd_ipv6.daemon.metrics import Metrics
from policyd_ipv6.daemon.metrics_http import (
    CONNECTION_SECONDS,
    MAX_CONNECTIONS,
    metrics_factory,
)

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class Reactor(task.Clock):
    """A clock whose thread pool runs each job at once, on the calling thread."""

    def getThreadPool(self):
        return self

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        on_result(True, f(*args, **kwargs))

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


@pytest.fixture
def factory():
    reactor = Reactor()
    return metrics_factory(Metrics(reactor), reactor)


def connect(factory):
    """A new connection: (protocol, transport), or (None, None) when it is refused."""
    protocol = factory.buildProtocol(PEER)
    if protocol is None:
        return None, None
    transport = StringTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.fixture
def no_temporary_files(monkeypatch):
    """Every temporary file Twisted opens for a request body, recorded."""
    opened: list = []
    real = tempfile.TemporaryFile

    def recording(*args, **kwargs):
        opened.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    return opened


def test_get_of_the_metrics_is_served_with_its_length_on_a_connection_that_then_closes(
        factory):
    """GET /metrics answers 200 with the text format and its Content-Length, then closes."""
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert f"content-length: {len(body)}".encode() in head.lower()
    assert b"# TYPE process_" in body or b"# TYPE python_" in body
    assert transport.disconnecting


@pytest.mark.parametrize("headers", [
    b"Content-Length: 314572800\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 314572800\r\nExpect: 100-continue\r\n",
])
def test_a_request_with_a_body_is_refused_before_a_byte_of_it_is_read(
        factory, no_temporary_files, headers):
    """A POST announcing a body (a length, chunked, or awaiting 100 Continue) is answered 413
    and closed; no temporary file is opened and the body sent along is never stored."""
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST /metrics HTTP/1.1\r\nHost: x\r\n" + headers
                                    + b"\r\n" + b"x" * 65536)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer
    assert transport.disconnecting
    assert no_temporary_files == []
    (request,) = protocol.wrappedProtocol._channel.requests
    assert request.content.getvalue() == b""


def test_a_request_without_a_body_in_another_method_is_405(factory, no_temporary_files):
    """POST with Content-Length 0 reaches the resource, which allows GET and HEAD only."""
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST /metrics HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 0\r\n\r\n")
    reply = transport.value()
    assert reply.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nAllow: GET, HEAD\r\n" in reply
    assert reply.endswith(b"Method not allowed: the metrics are read with GET\n")
    assert no_temporary_files == []


def test_past_the_bound_a_newcomer_is_closed_until_a_connection_goes_away(factory):
    """With MAX_CONNECTIONS connections held, the next one is refused; once one of them is
    lost, a newcomer is served again."""
    held = [connect(factory) for _ in range(MAX_CONNECTIONS)]
    for protocol, _transport in held:
        assert protocol is not None
        protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
    assert connect(factory) == (None, None)
    assert connect(factory) == (None, None)
    assert factory.over_limit.refused == 2
    held[0][0].connectionLost(Failure(ConnectionError("gone")))
    protocol, transport = connect(factory)
    assert protocol is not None
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")


def test_a_refused_newcomer_is_logged_as_the_fixed_bound_it_is(factory):
    """The warning for a connection past MAX_CONNECTIONS names the listener's fixed bound,
    not max_connections (a setting that does not change it)."""
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        held = [connect(factory) for _ in range(MAX_CONNECTIONS)]
        assert connect(factory) == (None, None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert all(protocol is not None for protocol, _transport in held)
    (warning,) = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
    assert warning == (f"metrics listener: {MAX_CONNECTIONS} connections at once reached (a "
                       "fixed bound): 1 time(s) since the last warning; the newcomer was closed")


def test_a_connection_trickling_its_request_is_aborted_at_the_deadline(factory):
    """A client sending a header byte every second is aborted CONNECTION_SECONDS after it
    was accepted (an idle timeout alone would let it stay for ever)."""
    protocol, transport = connect(factory)
    for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"y" * 100:
        if transport.disconnected:
            break
        protocol.dataReceived(bytes([byte]))
        factory.clock.advance(1)
    assert transport.disconnected
    assert factory.clock.seconds() == CONNECTION_SECONDS
    protocol.connectionLost(Failure(ConnectionError("aborted")))
    assert factory.protocols == {} and factory.clock.getDelayedCalls() == []
