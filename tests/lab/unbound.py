"""Start a real unbound recursive resolver on loopback for tests; stop it by PID.

Contract:
    holes = BlackHoles(2)                                  # loopback servers that never answer
    with UnboundServer(stubs={"sender.test": [("127.0.0.1", knot_port)],
                              "slow.test": [holes.address(0)]},
                       deny=["dropped.test"]) as unbound:
        ...  # unbound.port answers on 127.0.0.1 (UDP and TCP)

- ``stubs`` maps a zone to the authoritative servers unbound asks for it (a Knot, a BadDns,
  a black hole). Every stub zone is also made a ``transparent`` local zone: unbound's built-in
  RFC 6761/6303 zones (``test.``, ``invalid.``, the reverse zone of 2001:db8::/32) would
  otherwise answer for the lab's names themselves.
- ``deny`` zones are dropped by unbound itself: a query under them is never answered, the most
  repeatable "zone that never answers" there is.
- Black-holed stub servers: a server that never answers is soon marked down in unbound's
  infrastructure cache, after which unbound answers SERVFAIL at once. A test that
  needs queries to stay unanswered gives each name its own dead address (``BlackHoles``, one
  never-read UDP socket per address); one shared dead address gives the SERVFAIL behaviour.
- unbound runs in the foreground (``-d``) from its own config in a private temporary directory
  (``chroot: ""``, ``username: ""``, no pidfile, no remote control, ``do-not-query-localhost:
  no`` so it may ask loopback servers); ``start()`` returns once it answers a local probe name,
  ``stop()`` sends SIGTERM to that PID (SIGKILL after a few seconds) and removes the directory.

Needs the Debian package ``unbound``; ``require_unbound()`` skips a test loudly without it, but
fails under CI=true.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

from .knot import free_port
from .process import ServerProcess

__all__ = ["UnboundServer", "UnboundError", "BlackHoles", "require_unbound", "unbound_available"]

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
CHECKCONF = shutil.which("unbound-checkconf") or "/usr/sbin/unbound-checkconf"
START_TIMEOUT_SECONDS = 10.0
PROBE_NAME = "ready.probe.lab."


class UnboundError(RuntimeError):
    """unbound could not be configured or started; the message carries its log."""


def unbound_available() -> str | None:
    """None when unbound is installed, else a sentence saying what is missing."""
    missing = [p for p in (UNBOUND, CHECKCONF) if not os.access(p, os.X_OK)]
    if missing:
        return "unbound is not installed (missing %s); install the Debian package unbound" % (
            ", ".join(missing))
    return None


def require_unbound() -> None:
    """In a test: skip loudly when unbound is missing, but fail under CI=true."""
    import pytest

    problem = unbound_available()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but %s" % problem, pytrace=False)
    pytest.skip("NOT TESTED against a real resolver: %s" % problem)


class BlackHoles:
    """``count`` UDP sockets on 127.0.0.1 that are bound and never read: DNS servers that never
    answer (no ICMP error either, so the asker can only time out). Close with ``close()``."""

    def __init__(self, count: int) -> None:
        self.sockets = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            self.sockets.append(sock)

    def address(self, index: int) -> tuple[str, int]:
        return self.sockets[index].getsockname()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def __enter__(self) -> BlackHoles:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _zone(name: str) -> str:
    return name.rstrip(".").lower() + "."


class UnboundServer(ServerProcess):
    """One unbound process; see the module docstring."""

    def __init__(self, stubs: dict[str, list[tuple[str, int]]], deny: list[str] = (),
                 port: int | None = None, extra: str = "") -> None:
        self.stubs = {_zone(z): list(servers) for z, servers in stubs.items()}
        self.deny = [_zone(z) for z in deny]
        self.port = port or free_port()
        self.extra = extra
        self.directory: Path | None = None
        self.process: subprocess.Popen | None = None

    def config_text(self) -> str:
        d = str(self.directory)
        lines = [
            "server:",
            '    username: ""',
            '    chroot: ""',
            '    directory: "%s"' % d,
            '    pidfile: ""',
            "    use-syslog: no",
            '    logfile: ""',
            "    verbosity: 1",
            "    num-threads: 1",
            "    interface: 127.0.0.1@%d" % self.port,
            "    port: %d" % self.port,
            "    access-control: 127.0.0.0/8 allow",
            "    do-not-query-localhost: no",
            # The lab's zones are unsigned: no validator, no trust anchor.
            '    module-config: "iterator"',
            "    num-queries-per-thread: 1024",
            "    outgoing-range: 2048",
            '    local-zone: "%s" static' % PROBE_NAME.split(".", 1)[1],
            "    local-data: \"%s 60 IN A 127.0.0.1\"" % PROBE_NAME,
        ]
        lines += ['    local-zone: "%s" transparent' % z for z in self.stubs]
        lines += ['    local-zone: "%s" deny' % z for z in self.deny]
        if self.extra:
            lines += ["    " + line.strip() for line in self.extra.strip().splitlines()]
        lines += ["remote-control:", "    control-enable: no"]
        for zone, servers in self.stubs.items():
            lines += ["stub-zone:", '    name: "%s"' % zone]
            lines += ["    stub-addr: %s@%d" % (host, port) for host, port in servers]
        return "\n".join(lines) + "\n"

    @property
    def log_path(self) -> Path:
        return self.directory / "unbound.log"

    def start(self) -> UnboundServer:
        problem = unbound_available()
        if problem:
            raise UnboundError(problem)
        self.directory = Path(tempfile.mkdtemp(prefix="unbound-"))
        config = self.directory / "unbound.conf"
        config.write_text(self.config_text())
        check = subprocess.run([CHECKCONF, str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            text = self.config_text()
            shutil.rmtree(self.directory, ignore_errors=True)
            raise UnboundError("unbound-checkconf failed:\n%s%s\n%s" % (
                check.stdout, check.stderr, text))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([UNBOUND, "-d", "-c", str(config)],
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        try:
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        probe = dns.message.make_query(PROBE_NAME, "A")
        while True:
            if self.process.poll() is not None:
                raise UnboundError("unbound exited with status %s:\n%s"
                                   % (self.process.returncode, self.log_tail()))
            try:
                answer = dns.query.udp(probe, "127.0.0.1", port=self.port, timeout=0.2)
                if answer.rcode() == dns.rcode.NOERROR and answer.answer:
                    return
            except Exception:  # not listening yet: timeout or refused
                pass
            if time.monotonic() > deadline:
                raise UnboundError("unbound does not answer after %.0f s:\n%s"
                                   % (START_TIMEOUT_SECONDS, self.log_tail()))
            time.sleep(0.05)
