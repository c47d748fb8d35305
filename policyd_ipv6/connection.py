"""What the policy and milter adapters share: an idle timer per connection, a printable peer.

Contract: ``TimedConnection`` is a mixin for a Twisted ``Protocol`` whose factory has
``clock`` and ``idle_timeout_seconds``. ``_arm_timer()`` starts the timer, or restarts it if it
is running; when it fires, ``self.timer`` is None and the subclass's ``_timed_out()`` runs
(it decides: close, or re-arm while the daemon itself is still working). ``_stop_timer()``
cancels it (on connection loss). ``_peer()`` is the remote address, printable and bounded,
for log lines. ``OverLimitWarning`` logs "max_connections reached" at most once a minute, with
the count since the last line: a flood of connections must not become a flood of log lines.
No I/O of its own.
"""

from __future__ import annotations

from twisted.logger import Logger

from policyd_ipv6.text import printable

__all__ = ["TimedConnection", "OverLimitWarning", "WARN_INTERVAL_SECONDS"]

_log = Logger(namespace="policyd-ipv6")
WARN_INTERVAL_SECONDS = 60.0


class TimedConnection:
    timer = None

    def _arm_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.factory.idle_timeout_seconds)
        else:
            self.timer = self.factory.clock.callLater(self.factory.idle_timeout_seconds,
                                                      self._fire)

    def _fire(self) -> None:
        self.timer = None
        self._timed_out()

    def _timed_out(self) -> None:
        raise NotImplementedError

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _peer(self) -> str:
        try:
            return printable(str(self.transport.getPeer()), 120)
        except Exception:  # a transport without a peer (tests, closed sockets)
            return "?"


class OverLimitWarning:
    """One warning a minute about connections turned away or evicted at ``max_connections``."""

    def __init__(self, clock, listener: str) -> None:
        self.clock = clock
        self.listener = listener  # "policy" or "milter"
        self.count = 0
        self.warned_at: float | None = None

    def note(self, limit: int, what: str) -> None:
        self.count += 1
        now = self.clock.seconds()
        if self.warned_at is not None and now - self.warned_at < WARN_INTERVAL_SECONDS:
            return
        _log.warn("{listener} max_connections={limit} reached: {n} time(s) since the last "
                  "warning; {what}", listener=self.listener, limit=limit, n=self.count,
                  what=what)
        self.count = 0
        self.warned_at = now
