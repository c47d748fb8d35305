"""Start a real Knot DNS server (knotd) with given zones, for tests; stop it by PID.

Contract:
    with KnotServer({"example.test": zone_text}, [("127.0.0.1", port)]) as knot:
        ...  # knot answers authoritatively for every zone on every listen address

- `zones` maps a zone name to its zone-file text (see `zones.py` for builders). Every zone
  must be loaded before `start()` returns: the server is asked for each zone's SOA on the
  first listen address, and a zone it refuses (a syntax error in the zone text) makes
  `start()` raise `KnotError` with the tail of knotd's log.
- `listen` is a list of (address, port). Without `netns` this is normally loopback with a
  port from `free_port()`; it works as an ordinary user (knotd needs only a writable rundir
  and storage, both in a private temporary directory, and no `user` setting, so it keeps the
  caller's identity - also when the caller is root).
- With `netns="NAME"`, knotd is started through `ip netns exec NAME knotd ...` (which execs,
  so the PID we hold is knotd's) and the readiness query runs in that namespace too.
- `stop()` sends SIGTERM to that PID (SIGKILL after a few seconds) and removes the directory;
  it is idempotent and runs on leaving the `with` block, also after an exception.

Needs the Debian packages `knot` (knotd, knotc) and `knot-dnsutils` (kdig).
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .process import ServerProcess

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"
KNOTC = shutil.which("knotc") or "/usr/sbin/knotc"
KDIG = shutil.which("kdig") or "/usr/bin/kdig"

# knotd starts in about 0.2 s on a small machine; the bound is generous for a loaded CI host.
START_TIMEOUT_SECONDS = 10.0


class KnotError(RuntimeError):
    """knotd could not be configured, started or stopped; the message carries its log."""


def knot_unavailable() -> str | None:
    """None when knotd, knotc and kdig are installed, else a sentence saying what is missing."""
    missing = [p for p in (KNOTD, KNOTC, KDIG) if not os.access(p, os.X_OK)]
    if missing:
        return ("Knot DNS is not installed (missing %s); install the Debian packages "
                "knot and knot-dnsutils" % ", ".join(missing))
    return None


def free_port() -> int:
    """Return a port that is free for both UDP and TCP on 127.0.0.1 and ::1 right now.

    Drawn below the kernel's ephemeral range (``ip_local_port_range``): a port the kernel
    hands out for ``bind(0)`` can be taken, in the moment before knotd binds it, by any
    outgoing connection on the machine as its local port (seen once in CI: "cannot bind
    address ... TCP (address already in use)"); a port below that range never is. Tests run
    one at a time, so two of them do not race for the same port.
    """
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        try:
            for family, kind, host in ((socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
                                       (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
                                       (socket.AF_INET6, socket.SOCK_STREAM, "::1"),
                                       (socket.AF_INET6, socket.SOCK_DGRAM, "::1")):
                with socket.socket(family, kind) as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise KnotError("no free port found on loopback")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 if it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(2048, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


def _knot_address(address: str, port: int) -> str:
    """Knot's address@port notation (no brackets, also for IPv6)."""
    return "%s@%d" % (ipaddress.ip_address(address).compressed, port)


def _quote(value: str) -> str:
    """A knot.conf string (YAML-like); paths and names used here never contain quotes."""
    if '"' in value or "\n" in value:
        raise KnotError("unsupported character in %r" % value)
    return '"%s"' % value


class KnotServer(ServerProcess):
    """One knotd process serving `zones` on `listen`, in its own temporary directory."""

    def __init__(self, zones: dict[str, str], listen: list[tuple[str, int]],
                 netns: str | None = None, workdir: str | os.PathLike | None = None):
        if not zones:
            raise ValueError("at least one zone is needed")
        if not listen:
            raise ValueError("at least one listen address is needed")
        self.zones = {name.rstrip(".").lower() + ".": text for name, text in zones.items()}
        self.listen = [(ipaddress.ip_address(a).compressed, int(p)) for a, p in listen]
        self.netns = netns
        self._parent = workdir
        self.directory: Path | None = None
        self.process: subprocess.Popen | None = None

    # -- files ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.directory / "knot.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "knotd.log"

    def config_text(self) -> str:
        """The knot.conf this server runs with (rundir, storage and zone files in its directory)."""
        d = str(self.directory)
        listen = ", ".join(_knot_address(a, p) for a, p in self.listen)
        lines = [
            "server:",
            "    rundir: %s" % _quote(d),
            "    listen: [ %s ]" % listen,
            # One background worker is plenty for a handful of static zones.
            "    background-workers: 1",
            "log:",
            "  - target: stderr",
            "    any: info",
            "database:",
            "    storage: %s" % _quote(d),
            "control:",
            "    listen: %s" % _quote(os.path.join(d, "knot.sock")),
            "template:",
            "  - id: default",
            "    storage: %s" % _quote(d),
            '    file: "%s.zone"',
            # Zone files are the only source of truth: never write back, never journal.
            "    zonefile-sync: -1",
            "    zonefile-load: whole",
            "    journal-content: none",
            "zone:",
        ]
        lines += ["  - domain: %s" % _quote(name) for name in self.zones]
        return "\n".join(lines) + "\n"

    def _write_files(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="knot-", dir=self._parent))
        # knotd may run as another user than the one creating the directory (never here, but
        # a world-readable directory keeps `ip netns exec` and debugging simple).
        os.chmod(self.directory, 0o755)
        for name, text in self.zones.items():
            (self.directory / ("%s.zone" % name.rstrip("."))).write_text(text)
        self.config_path.write_text(self.config_text())

    # -- process -------------------------------------------------------------------------
    def _wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start(self) -> KnotServer:
        """Write the files, check the config, start knotd and wait until every zone answers."""
        problem = knot_unavailable()
        if problem:
            raise KnotError(problem)
        self._write_files()
        check = subprocess.run([KNOTC, "-c", str(self.config_path), "conf-check"],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise KnotError("knotc conf-check failed:\n%s%s\n%s" % (
                check.stdout, check.stderr, self.config_text()))
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                self._wrap([KNOTD, "-c", str(self.config_path)]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        try:
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def query(self, name: str, rtype: str = "A", timeout: float = 1.0,
              tcp: bool = False) -> subprocess.CompletedProcess:
        """Ask this server (first listen address) with kdig; returns the finished kdig process."""
        address, port = self.listen[0]
        argv = [KDIG, "@" + address, "-p", str(port), "-t", rtype, name,
                "+timeout=%d" % max(1, round(timeout)), "+retry=0", "+noall", "+answer",
                *(["+tcp"] if tcp else []),
                "+header"]
        return subprocess.run(self._wrap(argv), capture_output=True, text=True)

    def _zone_answers(self, zone: str) -> bool:
        # TCP: before knotd binds, a refused connection fails at once (UDP would wait).
        out = self.query(zone, "SOA", tcp=True).stdout
        # A loaded zone answers its SOA with the AA flag; an unloaded one is REFUSED.
        return "status: NOERROR" in out and " aa" in out and "\tSOA\t" in out

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        pending = list(self.zones)
        while pending:
            if self.process.poll() is not None:
                raise KnotError("knotd exited with status %s:\n%s"
                                % (self.process.returncode, self.log_tail()))
            pending = [z for z in pending if not self._zone_answers(z)]
            if not pending:
                return
            # A zone that failed to load never will: say so now rather than at the deadline.
            if " error: " in self.log_tail(200):
                raise KnotError("knotd reports an error:\n%s" % self.log_tail())
            if time.monotonic() > deadline:
                raise KnotError("knotd does not serve %s after %.0f s:\n%s"
                                % (", ".join(pending), START_TIMEOUT_SECONDS, self.log_tail()))
            time.sleep(0.05)


def require_knot() -> None:
    """In a test: skip loudly when Knot is missing, but fail under CI=true (CI must run it)."""
    import pytest  # only tests call this; the module itself stays usable without pytest

    problem = knot_unavailable()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but %s" % problem, pytrace=False)
    pytest.skip("NOT TESTED against real DNS: %s" % problem)
