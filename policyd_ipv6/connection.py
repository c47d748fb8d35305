"""What the policy and milter adapters share: an idle timer per connection, a printable peer.

Contract: ``TimedConnection`` is a mixin for a Twisted ``Protocol`` whose factory has
``clock`` and ``idle_timeout_seconds``. ``_arm_timer()`` starts the timer, or restarts it if it
is running; when it fires, ``self.timer`` is None and the subclass's ``_timed_out()`` runs
(it decides: close, or re-arm while the daemon itself is still working). ``_stop_timer()``
cancels it (on connection loss). ``_peer()`` is the remote address, printable and bounded,
for log lines. ``OverLimitWarning`` logs "max_connections reached" (or its ``headline``: a
listener with a fixed bound says so) at most once a minute, with the count since the last
line: a flood of connections must not become a flood of log lines.
``write_now(transport, data)`` is ``transport.write(data)`` that sends at once when nothing
else is queued on the connection (what a reply to one request always finds): Twisted's
write would register for writability, wait a reactor turn and unregister, two system calls
and a turn per reply; a partial send leaves the rest to ``transport.write``, an error leaves
all of it (Twisted then finds the error and closes), and a transport without Twisted's
file-descriptor internals (a TLS or test transport) just gets ``write``.
``ReplyWriter(clock)`` holds the replies written during one reactor turn and sends them
back to back at its end (``clock.callLater(0, ...)`` runs right after the turn's events), each
through ``write_now``: under load one turn answers many connections, and the decisions then
run one after another, not each after the kernel's work of sending the last reply, which
evicts their code and data from the CPU's caches (bench/README, "Replies at the end of the
turn").
A reply waits at most for the other events of its turn; ``release(transport)`` sends the
held replies at once, that connection's among them (before it is closed); a transport
without Twisted's socket internals gets ``write`` at once.
``OverLimitWarning`` and ``PeerCheck`` keep ``refused``, the connections closed since
start-up (metrics).
``PeerCheck(clock, listener, uids)`` admits a Unix-socket peer only when its uid, read with
SO_PEERCRED, is one of ``uids`` (None: every peer); peers on other sockets are admitted (TCP
carries no credentials). No I/O of its own beyond that socket option.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.logger import Logger

from policyd_ipv6.text import printable
from policyd_ipv6.vocabulary import Clock, DelayedCall

__all__ = ["TimedConnection", "OverLimitWarning", "PeerCheck", "peer_uid",
           "WARN_INTERVAL_SECONDS", "write_now", "ReplyWriter"]

_log = Logger(namespace="policyd-ipv6")
WARN_INTERVAL_SECONDS = 60.0


def write_now(transport: Any, data: bytes) -> None:
    """See the module docstring."""
    try:
        idle = (transport.connected and not transport.disconnecting
                and not transport._writeDisconnected and transport.producer is None
                and not transport._tempDataBuffer
                and len(transport.dataBuffer) <= transport.offset)
        send = transport.writeSomeData
    except AttributeError:  # not a Twisted socket transport
        idle = False
    if not idle:
        transport.write(data)
        return
    sent = send(data)
    if not isinstance(sent, int) or sent < 0:  # CONNECTION_LOST & co: Twisted's path closes
        transport.write(data)
    elif sent < len(data):
        transport.write(data[sent:])


class ReplyWriter:
    """See the module docstring."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.held: list[tuple[Any, bytes]] = []

    def write(self, transport: Any, data: bytes) -> None:
        if not hasattr(transport, "writeSomeData"):  # not a Twisted socket: nothing to gain
            transport.write(data)
            return
        if not self.held:
            self.clock.callLater(0, self.flush)
        self.held.append((transport, data))

    def flush(self) -> None:
        held, self.held = self.held, []
        for transport, data in held:
            write_now(transport, data)

    def release(self, transport: Any) -> None:
        """Send the turn's held replies now, ``transport``'s among them, in order (it is about
        to be closed). All of them, not only its own: a drain closes every connection in one
        turn, and picking one connection's replies out of the list each time would cost the
        square of their number; the others' go out a little before the turn's end."""
        if self.held:
            self.flush()


class TimedConnection:
    # Set by the Twisted Protocol this is mixed into. Typed Any: Twisted declares them as
    # zope.interface types, whose methods mypy cannot call (they are declared without self).
    factory: Any
    transport: Any
    timer: DelayedCall | None = None

    due = 0.0  # when the timer is to fire: moved on at every arm, read when it goes off

    def _arm_timer(self) -> None:
        # Lazy: an arm only moves ``due`` on (it runs twice per request); the delayed call is
        # moved only when the timeout got shorter (a reload), and when it goes off early,
        # ``_fire`` sets it again for what is left.
        clock, seconds = self.factory.clock, self.factory.idle_timeout_seconds
        self.due = due = clock.seconds() + seconds
        timer = self.timer
        if timer is None:
            self.timer = clock.callLater(seconds, self._fire)
        elif timer.getTime() > due:
            timer.reset(seconds)

    def _fire(self) -> None:
        clock = self.factory.clock
        left = self.due - clock.seconds()
        if left > 0:
            self.timer = clock.callLater(left, self._fire)
            return
        self.timer = None
        self._timed_out()

    def _timed_out(self) -> None:
        raise NotImplementedError

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None

    def _peer(self) -> str:
        try:
            return printable(str(self.transport.getPeer()), 120)
        except Exception:  # a transport without a peer (tests, closed sockets)
            return "?"


class OverLimitWarning:
    """One warning a minute about connections turned away or evicted at ``max_connections``
    (or, with its own ``headline``, at a listener's fixed bound)."""

    def __init__(self, clock: Clock, listener: str,
                 headline: str = "{listener} max_connections={limit} reached") -> None:
        self.clock = clock
        self.listener = listener  # "policy", "milter" or "metrics"
        self.headline = headline  # a log format: {listener} and {limit} filled in
        self.count = 0
        self.refused = 0
        self.warned_at: float | None = None

    def note(self, limit: int, what: str) -> None:
        self.count += 1
        self.refused += 1
        now = self.clock.seconds()
        if self.warned_at is not None and now - self.warned_at < WARN_INTERVAL_SECONDS:
            return
        _log.warn(self.headline + ": {n} time(s) since the last warning; {what}",
                  listener=self.listener, limit=limit, n=self.count, what=what)
        self.count = 0
        self.warned_at = now


def peer_uid(transport) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED: the peer's
    credentials when it connected, which it cannot forge), or None for any other socket."""
    try:
        handle = transport.getHandle()
    except Exception:  # a transport without a socket (tests)
        return None
    if getattr(handle, "family", None) != socket.AF_UNIX:
        return None
    creds = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]  # struct ucred: pid, uid, gid


class PeerCheck:
    """Who may talk to a Unix listener. Any local user can connect to a TCP port, and on
    the milter port could register a fake SMTP session to turn its SPF failure into DUNNO;
    a Unix socket tells us who connected, so only Postfix's users (``milter_peer_users``,
    root and postfix by default) are served there. A refused peer is closed without a reply,
    with a warning at most once a minute (a local flood is not a flood of log lines)."""

    def __init__(self, clock, listener: str, uids: frozenset[int] | None = None) -> None:
        self.uids = uids
        self.clock = clock
        self.listener = listener
        self.count = 0
        self.refused = 0
        self.warned_at: float | None = None

    def admits(self, transport) -> bool:
        if self.uids is None:
            return True
        uid = peer_uid(transport)
        if uid is None or uid in self.uids:
            return True
        self.count += 1
        self.refused += 1
        now = self.clock.seconds()
        if self.warned_at is None or now - self.warned_at >= WARN_INTERVAL_SECONDS:
            _log.warn("{listener} connection from uid {uid} refused: not one of "
                      "milter_peer_users ({n} refused since the last warning)",
                      listener=self.listener, uid=uid, n=self.count)
            self.count = 0
            self.warned_at = now
        return False
