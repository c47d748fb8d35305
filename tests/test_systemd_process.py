"""The daemon as a process, started the way systemd starts it: a real AF_UNIX datagram socket
as NOTIFY_SOCKET, and listening sockets inherited as fds 3, 4 with LISTEN_FDS, LISTEN_PID and
LISTEN_FDNAMES (a subprocess started with pass_fds)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from lab.daemonproc import ROOT, ServeProcess, ask, request
from lab.knot import free_port
from lab.netns import Namespace, netns_unavailable

pytestmark = pytest.mark.process

# Puts the inherited sockets on fds 3, 4, ... and LISTEN_PID on the daemon's own pid (it keeps
# the wrapper's across exec), as systemd does between fork and exec.
WRAPPER = (
    "import os, sys\n"
    "n = int(sys.argv[1])\n"
    "for i in range(n):\n"
    "    os.dup2(int(sys.argv[2 + i]), 3 + i)\n"
    "    os.set_inheritable(int(sys.argv[2 + i]), False)\n"
    "if n:\n"
    "    os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[2 + n:])\n")


class Activated(ServeProcess):
    """ServeProcess started with systemd's environment: ``sockets`` as (socket, name)."""

    def __init__(self, directory, settings=None, optin="example.com\n", sockets=(), env=None,
                 wait_ready=True):
        super().__init__(directory, settings, optin)
        self.sockets = list(sockets)
        self.extra_env = dict(env or {})
        self.wait_ready = wait_ready

    def start(self) -> Activated:
        fds = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 20) for sock, _ in self.sockets]
        env = dict(os.environ, PYTHONPATH=str(ROOT), **self.extra_env)
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
            if key not in self.extra_env:
                env.pop(key, None)
        if self.sockets:
            env["LISTEN_FDS"] = str(len(self.sockets))
            env["LISTEN_FDNAMES"] = ":".join(name for _, name in self.sockets)
        argv = [sys.executable, "-c", WRAPPER, str(len(fds)), *map(str, fds),
                *self.argv()[1:]]
        try:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(argv, cwd=ROOT, env=env, pass_fds=fds,
                                                stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT)
        finally:
            for fd in fds:
                os.close(fd)
        if self.wait_ready:
            try:
                self.wait_for("ready", 15)
            except BaseException:
                self.stop()
                raise
        return self


def _listening_tcp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def _notify_socket(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(0.2)
    return sock


def _messages(sock: socket.socket, until, seconds: float = 15.0) -> list[dict[str, str]]:
    """Datagrams received (parsed) until ``until(messages)`` holds, bounded in time."""
    got: list[dict[str, str]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not until(got):
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        got.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
    assert until(got), f"not seen within {seconds}s: {got}"
    return got


def _has(key):
    return lambda got: any(key in m for m in got)


def _ask_port(port: int, data: bytes, timeout: float = 10.0) -> str | None:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        return ask(sock, data, timeout)


def test_ready_once_listening_then_watchdog_reloading_and_stopping(tmp_path):
    """READY=1 comes when the listener answers; WATCHDOG=1 repeats; SIGHUP gives RELOADING=1
    with MONOTONIC_USEC then READY=1; SIGTERM gives STOPPING=1."""
    name = f"p6d-notify-{os.getpid()}"
    with _notify_socket(name) as notify:
        daemon = Activated(tmp_path, optin="example.com\n", wait_ready=False,
                           env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000"})
        daemon.start()
        try:
            got = _messages(notify, _has("READY"))
            ready = next(m for m in got if "READY" in m)
            assert ready["READY"] == "1" and "STATUS" in ready
            assert not any("EXTEND_TIMEOUT_USEC" in m for m in got)  # an opt-in file: no wait
            # Ready means listening: the first request is answered.
            assert daemon.ask(request(client_address="192.0.2.1")) == "DUNNO"
            pings = _messages(notify, lambda g: sum("WATCHDOG" in m for m in g) >= 3, 5)
            assert all(m == {"WATCHDOG": "1"} for m in pings if "WATCHDOG" in m)
            daemon.process.send_signal(signal.SIGHUP)
            got = _messages(notify, lambda g: any("RELOADING" in m for m in g)
                            and "READY" in g[-1])
            reloading = next(m for m in got if "RELOADING" in m)
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert 0 < now - int(reloading["MONOTONIC_USEC"]) < 15_000_000
            daemon.process.send_signal(signal.SIGTERM)
            _messages(notify, _has("STOPPING"))
            assert daemon.process.wait(15) == 0
        finally:
            daemon.stop()


def test_a_silent_database_extends_the_start_timeout_before_ready(tmp_path):
    """With optin_postgresql and a database that accepts TCP and never answers, the daemon
    sends EXTEND_TIMEOUT_USEC longer than optin_connect_timeout_seconds before it waits, so
    systemd's start timeout cannot end the start; READY=1 follows on the last-good copy."""
    pytest.importorskip("psycopg")
    state = tmp_path / "state"
    state.mkdir()
    (state / "optin-domains.last-good").write_text("example.com\n")
    name = f"p6d-notify-extend-{os.getpid()}"
    with _listening_tcp() as silent, _notify_socket(name) as notify:  # never accepts
        settings = {"optin_file": None, "state_directory": str(state),
                    "optin_postgresql": f"host=127.0.0.1 port={silent.getsockname()[1]} "
                                        "dbname=mail user=policyd",
                    "optin_connect_timeout_seconds": 2.0}
        daemon = Activated(tmp_path, settings, wait_ready=False,
                           env={"NOTIFY_SOCKET": "@" + name})
        daemon.start()
        try:
            got = _messages(notify, _has("READY"), 30)
            kinds = [next(iter(m)) for m in got if "EXTEND_TIMEOUT_USEC" in m or "READY" in m]
            assert kinds == ["EXTEND_TIMEOUT_USEC", "READY"], got
            extend = next(m for m in got if "EXTEND_TIMEOUT_USEC" in m)
            assert int(extend["EXTEND_TIMEOUT_USEC"]) > 2_000_000
            assert "PostgreSQL" in extend["STATUS"]
            assert "serving the last-good copy" in daemon.log(), daemon.log()
            assert daemon.ask(request(client_address="192.0.2.1")) == "DUNNO"
        finally:
            daemon.stop()


def test_inherited_sockets_are_served_beside_the_configured_ones(tmp_path):
    """With LISTEN_FDS, the fds named policy (TCP) and milter (Unix) are served, and so are
    the configured endpoints at other addresses (an upgraded host whose Postfix still points
    at the old ones); a configured endpoint at a passed socket's address is not bound again."""
    policy = _listening_tcp()
    milter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "milter")
    milter.bind(path)
    os.chmod(path, 0o640)
    milter.listen(16)
    other = free_port()
    settings = {"listen": [f"tcp:{other}:interface=127.0.0.1"],
                "milter_listen": [f"unix:{tmp_path}/configured-milter", f"unix:{path}"]}
    with policy, milter, Activated(tmp_path, settings, sockets=[(policy, "policy"),
                                                                  (milter, "milter")]) as daemon:
        assert _ask_port(policy.getsockname()[1], request(client_address="192.0.2.1")) == \
            "DUNNO"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)  # served: the milter answers the negotiation
            client.sendall(b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff")
            client.settimeout(10)
            assert client.recv(4)  # a reply of its own
        assert _ask_port(other, request(client_address="192.0.2.1")) == "DUNNO"
        assert os.path.exists(f"{tmp_path}/configured-milter")
        assert "socket activation" in daemon.log()
        assert f'milter_listen = "unix:{path}"' not in daemon.log()  # not bound a second time
        daemon.stop()
        # The socket file is the socket unit's: not chmod-ed, not unlinked by the stop.
        assert os.stat(path).st_mode & 0o777 == 0o640


def _listening_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    return sock


def _ask_unix(path: str, data: bytes, timeout: float = 10.0) -> str | None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        return ask(sock, data, timeout)


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_restart_loses_nothing_with_socket_activation(tmp_path, family):
    """While one process stops and the next starts on the same inherited socket (TCP or
    Unix), requests sent continuously are all answered: none refused, none closed without
    a reply."""
    if family == "tcp":
        policy = _listening_tcp()
        port = policy.getsockname()[1]

        def send(data: bytes, timeout: float) -> str | None:
            return _ask_port(port, data, timeout)
    else:
        path = str(tmp_path / "policy")
        policy = _listening_unix(path)

        def send(data: bytes, timeout: float) -> str | None:
            return _ask_unix(path, data, timeout)
    replies: list[str | None] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        for _ in range(2000):  # bounded
            if stop.is_set():
                return
            try:
                replies.append(send(request(client_address="192.0.2.1"), 20))
            except OSError as error:
                errors.append(repr(error))

    with policy:
        (tmp_path / "a").mkdir()
        first = Activated(tmp_path / "a", sockets=[(policy, "policy")]).start()
        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            first.stop()  # SIGTERM: a graceful stop
            (tmp_path / "b").mkdir()
            with Activated(tmp_path / "b", sockets=[(policy, "policy")]):
                time.sleep(0.5)
                stop.set()
                for thread in threads:
                    thread.join(30)
        finally:
            stop.set()
            first.stop()
    assert not errors, errors[:5]
    assert len(replies) > 20 and all(r == "DUNNO" for r in replies), set(replies)


def test_a_request_in_flight_at_sigterm_is_answered(tmp_path):
    """SIGTERM while a decision waits on DNS: the client still gets its reply (451 at the
    deadline), then the daemon exits."""
    dead_dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    dead_dns.bind(("127.0.0.1", 0))
    settings = {"nameservers": [f"127.0.0.1:{dead_dns.getsockname()[1]}"],
                "decision_deadline_seconds": 1.5}
    with dead_dns, Activated(tmp_path, settings, optin="example.com\n") as daemon:
        with daemon.connect() as sock:
            sock.sendall(request(recipient="b@example.com"))
            time.sleep(0.3)
            daemon.process.send_signal(signal.SIGTERM)
            reply = ask(sock, b"", 10)
        assert reply is not None and reply.startswith("451 4.4.3"), reply
        assert daemon.process.wait(10) == 0


@pytest.mark.parametrize("name, message", [
    ("policyd-ipv6.socket", 'file descriptor 3 named "policyd-ipv6.socket": the daemon serves '
                            "FileDescriptorName=policy or FileDescriptorName=milter only")])
def test_a_socket_nobody_would_serve_stops_the_daemon(tmp_path, name, message):
    """An inherited fd with an unknown name is a start-up error naming the fd (a socket
    nobody serves would hold Postfix's connections)."""
    policy = _listening_tcp()
    with policy:
        daemon = Activated(tmp_path, sockets=[(policy, name)], wait_ready=False).start()
        assert daemon.process.wait(15) == 1
        assert message in daemon.log(), daemon.log()


def test_a_milter_socket_turns_the_milter_on_without_milter_listen(tmp_path):
    """A configuration without milter_listen (one kept from before the socket units) and a
    socket named milter: the daemon starts and serves the milter on it."""
    policy = _listening_tcp()
    milter = _listening_unix(str(tmp_path / "milter"))
    with policy, milter, Activated(tmp_path, {"milter_listen": []},
                                   sockets=[(policy, "policy"), (milter, "milter")]):
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "milter"))
            client.sendall(b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff")
            client.settimeout(10)
            assert client.recv(4)  # the milter's negotiation reply


CLONE_NEWNET = 0x40000000  # sched.h


def _in_namespace(name: str, body):
    """``body()``'s result, run in a thread that entered the network namespace ``name``: the
    sockets it makes and the processes it starts live there, not on the host's interfaces."""
    outcome: list = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            outcome.append((True, body()))
        except BaseException as error:  # handed to the test's thread
            outcome.append((False, error))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert outcome, "the test in the namespace did not end within 120 s"
    [(ok, value)] = outcome
    if not ok:
        raise value
    return value


@pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))
def test_a_passed_dual_stack_socket_serves_the_configured_tcp_port(tmp_path):
    """ListenStream=PORT (a dual-stack [::] socket) passed with listen = ["tcp:PORT"] in the
    file: the daemon serves the passed socket instead of binding 0.0.0.0:PORT beside it (which
    fails, EADDRINUSE), and answers over IPv4 and IPv6. In a network namespace of the test's
    own, as the socket listens on every address."""
    port = 10045

    def body():
        policy = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        policy.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        policy.bind(("::", port))
        policy.listen(128)
        with policy, Activated(tmp_path, {"listen": [f"tcp:{port}"]},
                               sockets=[(policy, "policy")]):
            v4 = _ask_port(port, request(client_address="192.0.2.1"))
            with socket.create_connection(("::1", port), timeout=10) as sock:
                v6 = ask(sock, request(client_address="192.0.2.1"), 10)
        return v4, v6

    namespace = Namespace(f"p6d-sockact-{os.getpid()}").create()
    try:
        assert _in_namespace(namespace.name, body) == ("DUNNO", "DUNNO")
    finally:
        namespace.delete()


def test_a_passed_ipv6_loopback_socket_serves_the_escaped_tcp6_endpoint(tmp_path):
    """A socket at [::1]:PORT passed with listen = ["tcp6:PORT:interface=\\:\\:1"] (colons
    escaped, as Twisted reads them): the daemon starts, serving the passed socket."""
    policy = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    policy.bind(("::1", 0))
    policy.listen(128)
    port = policy.getsockname()[1]
    with policy, Activated(tmp_path, {"listen": [f"tcp6:{port}:interface=\\:\\:1"]},
                           sockets=[(policy, "policy")]):
        with socket.create_connection(("::1", port), timeout=10) as sock:
            assert ask(sock, request(client_address="192.0.2.1"), 10) == "DUNNO"


def test_a_passed_unix_socket_checks_its_peers_with_tcp_in_the_file(tmp_path):
    """listen names TCP alone and systemd passes a Unix policy socket: a peer not in
    milter_peer_users (here root, the test) is closed without a reply there, while the TCP
    port, which carries no credentials, answers."""
    path = str(tmp_path / "policy")
    policy = _listening_unix(path)
    with policy, Activated(tmp_path, {"milter_peer_users": ["nobody"]},
                           sockets=[(policy, "policy")]) as daemon:
        assert os.geteuid() != pwd.getpwnam("nobody").pw_uid
        assert _ask_unix(path, request(client_address="192.0.2.1")) is None
        assert daemon.ask(request(client_address="192.0.2.1")) == "DUNNO"
        daemon.wait_for("not one of milter_peer_users")
