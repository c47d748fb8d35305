"""Log output: one plain line per event on a text stream, for journald and grep.

Contract: ``start_logging(stream, level)`` routes Twisted's global log publisher to ``stream``
as ``<level> <text>`` lines (journald adds the time and the process name), with tracebacks
indented under the line that caused them; events below ``level`` are dropped. Twisted's own
chatter (factory start/stop) is kept at debug.
"""

from __future__ import annotations

from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            formatEvent, globalLogBeginner)

__all__ = ["start_logging", "LEVELS"]

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}


def _observer(stream):
    def write(event) -> None:
        level = event.get("log_level", LogLevel.info)
        # The decision lines are preformatted ("{line}"): skip the format machinery for them.
        text = event["line"] if event.get("log_format") == "{line}" else formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + "\n".join("    " + line
                                     for line in failure.getTraceback().rstrip().splitlines())
        try:
            stream.write(f"{level.name} {text}\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not take the daemon down
    return write


def start_logging(stream, level: str = "info") -> None:
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    # Twisted's internals log "Starting factory ..." etc. at info: not news for an administrator.
    for namespace in ("log_legacy", "twisted"):
        predicate.setLogLevelForNamespace(namespace, LogLevel.warn)
    observer = FilteringLogObserver(_observer(stream), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
