"""What the policy and milter adapters share: an idle timer per connection, a printable peer.

Contract: ``TimedConnection`` is a mixin for a Twisted ``Protocol`` whose factory has
``clock`` and ``idle_timeout_seconds``. ``_arm_timer()`` starts the timer, or restarts it if it
is running; when it fires, ``self.timer`` is None and the subclass's ``_timed_out()`` runs
(it decides: close, or re-arm while the daemon itself is still working). ``_stop_timer()``
cancels it (on connection loss). ``_peer()`` is the remote address, printable and bounded,
for log lines. No I/O of its own.
"""

from __future__ import annotations

from .addresses import printable

__all__ = ["TimedConnection"]


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
