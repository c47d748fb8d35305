"""A private PostgreSQL cluster for tests: initdb in a temporary directory, the server on a
loopback port and a Unix socket, run as an unprivileged user.

Contract: ``PostgresCluster()`` makes a directory under /tmp (owned by ``nobody`` when the
tests run as root: initdb and postgres refuse root), runs ``initdb`` there once, and
``start()`` runs ``postgres`` itself as a child process (its PID is ours: ``stop()`` sends it
SIGINT, PostgreSQL's fast shutdown, then SIGKILL after a grace period; ``start()`` again after
``stop()`` restarts it on the same data and port). The superuser ``postgres`` connects over the
Unix socket without a password (``admin()`` gives an autocommit psycopg connection); the role
``policyd`` with password ``PASSWORD`` connects over TCP on 127.0.0.1 (scram-sha-256), the way a
daemon on another host would. ``conninfo()`` is the daemon's connection string (no password:
``passfile(path)`` writes a libpq passfile for it). ``remove()`` stops the server and deletes
the directory. ``available()`` says whether the binaries and the driver are installed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .knot import free_port

__all__ = ["PostgresCluster", "available", "PASSWORD", "SCHEMA"]

PASSWORD = "s3cret-Pa55-never-logged"
SCHEMA = Path(__file__).resolve().parents[2] / "postfix-examples" / "optin-postgresql.sql"


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return os.path.dirname(found[-1])
    path = shutil.which("postgres")
    return os.path.dirname(path) if path else None


def available() -> bool:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return _bindir() is not None


class PostgresCluster:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.directory = Path(tempfile.mkdtemp(prefix="policyd-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.log_path = self.directory / "postgres.log"
        self.process: subprocess.Popen | None = None
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.directory, nobody.pw_uid, nobody.pw_gid)
            self.prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                           "--clear-groups", "--"]
        os.chmod(self.directory, 0o755)
        subprocess.run([*self.prefix, f"{self.bindir}/initdb", "-D", str(self.data), "-U",
                        "postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
                        "--no-sync", "-E", "UTF8", "--locale=C"],
                       check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresCluster:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, f"{self.bindir}/postgres", "-D", str(self.data),
                 "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={self.directory}", "-c", "fsync=off"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 30
        while True:
            try:
                self.admin().close()
                return self
            except Exception:
                if self.process.poll() is not None or time.monotonic() > end:
                    log = self.log_path.read_text(errors="replace")[-2000:]
                    raise AssertionError(f"postgres did not start:\n{log}") from None
                time.sleep(0.1)

    def admin(self):
        import psycopg

        return psycopg.connect(host=str(self.directory), port=self.port, user="postgres",
                               dbname="postgres", autocommit=True, connect_timeout=5)

    def create_schema(self) -> None:
        """The role policyd and postfix-examples/optin-postgresql.sql (table and trigger)."""
        with self.admin() as db:
            db.execute(f"CREATE ROLE policyd LOGIN PASSWORD '{PASSWORD}'")
            db.execute(SCHEMA.read_text())
            db.execute("GRANT SELECT ON policyd_ipv6_optin TO policyd")

    def execute(self, statement: str, params=None) -> None:
        with self.admin() as db:
            db.execute(statement, params)

    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname=postgres user=policyd"

    def passfile(self, path: Path) -> Path:
        path.write_text(f"127.0.0.1:{self.port}:postgres:policyd:{PASSWORD}\n")
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)  # fast shutdown: clients are disconnected
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
