"""The Twisted adapter for the policy protocol: bytes from Postfix in, replies out.

Contract: ``PolicyFactory(engine, clock, max_connections, idle_timeout_seconds)`` builds one
``PolicyProtocol`` per connection. Requests on a connection are answered strictly in order
(one request, one reply; the connection stays open for more). Postfix's failure contract
(SMTPD_POLICY_README: "in case of trouble the policy server must not send a reply; instead
the server must log a warning and disconnect") applies to a malformed request, a connection
over ``max_connections``, one idle for ``idle_timeout_seconds`` or stuck mid-request that long,
and more than ``MAX_QUEUED`` requests sent ahead of their replies. Parsing is the codec's,
deciding the engine's; this module only moves bytes and keeps time.
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer, protocol
from twisted.logger import Logger

from .addresses import printable
from .policy_codec import PolicyDecoder, PolicyProtocolError, encode_reply

__all__ = ["PolicyFactory", "PolicyProtocol", "MAX_QUEUED"]

_log = Logger(namespace="policyd-ipv6")

# Postfix never sends a request before the previous reply; a peer that does is bounded.
MAX_QUEUED = 16


class PolicyProtocol(protocol.Protocol):
    def __init__(self, factory: PolicyFactory) -> None:
        self.factory = factory
        self.decoder = PolicyDecoder()
        self.queue: deque = deque()
        self.busy = False
        self.closed = False
        self.timer = None

    def connectionMade(self) -> None:
        self.factory.connections += 1
        if self.factory.connections > self.factory.max_connections:
            _log.warn("policy connection refused: more than max_connections={limit} open",
                      limit=self.factory.max_connections)
            self._close()
            return
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            requests = self.decoder.feed(data)
        except PolicyProtocolError as error:
            _log.warn("malformed policy request from {peer}, closing without a reply: {error}",
                      peer=self._peer(), error=str(error))
            self._close()
            return
        self.queue.extend(requests)
        if len(self.queue) > MAX_QUEUED:
            _log.warn("policy client {peer} sent more than {n} requests ahead of the replies, "
                      "closing", peer=self._peer(), n=MAX_QUEUED)
            self._close()
            return
        self._arm_timer()
        self._next()

    def _next(self) -> None:
        if self.busy or self.closed or not self.queue:
            return
        self.busy = True
        d = defer.maybeDeferred(self.factory.engine.answer, self.queue.popleft())
        d.addCallback(self._reply)
        d.addErrback(self._failed)

    def _reply(self, outcome) -> None:
        self.busy = False
        if self.closed:
            return
        self.transport.write(encode_reply(outcome.verdict.action))
        self._arm_timer()
        self._next()

    def _failed(self, failure) -> None:
        # A bug: Postfix's contract says close without a reply; it retries, then applies its
        # default_action (451 4.3.5 by default), so no mail is lost.
        self.busy = False
        _log.failure("internal error answering a policy request; closing the connection",
                     failure)
        self._close()

    def _arm_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.factory.idle_timeout_seconds)
        else:
            self.timer = self.factory.clock.callLater(self.factory.idle_timeout_seconds,
                                                      self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        if self.busy:  # waiting for our own answer, not for the client
            self._arm_timer()
            return
        if self.decoder.pending:
            _log.warn("policy client {peer} left a request unfinished for {s}s, closing",
                      peer=self._peer(), s=self.factory.idle_timeout_seconds)
        self._close()

    def _close(self) -> None:
        self.closed = True
        self.queue.clear()
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.closed = True
        self.factory.connections -= 1
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _peer(self) -> str:
        try:
            return printable(str(self.transport.getPeer()), 120)
        except Exception:
            return "?"


class PolicyFactory(protocol.Factory):
    def __init__(self, engine, clock, max_connections: int = 1000,
                 idle_timeout_seconds: float = 600.0) -> None:
        self.engine = engine
        self.clock = clock
        self.max_connections = max_connections
        self.idle_timeout_seconds = idle_timeout_seconds
        self.connections = 0

    def buildProtocol(self, addr) -> PolicyProtocol:
        return PolicyProtocol(self)
