"""The PostgreSQL opt-in source's bounds, without a database: a table over the opt-in file
bound is refused (the table in force stays, no last-good copy the next start could not read),
and the start-up timeout ends once the query has returned.

The worker's loop runs on this thread with a fake psycopg connection; the reactor is a fake
clock whose ``callFromThread`` calls at once.
"""

import os
import types

import pytest
from twisted.internet import task

from policyd_ipv6.optin import postgresql
from policyd_ipv6.optin.postgresql import LAST_GOOD, DatabaseSettings, PostgresOptin
from policyd_ipv6.optin.table import load_optin


class Reactor(task.Clock):
    def callFromThread(self, f, *args):
        f(*args)


class Connection:
    def __init__(self, rows):
        self.rows = rows

    def execute(self, query):
        return types.SimpleNamespace(fetchall=lambda: self.rows)


class _Context:
    def __init__(self, connection):
        self.connection = connection

    def __enter__(self):
        return self.connection

    def __exit__(self, *exc):
        return False


def rows(count):
    return [(f"customer-{i:05d}.hosting.example", None) for i in range(count)]


def source(tmp_path, timeout=5.0):
    settings = DatabaseSettings("host=db.example dbname=mail", "SELECT domain, options FROM t",
                                "policyd_ipv6_optin", timeout, str(tmp_path), 0)
    reactor = Reactor()
    optin = PostgresOptin(settings, reactor, driver=None)
    optin._worker._thread = types.SimpleNamespace(start=lambda: None)  # driven by the test
    return optin, reactor


def serve_once(optin, connection):
    """One pass of the worker's load loop: it waits afterwards, so stop it from the wait."""
    worker = optin._worker

    def stop_waiting(_connection):
        worker._stopping.set()
        return "stopping"
    worker._wait = stop_waiting
    worker._serve(connection, "start-up")
    worker._stopping.clear()


def test_a_table_over_the_file_bound_is_refused_and_the_table_in_force_stays(
        tmp_path, monkeypatch):
    """A query whose table is over MAX_OPTIN_BYTES is refused like a failed try: the table in
    force and its last-good copy stay, and the log says the database gives no usable table."""
    optin, reactor = source(tmp_path)
    ready = optin.ready()
    serve_once(optin, Connection(rows(10)))
    assert len(ready.result) == 10 and optin.origin == "database"
    copy = os.path.join(tmp_path, LAST_GOOD)
    written = open(copy).read()

    bound = len(written.encode()) + 100  # room for 10 rows, not for 1,000
    monkeypatch.setattr(postgresql, "MAX_OPTIN_BYTES", bound)
    with pytest.raises(postgresql.TableTooLarge, match=f"over the {bound} bytes"):
        serve_once(optin, Connection(rows(1000)))
    assert len(optin.table) == 10 and open(copy).read() == written
    assert len(load_optin(copy)) == 10


def test_a_refused_table_at_start_up_serves_the_copy_and_says_why(tmp_path, monkeypatch):
    """At start-up, a refused table is a failed try: the last-good copy is served, and the
    warning names the size, not a database that does not answer."""
    with open(os.path.join(tmp_path, LAST_GOOD), "w") as handle:
        handle.write("kept.example\n")
    monkeypatch.setattr(postgresql, "MAX_OPTIN_BYTES", 1000)
    optin, reactor = source(tmp_path)
    ready = optin.ready()
    logged = []
    monkeypatch.setattr(postgresql._log, "warn", lambda fmt, **kw: logged.append(
        fmt.format(**kw)))
    worker = optin._worker
    connection = Connection(rows(1000))
    monkeypatch.setattr(worker, "_connect", lambda: _Context(connection))
    monkeypatch.setattr(worker, "_listen", lambda _connection: None)
    monkeypatch.setattr(worker, "_sleep", lambda _seconds: worker._stopping.set())
    worker._run()  # connect, load (refused), report the failure, back off (and stop)
    assert ready.called and len(ready.result) == 1
    assert ready.result.entry("kept.example") is not None
    assert optin.origin == "last-good copy"
    assert any("gives no usable table (optin_query gives a table of" in line
               for line in logged)
    assert not any("does not answer" in line for line in logged)


def test_start_up_timeout_ends_when_the_query_returns(tmp_path, monkeypatch):
    """The rows arrived within optin_connect_timeout_seconds: a parse that takes longer does
    not count against it (no copy served, no refusal to start); the table comes when ready."""
    optin, reactor = source(tmp_path, timeout=5.0)
    ready = optin.ready()
    table_from_rows = postgresql.table_from_rows

    def slow_parse(found, name):
        reactor.advance(30.0)  # the parse of a large table, as the clock sees it
        return table_from_rows(found, name)
    monkeypatch.setattr(postgresql, "table_from_rows", slow_parse)
    serve_once(optin, Connection(rows(3)))
    assert ready.called and len(ready.result) == 3 and optin.origin == "database"
