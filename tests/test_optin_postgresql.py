"""The opt-in table from a real PostgreSQL: the daemon as a process, a private cluster.

Each test starts its own cluster (``tests/lab/postgres.py``: initdb in a temporary directory,
postgres on a loopback port, as ``nobody`` under root) with the schema and trigger of
``postfix-examples/optin-postgresql.sql``, and daemons that log in as the role ``policyd``
whose password is only in a libpq passfile (PGPASSFILE). A recipient domain that is opted in
gets past rule 2 (here to 451 4.4.3: the nameserver is a closed loopback port), one that is
not gets 550 5.2.1, so each answer shows which table the daemon has in force.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.lab.daemonproc import ROOT, ServeProcess, request
from tests.lab.knot import free_port
from tests.lab.postgres import PASSWORD, PostgresCluster, available

pytestmark = [pytest.mark.postgresql,
              pytest.mark.skipif(not available(), reason="PostgreSQL or psycopg not installed")]

NOT_OPTED_IN = "550 5.2.1"
LAST_GOOD = "optin-domains.last-good"


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    db = PostgresCluster().start()
    try:
        db.create_schema()
        monkeypatch.setenv("PGPASSFILE", str(db.passfile(tmp_path / "pgpass")))
        yield db
    finally:
        db.remove()


def _daemon(directory, db: PostgresCluster, **extra) -> ServeProcess:
    directory.mkdir(exist_ok=True)
    state = directory / "state"
    state.mkdir(exist_ok=True)
    settings = {"optin_file": None, "optin_postgresql": db.conninfo(),
                "state_directory": str(state), "nameservers": [f"127.0.0.1:{free_port()}"],
                "dns_timeout_seconds": 0.1, "dns_attempts": 1,
                "decision_deadline_seconds": 1.0, "optin_connect_timeout_seconds": 2.0,
                **extra}
    return ServeProcess(directory, settings)


def _opted_in(daemon: ServeProcess, domain: str) -> bool:
    reply = daemon.ask(request(recipient=f"bob@{domain}"))
    assert reply is not None
    return not reply.startswith(NOT_OPTED_IN)


def _within(seconds: float, condition) -> float:
    """Seconds until ``condition()`` held; fails after ``seconds``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - start


def _clean(daemon: ServeProcess) -> None:
    log = daemon.log()
    assert PASSWORD not in log
    assert daemon.problems() == []


def test_initial_load_skips_bad_rows_and_keeps_a_last_good_copy(cluster, tmp_path):
    """The daemon listens with the database's table, skips each bad row with a warning naming
    it, and writes the good rows to state_directory in the opt-in file's syntax."""
    cluster.execute("INSERT INTO policyd_ipv6_optin (domain, options) VALUES "
                    "('example.com', NULL), ('.example.org', 'mode=report'), "
                    "('not a domain', NULL), ('bad-option.example', 'colour=red')")
    with _daemon(tmp_path / "a", cluster) as daemon:
        assert _opted_in(daemon, "example.com")
        assert _opted_in(daemon, "mx.example.org")
        assert not _opted_in(daemon, "example.org")
        assert not _opted_in(daemon, "bad-option.example")
        log = daemon.log()
        assert 'domain "not a domain", options NULL' in log
        assert 'domain "bad-option.example", options "colour=red"' in log
        assert "2 rows skipped" in log and "ready" in log
        copy = (tmp_path / "a" / "state" / LAST_GOOD).read_text()
        assert [line for line in copy.splitlines() if not line.startswith("#")] == [
            "example.com", ".example.org mode=report"]
        _clean(daemon)


def test_an_insert_is_enforced_by_two_daemons_within_a_second(cluster, tmp_path):
    """A row INSERTed while two daemons (two MX hosts) share the database is in force in both
    within 1 s, through the trigger's NOTIFY (the periodic reload is an hour away)."""
    cluster.execute("INSERT INTO policyd_ipv6_optin (domain) VALUES ('example.com')")
    hour = {"optin_reload_interval_seconds": 3600}
    with _daemon(tmp_path / "a", cluster, **hour) as one, \
            _daemon(tmp_path / "b", cluster, **hour) as two:
        assert not _opted_in(one, "new.example") and not _opted_in(two, "new.example")
        cluster.execute("INSERT INTO policyd_ipv6_optin (domain) VALUES ('new.example')")
        start = time.monotonic()
        _within(1.0, lambda: _opted_in(one, "new.example"))
        _within(1.0 - (time.monotonic() - start), lambda: _opted_in(two, "new.example"))
        cluster.execute("DELETE FROM policyd_ipv6_optin WHERE domain = 'example.com'")
        _within(1.0, lambda: not _opted_in(one, "example.com")
                and not _opted_in(two, "example.com"))
        _clean(one)
        _clean(two)


def test_database_down_then_restart_on_the_copy_then_resync(cluster, tmp_path):
    """With the database stopped the last good table stays in force; a daemon restarted while
    it is down serves the last-good copy; once the database is back the daemon resyncs."""
    cluster.execute("INSERT INTO policyd_ipv6_optin (domain) VALUES ('example.com')")
    daemon = _daemon(tmp_path / "a", cluster).start()
    try:
        assert _opted_in(daemon, "example.com")
        cluster.stop()
        daemon.wait_for("does not answer", 5)
        for _ in range(3):
            assert _opted_in(daemon, "example.com")
            assert not _opted_in(daemon, "example.net")
        daemon.stop()
        before = len(daemon.log())
        daemon.start()  # the database is still down (start() saw the first run's "ready")
        daemon.wait_for("serving the last-good copy", 10, after=before)
        daemon.wait_for("ready", 10, after=before)
        assert _opted_in(daemon, "example.com")
        assert not _opted_in(daemon, "new.example")
        cluster.start()
        cluster.execute("INSERT INTO policyd_ipv6_optin (domain) VALUES ('new.example')")
        _within(35, lambda: _opted_in(daemon, "new.example"))  # backoff: at most 30 s
        assert "answers again" in daemon.log()
        _clean(daemon)
    finally:
        daemon.stop()


def test_no_database_and_no_copy_refuses_to_start(cluster, tmp_path):
    """Without an answer from the database and without a last-good copy the daemon exits 1
    with a configuration error naming optin_postgresql, and never listens."""
    cluster.stop()
    daemon = _daemon(tmp_path / "a", cluster, optin_connect_timeout_seconds=1.0)
    result = subprocess.run(daemon.argv(), cwd=ROOT, capture_output=True, text=True,
                            timeout=30, env=_env())
    assert result.returncode == 1
    assert "configuration error: optin_postgresql = host=127.0.0.1" in result.stderr
    assert "no usable last-good copy" in result.stderr
    assert "listening" not in result.stdout


def test_check_shows_the_source_without_the_password(cluster, tmp_path):
    """policyd-ipv6 check with the password in the connection string decides from the
    database and prints the source with the password as ***, never the password itself."""
    cluster.execute("INSERT INTO policyd_ipv6_optin (domain) VALUES ('example.com')")
    daemon = _daemon(tmp_path / "a", cluster,
                     optin_postgresql=cluster.conninfo() + f" password={PASSWORD}")
    result = subprocess.run(
        [sys.executable, "-m", "policyd_ipv6", "check", "--config", str(daemon.config_path),
         "--client-address", "192.0.2.1", "--sender", "a@example.net",
         "--recipient", "b@example.com"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env=_env(PGPASSFILE="/nonexistent"))
    assert result.returncode == 0, result.stderr
    assert "password=***" in result.stdout and "(database, 1 entries)" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    assert not (tmp_path / "a" / "state" / LAST_GOOD).exists()  # check writes no state


def _env(**extra) -> dict:
    import os

    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)
