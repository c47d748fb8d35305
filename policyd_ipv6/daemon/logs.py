"""Log output: one plain line per event on a text stream, for journald and grep.

Contract: ``start_logging(stream, level, reactor=None)`` routes Twisted's global log publisher
to ``stream`` as ``<level> <text>`` lines (journald adds the time and the process name), with
tracebacks indented under the line that caused them; events below ``level`` are dropped, and
Twisted's own chatter (factory and port start/stop, legacy messages) below warn. With a
``reactor``, lines are flushed once per reactor turn rather than once per line: under load
that is one write for many decisions, and a line never waits longer than the turn it was
logged in. Warnings and errors are always flushed at once.

When ``stream`` is the journal (``journal_stream(stream)``: the environment's
``JOURNAL_STREAM`` names the stream's device:inode, as systemd.exec(5) documents), every line,
a traceback's too, starts with its sd-daemon(3) priority (``<3>`` error, ``<4>`` warning,
``<6>`` info, ``<7>`` debug), which journald strips and stores as the entry's priority, so
``journalctl -p warning`` shows warnings and errors only.
"""

from __future__ import annotations

import os
from typing import cast

from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogBeginner

__all__ = ["start_logging", "journal_stream", "LEVELS", "PRIORITIES"]

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}
# Twisted's LogLevel comparison walks its constants on every event; a plain number does not.
_RANK = {LogLevel.debug: 0, LogLevel.info: 1, LogLevel.warn: 2, LogLevel.error: 3,
         LogLevel.critical: 4}
_QUIET_NAMESPACES = ("log_legacy", "twisted")
# sd-daemon(3) priorities, indexed by _RANK: debug, info, warning, error, critical.
PRIORITIES = ("<7>", "<6>", "<4>", "<3>", "<2>")


def journal_stream(stream, environ=None) -> bool:
    """True when ``stream`` is connected to the journal: ``JOURNAL_STREAM`` ("DEV:INODE",
    set by systemd for StandardOutput=journal) equals the stream's device and inode."""
    wanted = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
        device, _, inode = wanted.partition(":")
        return (int(device), int(inode)) == (info.st_dev, info.st_ino)
    except (AttributeError, OSError, ValueError):
        return False  # no descriptor (a StringIO), closed, or no JOURNAL_STREAM


class _LineObserver:
    def __init__(self, stream, level: str, reactor=None, journal: bool = False) -> None:
        self.stream = stream
        self.journal = journal
        self.minimum = _RANK[LEVELS[level]]
        self.reactor = reactor
        self.flush_pending = False

    def __call__(self, event) -> None:
        if (event.get("log_format") == "{line}" and event.get("log_level") is LogLevel.info
                and "log_failure" not in event and "\n" not in event["line"]):
            # A decision line (one per request): preformatted, one line, info. What the
            # general path below makes of it, with fewer steps.
            if self.minimum > 1 or event.get("log_namespace", "").startswith(_QUIET_NAMESPACES):
                return
            self._write(("<6>info " if self.journal else "info ") + event["line"] + "\n", 1)
            return
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
        text = f"{level.name} {text}\n"
        if self.journal:  # journald reads each line as an entry: each gets its priority
            prefix = PRIORITIES[rank]
            text = prefix + text.replace("\n", "\n" + prefix, text.count("\n") - 1)
        self._write(text, rank)

    def _write(self, text: str, rank: int) -> None:
        try:
            self.stream.write(text)
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


def start_logging(stream, level: str = "info", reactor=None, journal: bool | None = None) -> None:
    """Route Twisted's log events to ``stream``; ``journal`` None: ``journal_stream(stream)``."""
    if journal is None:
        journal = journal_stream(stream)
    observer = _LineObserver(stream, level, reactor, journal)
    # An observer is any callable taking the event (ILogObserver is a zope interface).
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, observer)], redirectStandardIO=False)
    if reactor is not None:
        reactor.addSystemEventTrigger("after", "shutdown", observer.flush)
