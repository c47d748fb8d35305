"""The Twisted adapter for the policy protocol: bytes from Postfix in, replies out.

Contract: ``PolicyFactory(engine, clock, max_connections, idle_timeout_seconds)`` builds one
``PolicyProtocol`` per connection. Requests on a connection are answered strictly in order
(one request, one reply; the connection stays open for more). Replies leave at the end of
the reactor turn that decided them (``connection.ReplyWriter``). Postfix's failure contract
(SMTPD_POLICY_README: "in case of trouble the policy server must not send a reply; instead
the server must log a warning and disconnect") applies to a malformed request, a connection
idle for ``idle_timeout_seconds``, a request that has not arrived whole that long after its
first byte (a client trickling bytes cannot hold a connection), and more than ``MAX_QUEUED``
requests sent ahead of their replies.

Connections beyond ``max_connections``: the connection idle the longest is closed to make room
(Postfix reconnects on its next request, transparently); only when every connection is busy is
the newcomer closed. Either way Postfix retries, so no mail is lost, and the warning is logged
at most once a minute with a count. On a Unix socket, a peer whose uid (SO_PEERCRED) is not in
``peer_uids`` is closed at once (``connection.PeerCheck``). Parsing is the codec's, deciding
the engine's; this module only moves bytes and keeps time.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from policyd_ipv6.connection import OverLimitWarning, PeerCheck, ReplyWriter, TimedConnection
from policyd_ipv6.live import Live, Setting
from policyd_ipv6.policy.codec import PolicyDecoder, PolicyProtocolError, encode_reply

__all__ = ["PolicyFactory", "PolicyProtocol", "MAX_QUEUED"]

_log = Logger(namespace="policyd-ipv6")

# Postfix never sends a request before the previous reply; a peer that does is bounded.
MAX_QUEUED = 16


class PolicyProtocol(TimedConnection, protocol.Protocol):
    def __init__(self, factory: PolicyFactory) -> None:
        self.factory = factory
        self.decoder = PolicyDecoder()
        self.queue: deque = deque()
        self.busy = False
        self.closed = False
        self.answered = 0  # replies written (a graceful stop waits for a first request)

    @property
    def idle(self) -> bool:
        """Waiting for the client's next request, with nothing of it received yet."""
        return not (self.busy or self.queue or self.decoder.pending or self.closed)

    def connectionMade(self) -> None:
        if not self.factory.peer_check.admits(self.transport) or not self.factory.admit(self):
            self._close()
            return
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        started = not self.decoder.pending
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
        # The clock of a request starts at its first byte: more bytes of the same request do
        # not restart it, so trickling cannot hold a connection for ever. A whole request needs
        # no arm here: its reply arms the clock (at once on the warm path), and the timer
        # going off while the answer is under way only arms it again (``_timed_out``).
        if started and not requests:
            self._arm_timer()
        self.factory.touch(self)
        self._next()

    def _next(self) -> None:
        if self.busy or self.closed or not self.queue:
            return
        self.busy = True
        # Decided at once when every fact is known (the warm path), else the engine calls
        # _answered (or _failed) when the facts came; no Deferred either way.
        try:
            outcome = self.factory.engine.answer_with(self.queue.popleft(), self._answered,
                                                      self._failed)
            if outcome is not None:
                self._reply(outcome)
        except Exception:
            self._failed(Failure())

    def _answered(self, outcome) -> None:
        try:
            self._reply(outcome)
        except Exception:
            self._failed(Failure())

    def _reply(self, outcome) -> None:
        self.busy = False
        if self.closed:
            return
        self.factory.writer.write(self.transport, encode_reply(outcome.verdict.action))
        self.answered += 1
        self._arm_timer()
        self._next()

    def _failed(self, failure) -> None:
        # A bug: Postfix's contract says close without a reply; it retries, then applies its
        # default_action (451 4.3.5 by default), so no mail is lost.
        self.busy = False
        _log.failure("internal error answering a policy request; closing the connection",
                     failure)
        self._close()

    def _timed_out(self) -> None:
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
        self.factory.writer.release(self.transport)  # its last replies before the close
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.closed = True
        self.factory.forget(self)
        self._stop_timer()


class PolicyFactory(protocol.Factory):
    noisy = False

    idle_timeout_seconds = Setting("idle_timeout_seconds")  # reloadable (``live``)
    live: Live | None = None

    def __init__(self, engine, clock, max_connections: int = 1000,
                 idle_timeout_seconds: float = 600.0,
                 peer_uids: frozenset[int] | None = None) -> None:
        self.engine = engine
        self.clock = clock
        self.max_connections = max_connections
        self.idle_timeout_seconds = idle_timeout_seconds
        # Open connections, least recently active first.
        self.open: OrderedDict[PolicyProtocol, None] = OrderedDict()
        self.over_limit = OverLimitWarning(clock, "policy")
        self.peer_check = PeerCheck(clock, "policy", peer_uids)
        self.writer = ReplyWriter(clock)  # replies leave at the end of the reactor turn

    @property
    def connections(self) -> int:
        return len(self.open)

    def buildProtocol(self, addr) -> PolicyProtocol:
        return PolicyProtocol(self)

    def admit(self, proto: PolicyProtocol) -> bool:
        """Take a new connection in, closing the longest-idle one if the limit is reached."""
        if len(self.open) >= self.max_connections:
            victim = next((p for p in self.open if p.idle), None)
            self.over_limit.note(self.max_connections,
                                 "closed the longest-idle connection" if victim is not None
                                 else "every connection busy, closed the new one")
            if victim is None:
                return False
            victim._close()
            self.forget(victim)
        self.open[proto] = None
        return True

    def touch(self, proto: PolicyProtocol) -> None:
        if proto in self.open:
            self.open.move_to_end(proto)

    def forget(self, proto: PolicyProtocol) -> None:
        self.open.pop(proto, None)
