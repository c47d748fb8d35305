"""Log output: one plain line per event on a text stream, for journald and grep.

Contract: ``start_logging(stream, level, reactor=None)`` routes Twisted's global log publisher
to ``stream`` as ``<level> <text>`` lines (journald adds the time and the process name), with
tracebacks indented under the line that caused them; events below ``level`` are dropped, and
Twisted's own chatter (factory and port start/stop, legacy messages) below warn. With a
``reactor``, lines are flushed once per reactor turn rather than once per line: under load
that is one write for many decisions, and a line never waits longer than the turn it was
logged in. Warnings and errors are always flushed at once.
"""

from __future__ import annotations

from typing import cast

from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogBeginner

__all__ = ["start_logging", "LEVELS"]

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}
# Twisted's LogLevel comparison walks its constants on every event; a plain number does not.
_RANK = {LogLevel.debug: 0, LogLevel.info: 1, LogLevel.warn: 2, LogLevel.error: 3,
         LogLevel.critical: 4}
_QUIET_NAMESPACES = ("log_legacy", "twisted")


class _LineObserver:
    def __init__(self, stream, level: str, reactor=None) -> None:
        self.stream = stream
        self.minimum = _RANK[LEVELS[level]]
        self.reactor = reactor
        self.flush_pending = False

    def __call__(self, event) -> None:
        level = event.get("log_level", LogLevel.info)
        rank = _RANK.get(level, 1)
        if rank < self.minimum:
            return
        namespace = event.get("log_namespace", "")
        if rank < 2 and namespace.startswith(_QUIET_NAMESPACES):
            return
        # The decision lines are preformatted ("{line}"): skip the format machinery for them.
        text = event["line"] if event.get("log_format") == "{line}" else formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + "\n".join("    " + line
                                     for line in failure.getTraceback().rstrip().splitlines())
        try:
            self.stream.write(f"{level.name} {text}\n")
            if rank >= 2 or self.reactor is None:
                self.stream.flush()
            elif not self.flush_pending:
                self.flush_pending = True
                self.reactor.callLater(0, self.flush)
        except (OSError, ValueError):
            pass  # a closed stdout must not take the daemon down

    def flush(self) -> None:
        self.flush_pending = False
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass


def start_logging(stream, level: str = "info", reactor=None) -> None:
    observer = _LineObserver(stream, level, reactor)
    # An observer is any callable taking the event (ILogObserver is a zope interface).
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, observer)], redirectStandardIO=False)
    if reactor is not None:
        reactor.addSystemEventTrigger("after", "shutdown", observer.flush)
