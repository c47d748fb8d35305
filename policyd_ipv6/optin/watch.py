"""Keeps the opt-in table current: re-read when the file changes and on SIGHUP.

Contract: ``OptinWatcher(path, clock, interval_seconds)`` loads the file at once and raises
``OSError`` or ``OptinSyntaxError`` if it cannot (at start-up a missing or bad table is a
configuration error: an empty table would refuse all IPv6 mail). Afterwards ``table`` is always
the last table that loaded without error: a file that is deleted, unreadable or invalid leaves
the previous table in force and logs one error naming the file and line, until it is good
again. ``start()`` polls the file's identity (inode, size, mtime) every ``interval_seconds``
(none for 0); ``reload(why)`` re-reads it unconditionally (SIGHUP). ``loaded_at`` is the
clock's time of the last load that succeeded, ``failures`` the loads that failed (metrics).
The table is loaded before the privilege drop and ``start()`` is called after it: if the
running user cannot see or read the file (a clone in /root, mode 700), ``start()`` logs one
warning naming the file and the user, and that state is not a change: the poll stays silent
until the file can be seen again (a genuine change it can then not read is an error as above).
The read is a small local file read on the reactor thread; no DNS, no network.
"""

from __future__ import annotations

import errno
import os
import pwd

from twisted.internet import task
from twisted.logger import Logger

from policyd_ipv6.optin.table import OptinSyntaxError, OptinTable, load_optin

__all__ = ["OptinWatcher"]

_log = Logger(namespace="policyd-ipv6")


class OptinWatcher:
    def __init__(self, path: str, clock, interval_seconds: float) -> None:
        self.path = path
        self.clock = clock
        self.interval_seconds = interval_seconds
        self._identity = self._stat()
        self.table: OptinTable = load_optin(path)
        self.loaded_at = clock.seconds()
        self.failures = 0
        self._last_error: str | None = None
        self._loop: task.LoopingCall | None = None
        self._warned_unreadable = False

    def __call__(self) -> OptinTable:
        return self.table

    def start(self) -> None:
        self._check_access()
        if self.interval_seconds > 0:
            self._loop = task.LoopingCall(self.poll)
            self._loop.clock = self.clock
            self._loop.start(self.interval_seconds, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError as error:
            return ("error", error.errno)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _check_access(self) -> None:
        """Warn once if the running user cannot see or read the file it loaded as root."""
        identity = self._stat()
        if identity[0] == "error" and identity[1] in (errno.EACCES, errno.EPERM):
            # Hidden by a directory's mode, not changed: the poll must not call it a change.
            self._identity = identity
        elif identity[0] == "error" or os.access(self.path, os.R_OK):
            return  # gone since the load (the poll reports that) or readable
        if self._warned_unreadable:
            return
        self._warned_unreadable = True
        reason = os.strerror(identity[1] if identity[0] == "error" else errno.EACCES)
        _log.warn("opt-in file {path} cannot be read by user {user} ({reason}): the table "
                  "loaded at start-up stays in force ({count} entries), but changes to it are "
                  "not picked up until restart: make it readable by {user}",
                  path=self.path, user=_running_user(), reason=reason, count=len(self.table))

    def poll(self) -> None:
        identity = self._stat()
        if identity != self._identity:
            self._identity = identity
            self.reload("file changed")

    def reload(self, why: str) -> bool:
        """Re-read the file; True if a new table is in force."""
        self._identity = self._stat()
        try:
            table = load_optin(self.path)
        except (OSError, OptinSyntaxError) as error:
            text = str(error) if isinstance(error, OptinSyntaxError) else (
                f"{self.path}: {error.strerror}")
            if text != self._last_error:
                _log.error("opt-in table not reloaded ({why}): {error}; keeping the previous "
                           "table ({count} entries)", why=why, error=text, count=len(self.table))
            self._last_error = text
            self.failures += 1
            return False
        self._last_error = None
        self.table = table
        self.loaded_at = self.clock.seconds()
        _log.info("opt-in table loaded ({why}): {path}, {count} entries", why=why,
                  path=self.path, count=len(table))
        return True


def _running_user() -> str:
    """The name of the user the process runs as now (its uid if it has no name)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
