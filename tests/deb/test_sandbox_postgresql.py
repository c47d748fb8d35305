"""The opt-in table from PostgreSQL under the packaged unit's W^X rule and system-call filter.

debian/policyd-ipv6.service sets MemoryDenyWriteExecute=yes and SystemCallFilter=@system-service
~@privileged @resources. Debian's python3-psycopg talks to libpq through ctypes (its "python"
binding), whose callbacks (psycopg's notice receiver) are libffi closures: code that could need
writable and executable memory. These tests prove that the daemon's own PostgreSQL opt-in
source works there, against a private cluster (tests/lab/postgres.py, the schema and trigger
of postfix-examples/optin-postgresql.sql, the role policyd whose password is only in a libpq
passfile), with Debian's /usr/bin/python3 and its libraries:

- the daemon (`python3 -m policyd_ipv6 serve`, this tree's code) started in the unit's sandbox
  as unitrun.sandbox_argv reproduces it - the unit's user, no privileges, a read-only file
  system but the state directory, private /tmp, and last the unit's seccomp filter, address
  families and PR_SET_MDWE (unitfilter.py) - loads the table over loopback TCP, writes its
  last-good copy, answers `check --via` from it, and follows an INSERT through LISTEN/NOTIFY;
- as a control, a program in the same sandbox runs the same opt-in code (PostgresOptin, the
  NOTIFY, a server notice through the ctypes callback) between two probes showing that W+X
  memory, an exec gain by mprotect, a @resources call and a netlink socket are refused in that
  very process: the tests cannot pass because the filter was not there.

Each runs twice, with MemoryDenyWriteExecute= as systemd 254 and later apply it (PR_SET_MDWE:
the kernel refuses with EACCES; Debian 13) and as earlier ones do (their own seccomp filter,
EPERM; Debian 12's systemd 252). Why it works: libffi first asks for an anonymous W+X page,
is refused, and falls back to one memfd mapped twice, writable and executable apart, which
neither form forbids (memfd_create is in @system-service).

The unit's user (_policyd-ipv6) exists once the package has been installed on this machine
(purging keeps it); before that `nobody` stands in: W^X and the filter do not depend on which
unprivileged user runs. The code runs from a copy under /var/spool, as the reproduced
ProtectHome= and PrivateTmp= would hide a checkout below /root, /home or /tmp. Root only; a
missing part is a loud skip, and a failure under CI=true (tests/run installs them all).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from lab.knot import free_port
from lab.policyd import PolicyDaemon
from lab.postgres import PASSWORD, PostgresCluster, available

from .debbuild import require
from .unitfilter import filter_unavailable
from .unitrun import Unit, credentials, sandbox_argv

pytestmark = pytest.mark.deb

ROOT = Path(__file__).resolve().parents[2]
UNIT_FILE = ROOT / "debian" / "policyd-ipv6.service"
PYTHON = "/usr/bin/python3"
CLIENT = "2001:db8::25"  # rule 2 (the opt-in table) applies to IPv6 clients
NOT_OPTED_IN = "550 5.2.1"
LAST_GOOD = "optin-domains.last-good"
# MemoryDenyWriteExecute= as systemd 254 and later apply it (PR_SET_MDWE, Debian 13) and as
# earlier ones do (a seccomp filter, Debian 12's 252): see unitfilter.filter_argv.
MDWE = ["prctl", "seccomp"]


def _requirements() -> str | None:
    if os.geteuid() != 0:
        return "the unit's sandbox needs root (running as uid %d)" % os.geteuid()
    if not available():
        return "PostgreSQL (Debian package postgresql) or psycopg is not installed"
    probe = subprocess.run([PYTHON, "-c", "import psycopg"], capture_output=True)
    if probe.returncode != 0:
        return "the Debian package python3-psycopg is not installed"
    return filter_unavailable()


def _unit() -> Unit:
    """The source tree's unit; its User= and Group= replaced by nobody when they do not exist."""
    unit = Unit.read(UNIT_FILE)
    try:
        pwd.getpwnam(unit.user)
        grp.getgrnam(unit.group)
    except KeyError:
        unit = Unit({**unit.settings, "User": ["nobody"], "Group": ["nogroup"]})
    return unit


@dataclass
class Lab:
    unit: Unit
    cluster: PostgresCluster
    root: Path
    config: Path
    state: Path
    port: int

    def argv(self, command: list[str], mdwe: str) -> list[str]:
        """`command` (run by Debian's python3, on the copied code) in the unit's sandbox."""
        return sandbox_argv(self.unit, ["/usr/bin/env", "PYTHONPATH=%s" % (self.root / "lib"),
                                        PYTHON, *command], [self.state], mdwe)


@pytest.fixture(scope="module")
def lab(request) -> Lab:
    """A cluster with example.com opted in, and a configuration the unit's user can read."""
    require(_requirements())
    unit = _unit()
    user = pwd.getpwnam(unit.user)
    cluster = PostgresCluster()
    request.addfinalizer(cluster.remove)
    cluster.start()
    cluster.create_schema()
    cluster.execute("INSERT INTO policyd_ipv6_optin (domain) VALUES ('example.com')")
    root = Path(tempfile.mkdtemp(prefix="p6d-pg-sandbox-", dir="/var/spool"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    os.chmod(root, 0o755)
    shutil.copytree(ROOT / "policyd_ipv6", root / "lib" / "policyd_ipv6",
                    ignore=shutil.ignore_patterns("__pycache__"))
    state = root / "state"
    state.mkdir(mode=0o755)
    os.chown(state, user.pw_uid, user.pw_gid)
    passfile = cluster.passfile(root / "pgpass")
    os.chown(passfile, user.pw_uid, user.pw_gid)
    port = free_port()
    settings = {
        "listen": ["tcp:%d:interface=127.0.0.1" % port],
        "optin_postgresql": "%s passfile=%s" % (cluster.conninfo(), passfile),
        "state_directory": str(state),
        "nameservers": ["127.0.0.1:%d" % free_port()],  # closed: an opted-in domain gets 4.4.3
        "dns_timeout_seconds": 0.1, "dns_attempts": 1, "decision_deadline_seconds": 1.0,
        "optin_connect_timeout_seconds": 5.0, "optin_reload_interval_seconds": 3600,
    }
    config = root / "policyd-ipv6.toml"
    config.write_text("".join("%s = %s\n" % (k, json.dumps(v)) for k, v in settings.items()))
    os.chmod(config, 0o644)
    return Lab(unit, cluster, root, config, state, port)


class SandboxedDaemon(PolicyDaemon):
    """`python3 -m policyd_ipv6 serve` in the lab's sandbox (PolicyDaemon's start and stop)."""

    def __init__(self, lab: Lab, mdwe: str) -> None:
        super().__init__(lab.config, lab.root / ("serve-%s.log" % mdwe))
        self.lab, self.mdwe = lab, mdwe

    def argv(self) -> list[str]:
        return self.lab.argv(["-m", "policyd_ipv6", "serve", "--config", str(self.config_path)],
                             self.mdwe)


def _reply(lab: Lab, domain: str) -> str:
    """The running daemon's reply for a recipient in `domain` (`check --via`, as Postfix asks)."""
    run = subprocess.run(
        [sys.executable, "-m", "policyd_ipv6", "check", "--via", "tcp:127.0.0.1:%d" % lab.port,
         "--client-address", CLIENT, "--sender", "alice@example.net",
         "--recipient", "bob@%s" % domain], cwd=ROOT, capture_output=True, text=True,
        timeout=30, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.stdout.startswith("action="), run.stdout + run.stderr
    return run.stdout.splitlines()[0].removeprefix("action=")


def _wait_for(daemon: SandboxedDaemon, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while text not in daemon.log():
        assert daemon.running, daemon.log_tail()
        assert time.monotonic() < deadline, "%r not logged within %s s:\n%s" % (
            text, seconds, daemon.log_tail())
        time.sleep(0.05)


@pytest.mark.parametrize("mdwe", MDWE)
def test_daemon_in_the_units_sandbox_loads_and_follows_the_database(lab, mdwe):
    """The daemon under the unit's user, seccomp filter and W^X rule loads the opt-in table from
    PostgreSQL, writes its last-good copy, decides from it, and applies an INSERT via NOTIFY."""
    (lab.state / LAST_GOOD).unlink(missing_ok=True)
    daemon = SandboxedDaemon(lab, mdwe)
    try:
        daemon.start()
        creds = credentials(daemon.process.pid)
        user = pwd.getpwnam(lab.unit.user)
        assert set(creds["Uid"].split()) == {str(user.pw_uid)}, creds
        assert creds["NoNewPrivs"] == "1" and creds["CapEff"] == "0" * 16, creds
        filters = {"prctl": "1", "seccomp": "2"}[mdwe]  # the latter: the W^X filter too
        assert (creds["Seccomp"], creds["Seccomp_filters"]) == ("2", filters), creds
        # Listening comes after the first load; its log line may still be in the buffer.
        _wait_for(daemon, "opt-in table loaded from PostgreSQL (start-up)", 10)
        assert "1 entries" in daemon.log(), daemon.log_tail()
        copy = (lab.state / LAST_GOOD).read_text()
        assert "example.com" in copy.splitlines(), copy
        assert not _reply(lab, "example.com").startswith(NOT_OPTED_IN)
        assert _reply(lab, "new.example").startswith(NOT_OPTED_IN)
        lab.cluster.execute("INSERT INTO policyd_ipv6_optin (domain) VALUES ('new.example')")
        _wait_for(daemon, "opt-in table loaded from PostgreSQL (NOTIFY)", 10)
        assert not _reply(lab, "new.example").startswith(NOT_OPTED_IN)
        assert "new.example" in (lab.state / LAST_GOOD).read_text().splitlines()
        log = daemon.log()
        assert daemon.running
        assert "does not answer" not in log and "Traceback" not in log, log
        assert PASSWORD not in log
    finally:
        daemon.stop()
        lab.cluster.execute("DELETE FROM policyd_ipv6_optin WHERE domain = 'new.example'")


# Run in the sandbox: probes, then the daemon's opt-in code, then the probes again; one JSON
# line per step. argv: the configuration file.
PROGRAM = r"""
import ctypes, errno, json, mmap, socket, sys, os
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
RW, RWX, PR_GET_MDWE = mmap.PROT_READ | mmap.PROT_WRITE, 7, 66

def emit(**fields):
    print(json.dumps(fields), flush=True)

def probes():
    out = {"PR_GET_MDWE": libc.prctl(PR_GET_MDWE, 0, 0, 0, 0)}
    def attempt(name, action):
        try:
            action()
            out[name] = "ok"
        except OSError as error:
            out[name] = errno.errorcode.get(error.errno, str(error.errno))
    def mprotect():
        area = mmap.mmap(-1, 4096, prot=RW)
        if libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(area)), 4096, RWX):
            raise OSError(ctypes.get_errno(), "mprotect")
    attempt("writable memory", lambda: mmap.mmap(-1, 4096, prot=RW).close())
    attempt("writable+executable memory", lambda: mmap.mmap(-1, 4096, prot=RWX).close())
    attempt("mprotect adding exec", mprotect)
    attempt("sched_setaffinity (@resources)", lambda: os.sched_setaffinity(0, {0}))
    attempt("netlink socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close())
    out["ctypes callback"] = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda n: n + 1)(41)
    return out

emit(step="before", probes=probes())
import psycopg
from twisted.internet import reactor
from policyd_ipv6.daemon.config import load_config
from policyd_ipv6.optin.postgresql import DatabaseSettings, PostgresOptin

config = load_config(sys.argv[1])
notices = []
with psycopg.connect(config.optin_postgresql, autocommit=True) as connection:
    connection.add_notice_handler(lambda notice: notices.append(notice.message_primary))
    connection.execute("DO $$ BEGIN RAISE NOTICE 'through the notice receiver'; END $$")
emit(step="notice", impl=psycopg.pq.__impl__, notices=notices)
optin = PostgresOptin(DatabaseSettings(
    config.optin_postgresql, config.optin_query, config.optin_notify_channel,
    config.optin_connect_timeout_seconds, config.state_directory,
    config.optin_reload_interval_seconds, write_copy=False), reactor, psycopg)

def watch():
    if optin.table.matches("new.example"):
        emit(step="notified", origin=optin.origin, entries=len(optin.table))
        reactor.stop()
    else:
        reactor.callLater(0.02, watch)

def ready(table):
    emit(step="loaded", origin=optin.origin, entries=len(table),
         example=table.matches("example.com"))
    watch()

def failed(failure):
    emit(step="failed", error=str(failure.value))
    reactor.stop()

def timeout():
    emit(step="timeout", origin=optin.origin, entries=len(optin.table))
    reactor.stop()

reactor.callWhenRunning(lambda: optin.ready().addCallbacks(ready, failed))
reactor.callLater(30, timeout)
reactor.run()
optin.stop()
emit(step="after", probes=probes())
"""

DENIED = {"writable memory": "ok", "sched_setaffinity (@resources)": "EPERM",
          "netlink socket": "EAFNOSUPPORT", "ctypes callback": 42}
# W^X as the kernel refuses it (PR_SET_MDWE) and as systemd's own seccomp filter does.
REFUSED_WX = {
    "prctl": {"PR_GET_MDWE": 1, "writable+executable memory": "EACCES",
              "mprotect adding exec": "EACCES"},
    "seccomp": {"PR_GET_MDWE": 0, "writable+executable memory": "EPERM",
                "mprotect adding exec": "EPERM"}}


@pytest.mark.parametrize("mdwe", MDWE)
def test_filter_is_in_force_where_the_optin_code_runs(lab, mdwe):
    """In one process under the unit's sandbox, W+X memory, an exec gain, a @resources call and
    a netlink socket are refused before and after the daemon's opt-in code connects, loads the
    table, follows a NOTIFY and receives a server notice through psycopg's ctypes callback."""
    stderr = lab.root / "program.stderr"
    with open(stderr, "w") as errors:
        process = subprocess.Popen(lab.argv(["-c", PROGRAM, str(lab.config)], mdwe),
                                   stdout=subprocess.PIPE, stderr=errors, text=True)
    killer = threading.Timer(90, process.kill)  # the program stops itself after 30 s
    killer.start()
    steps = {}
    try:
        for line in process.stdout:
            step = json.loads(line)
            steps[step.pop("step")] = step
            if "loaded" in steps and "inserted" not in steps:
                steps["inserted"] = {}
                lab.cluster.execute(
                    "INSERT INTO policyd_ipv6_optin (domain) VALUES ('new.example')")
        code = process.wait(timeout=30)
    finally:
        killer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
        lab.cluster.execute("DELETE FROM policyd_ipv6_optin WHERE domain = 'new.example'")
    assert code == 0, (steps, stderr.read_text()[-3000:])
    denied = {**DENIED, **REFUSED_WX[mdwe]}
    assert steps["before"] == {"probes": denied}, steps
    assert steps["notice"]["notices"] == ["through the notice receiver"], steps
    assert steps["loaded"] == {"origin": "database", "entries": 1, "example": True}, steps
    assert steps["notified"] == {"origin": "database", "entries": 2}, steps
    assert steps["after"] == {"probes": denied}, steps
