"""The opt-in table from PostgreSQL: LISTEN/NOTIFY, periodic reload, a last-good copy on disk.

Contract: ``PostgresOptin(settings, reactor, driver)`` (``driver``: the psycopg 3 module) has
the shape of ``watch.OptinWatcher`` (``table``, a call giving it, ``start``, ``stop``,
``reload(why)``, ``interval_seconds``), plus ``ready()``: a Deferred that fires with the first
table, from the database, or from the last-good copy (``optin-domains.last-good`` in
``state_directory``, warning logged) when the first try fails or the database does not answer
within ``connect_timeout_seconds``; with neither it fails with ``StartError`` naming the key.
The daemon listens only after it fired. Afterwards ``table`` is the last table that loaded:
the database going away leaves it in force while a reconnection is tried, 1 s after the
failure, doubling up to 30 s. ``connect_timeout_seconds`` bounds the wait for the query's
rows, not the parse that follows. A table whose text is over ``table.MAX_OPTIN_BYTES`` (the
bound of an opt-in file, which its last-good copy is) is refused like a failed try: the table
in force stays, and the copy is never one the next start could not read. ``origin`` says
where the table in force came from ("database", "last-good copy"), ``skipped_rows`` how many
rows the last load left out (each is logged with a warning naming it, when the set changes),
``loaded_at`` the reactor's time of the last load from the database and ``failures`` the
tries that failed (the metrics read them).

Why a dedicated thread, not the reactor: libpq's connect resolves host names and reads the
passfile with blocking calls, psycopg's non-blocking API is asyncio's, not Twisted's, and a
query's cost grows with the table. One thread owns the connection: it connects, LISTENs on
the channel, runs the query, writes the last-good copy atomically (temporary file, fsync,
rename) only when its text changed, then waits in ``select()`` on the connection's socket and a
wake-up pipe until a NOTIFY arrives (the reload then starts at once), ``interval_seconds`` pass,
``reload()`` is called or ``stop()``. It hands finished tables to the reactor with
``callFromThread``; a decision only reads ``table``, so nothing ever waits on the database.
Messages never contain the password (``rows.redact``, ``rows.secrets``).
"""

from __future__ import annotations

import os
import select
import tempfile
import threading
import time
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from policyd_ipv6.optin.rows import Loaded, redact, secrets, table_from_rows
from policyd_ipv6.optin.table import MAX_OPTIN_BYTES, OptinSyntaxError, OptinTable, load_optin

__all__ = ["PostgresOptin", "DatabaseSettings", "StartError", "LAST_GOOD", "MAX_BACKOFF_SECONDS"]

_log = Logger(namespace="policyd-ipv6")
LAST_GOOD = "optin-domains.last-good"
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0


class StartError(Exception):
    """Neither the database nor a last-good copy gave a table; the message names the key."""


class TableTooLarge(Exception):
    """The query's table is over the bound of an opt-in file (its last-good copy is one)."""


@dataclass(frozen=True)
class DatabaseSettings:
    conninfo: str
    query: str
    channel: str
    connect_timeout_seconds: float
    state_directory: str
    interval_seconds: float
    write_copy: bool = True  # ``check`` reads the database but leaves the daemon's copy alone


class PostgresOptin:
    def __init__(self, settings: DatabaseSettings, reactor, driver) -> None:
        self.settings = settings
        self.reactor = reactor
        self.interval_seconds = settings.interval_seconds
        self.where = redact(settings.conninfo)
        self.copy_path = os.path.join(settings.state_directory, LAST_GOOD)
        self.table = OptinTable({}, {})
        self.origin = "none"
        self.skipped_rows = 0
        self.loaded_at: float | None = None
        self.failures = 0
        self._skipped: tuple[str, ...] = ()
        self._text = ""
        self._last_problem: str | None = None
        self._verb = "does not answer"  # or "gives no usable table" (failed(refused=True))
        self._ready: defer.Deferred | None = None
        self._timer = None
        self._worker = _Worker(settings, driver, self)

    def __call__(self) -> OptinTable:
        return self.table

    def describe(self) -> str:
        return f"PostgreSQL {self.where}"

    def ready(self) -> defer.Deferred:
        """Start the worker; fires with the first table (see the module docstring)."""
        self._ready = defer.Deferred()
        self._timer = self.reactor.callLater(self.settings.connect_timeout_seconds,
                                             self._first_load_timed_out)
        self._worker.start()
        return self._ready

    def start(self) -> None:
        """Nothing to start: the worker runs since ``ready()`` and reloads by itself."""

    def stop(self) -> None:
        self._worker.stop()

    def reload(self, why: str) -> bool:
        """Ask the worker for a reload now (SIGHUP); the table changes when it is loaded."""
        self._worker.wake(why)
        return True

    # Called on the reactor thread (callFromThread) by the worker.
    def answered(self) -> None:
        """The query returned: the database answers, so the start-up timeout is over (turning
        the rows into a table may take longer; it is bounded by MAX_OPTIN_BYTES)."""
        if self._ready is not None and self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None

    def loaded(self, loaded: Loaded, why: str, copy_problem: str | None) -> None:
        first = self.origin != "database"
        changed = first or loaded.text != self._text
        self.table, self._text, self.origin = loaded.table, loaded.text, "database"
        self.skipped_rows = len(loaded.skipped)
        self.loaded_at = self.reactor.seconds()
        if loaded.skipped != self._skipped:
            for message in loaded.skipped:
                _log.warn("opt-in table: {message}", message=message)
        self._skipped = loaded.skipped
        if self._last_problem is not None:
            _log.info("opt-in table: PostgreSQL {where} answers again", where=self.where)
        self._last_problem = None
        if changed:
            _log.info("opt-in table loaded from PostgreSQL ({why}): {where}, {count} entries"
                      "{skipped}", why=why, where=self.where, count=len(loaded.table),
                      skipped=f", {len(loaded.skipped)} rows skipped" if loaded.skipped else "")
        if copy_problem is not None:
            _log.warn("opt-in table: cannot write the last-good copy {path}: {problem}",
                      path=self.copy_path, problem=copy_problem)
        self._fire(None)

    def failed(self, problem: str, retry_seconds: float, refused: bool = False) -> None:
        """A try failed: the database did not answer, or (``refused``) its table was refused."""
        self.failures += 1
        self._verb = "gives no usable table" if refused else "does not answer"
        if problem != self._last_problem:
            _log.warn("opt-in table: PostgreSQL {where} {verb} ({problem}); the table "
                      "in force stays ({count} entries, from {origin}); next try in {retry} s",
                      where=self.where, verb=self._verb, problem=problem,
                      count=len(self.table), origin=self.origin, retry=retry_seconds)
        self._last_problem = problem
        # At start-up a database that refuses is as good as silent: serve the copy at once
        # (an unusable one waits for the timeout, which names the problem).
        if self._ready is not None and self._from_copy(problem) is None:
            self._fire(None)

    def _first_load_timed_out(self) -> None:
        self._timer = None
        problem = self._last_problem or (
            f"no answer within optin_connect_timeout_seconds = "
            f"{self.settings.connect_timeout_seconds}")
        self._fire(self._from_copy(problem))

    def _from_copy(self, problem: str) -> StartError | None:
        """Serve the last-good copy; the StartError to fail start-up with when there is none."""
        try:
            table = load_optin(self.copy_path)
        except (OSError, OptinSyntaxError) as error:
            why = error.strerror if isinstance(error, OSError) else str(error)
            return StartError(
                f"optin_postgresql = {self.where}: the database {self._verb} ({problem}) "
                f"and there is no usable last-good copy {self.copy_path} ({why}); "
                "state_directory keeps one after each load from the database")
        self.table, self.origin, self._text = table, "last-good copy", ""
        _log.warn("opt-in table: PostgreSQL {where} {verb} ({problem}); serving the "
                  "last-good copy {path} ({count} entries) until it does", where=self.where,
                  verb=self._verb, problem=problem, path=self.copy_path, count=len(table))
        return None

    def _fire(self, error: StartError | None) -> None:
        ready, self._ready = self._ready, None
        if ready is None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if error is not None:
            self.stop()
            ready.errback(error)
        else:
            ready.callback(self.table)


class _Worker:
    """The thread that owns the database connection (see the module docstring)."""

    def __init__(self, settings: DatabaseSettings, driver, owner: PostgresOptin) -> None:
        self.settings, self.driver, self.owner = settings, driver, owner
        self.secrets = secrets(settings.conninfo)
        self._stopping = threading.Event()
        self._why: str | None = None
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self._thread = threading.Thread(target=self._run, name="policyd-ipv6 opt-in database",
                                        daemon=True)
        self._written = self._current_copy()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._poke()

    def wake(self, why: str) -> None:
        self._why = why
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._write, b"x")
        except OSError:
            pass  # the pipe is full: the worker is already being woken

    def _call(self, method, *args) -> None:
        if not self._stopping.is_set():
            self.owner.reactor.callFromThread(method, *args)

    def _scrub(self, error: BaseException) -> str:
        text = " ".join(str(error).split()) or type(error).__name__
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def _run(self) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        why = "start-up"
        while not self._stopping.is_set():
            try:
                with self._connect() as connection:
                    self._listen(connection)
                    self._serve(connection, why)
            except Exception as error:  # the driver's errors, a bad row shape, anything
                if self._stopping.is_set():
                    break
                self._call(self.owner.failed, self._scrub(error), backoff,
                           isinstance(error, TableTooLarge))
                self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                why = "reconnected"
        os.close(self._read)
        os.close(self._write)

    def _connect(self):
        return self.driver.connect(
            self.settings.conninfo, autocommit=True, application_name="policyd-ipv6",
            connect_timeout=max(2, int(self.settings.connect_timeout_seconds + 0.999)))

    def _listen(self, connection) -> None:
        """Bound every query by the timeout, then LISTEN before the first load: a change
        committed while it runs is not missed."""
        settings = self.settings
        timeout_ms = int(max(settings.connect_timeout_seconds, 1.0) * 1000)
        connection.execute(f"SET statement_timeout = {timeout_ms}")
        connection.add_notify_handler(lambda notify: self._notified())
        listen = self.driver.sql.SQL("LISTEN {}").format(self.driver.sql.Identifier(
            settings.channel))
        connection.execute(listen)

    def _notified(self) -> None:
        self._why = self._why or "NOTIFY"

    def _serve(self, connection, why: str) -> None:
        while not self._stopping.is_set():
            self._why = None
            rows = connection.execute(self.settings.query).fetchall()
            self._call(self.owner.answered)
            loaded = table_from_rows(rows, "optin_query")
            size = len(loaded.text.encode("utf-8"))
            if size > MAX_OPTIN_BYTES:
                # Its last-good copy could not be read back at the next start without the
                # database: refused here, like an opt-in file of that size.
                raise TableTooLarge(f"optin_query gives a table of {size} bytes, over the "
                                    f"{MAX_OPTIN_BYTES} bytes an opt-in table may have")
            problem = self._keep_copy(loaded.text)
            self._call(self.owner.loaded, loaded, why, problem)
            why = self._wait(connection)

    def _wait(self, connection) -> str:
        """Until a reason to reload (returned) or stop; raises when the connection breaks."""
        interval = self.owner.interval_seconds
        deadline = time.monotonic() + interval if interval > 0 else None
        while not self._stopping.is_set():
            if self._why is not None:
                return self._why
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return "every optin_reload_interval_seconds"
            ready, _, _ = select.select([connection.fileno(), self._read], [], [], left)
            if self._read in ready:
                self._drain()
            if connection.fileno() in ready:
                connection.execute("SELECT 1")  # delivers NOTIFYs to _notified, or raises
        return "stopping"

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping.is_set() and (left := end - time.monotonic()) > 0:
            select.select([self._read], [], [], left)
            self._drain()

    def _drain(self) -> None:
        try:
            while os.read(self._read, 512):
                pass
        except OSError:
            pass  # empty (EAGAIN)

    def _current_copy(self) -> str | None:
        try:
            with open(os.path.join(self.settings.state_directory, LAST_GOOD),
                      encoding="utf-8") as handle:
                return handle.read()
        except (OSError, UnicodeDecodeError):
            return None

    def _keep_copy(self, text: str) -> str | None:
        """Write the last-good copy atomically if its text changed; the problem, or None."""
        if not self.settings.write_copy or text == self._written:
            return None
        directory = self.settings.state_directory
        try:
            fd, temporary = tempfile.mkstemp(prefix=".optin-domains.", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(temporary, 0o644)
                os.replace(temporary, os.path.join(directory, LAST_GOOD))
            except BaseException:
                os.unlink(temporary)
                raise
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            return f"{error.strerror} ({directory})"
        self._written = text
        return None
