"""The daemon's life as systemd sees it: sockets passed in, ready, reloading, watchdog, stopping.

Contract: ``Lifecycle.from_environment(reactor, service)`` takes what systemd put in the
environment (``systemd.Notifier``, ``systemd.take_listen_fds``, ``systemd.watchdog_seconds``;
all removed from it, so no child inherits them) and raises ``ConfigError`` for socket
activation variables that do not parse. It starts the watchdog pings (``WATCHDOG=1`` from
the reactor, every half of ``WatchdogSec=``) and registers the graceful stop as a
"before shutdown" trigger: ``STOPPING=1``, then ``stopping.drain`` of the ports ``ready()``
was given, bounded by ``grace_seconds`` (the decision deadline in force when the stop begins,
a reload's included, plus one second: every policy request already received has its answer,
451 at worst, by then).
``inherited`` is the ``(fd, name)`` list for ``PolicyService.listen``. ``ready(ports)`` sends
``READY=1`` (call it once the listeners are bound and privileges dropped).
``waiting(seconds, status)``, called before a start-up wait bounded by ``seconds`` (the first
opt-in table from PostgreSQL), sends ``EXTEND_TIMEOUT_USEC`` for ``seconds`` plus
``START_MARGIN_SECONDS``, so systemd's start timeout (``DefaultTimeoutStartSec=``, 90 s) does
not kill a start that would have gone on with the last-good copy.
``reloading(action)`` wraps the SIGHUP action: ``RELOADING=1`` with ``MONOTONIC_USEC``,
the action, then ``READY=1`` (even when the action failed: the old configuration serves on).
Not under systemd, each of these only does the daemon's own part (the drain, the action).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from policyd_ipv6.daemon.config import ConfigError
from policyd_ipv6.daemon.stopping import drain
from policyd_ipv6.daemon.systemd import (
    Notifier,
    start_watchdog,
    take_listen_fds,
    watchdog_seconds,
)

__all__ = ["Lifecycle", "inherited_sockets", "START_MARGIN_SECONDS"]

# What may follow a start-up wait before READY=1: the table parsed (up to MAX_OPTIN_BYTES),
# the listeners bound, the DKIM workers spawned, privileges dropped.
START_MARGIN_SECONDS = 30.0


def inherited_sockets() -> list[tuple[int, str]]:
    """The sockets systemd passed, as ``(fd, name)``; ConfigError when they are malformed."""
    try:
        return take_listen_fds()  # os.environ, or what Twisted took out of it
    except ValueError as error:
        raise ConfigError(f"socket activation: {error}") from None


class Lifecycle:
    def __init__(self, reactor, service, notifier: Notifier,
                 inherited: list[tuple[int, str]], watchdog: float | None) -> None:
        self.reactor = reactor
        self.service = service
        self.notifier = notifier
        self.inherited = inherited
        self.ports: list = []
        self.pings = None
        if watchdog is not None and notifier.enabled:
            self.pings = start_watchdog(reactor, notifier, watchdog)
        reactor.addSystemEventTrigger("before", "shutdown", self.stop)

    @classmethod
    def from_environment(cls, reactor, service,
                         inherited: list[tuple[int, str]] | None = None) -> Lifecycle:
        env = os.environ
        if inherited is None:
            inherited = inherited_sockets()
        watchdog = watchdog_seconds(env, os.getpid())
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        return cls(reactor, service, Notifier.from_environment(env), inherited, watchdog)

    @property
    def grace_seconds(self) -> float:
        """The decision deadline in force (a reload may have changed it) plus one second."""
        return self.service.config.decision_deadline_seconds + 1.0

    def ready(self, ports) -> None:
        self.ports = list(ports)
        self.notifier.ready("serving on %d listener(s)" % len(self.ports))

    def waiting(self, seconds: float, status: str) -> None:
        """A start-up wait of up to ``seconds`` begins: systemd is told the start may last
        that long and ``START_MARGIN_SECONDS`` more."""
        # One line: a connection string may hold a newline, which sd_notify cannot carry.
        self.notifier.extend_timeout(seconds + START_MARGIN_SECONDS, " ".join(status.split()))

    def reloading(self, action: Callable[[], object]) -> Callable[[], None]:
        def reload() -> None:
            self.notifier.reloading()
            try:
                action()
            finally:
                self.notifier.ready()
        return reload

    def stop(self):
        """The "before shutdown" trigger: a Deferred that fires when draining is over."""
        self.notifier.stopping()
        # The watchdog pings go on while draining: the drain is bounded.
        milter = getattr(self.service, "milter_factory", None)
        return drain(self.reactor, self.ports, self.service.factory, milter,
                     self.grace_seconds)
