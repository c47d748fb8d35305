"""The command line as an administrator uses it: serve, check, --version, configuration errors.

The daemon runs as a real process (``python -m policyd_ipv6``) against a real Knot on loopback
and is spoken to over real sockets, as Postfix would.
"""

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import dnslab
import pytest
from lab.knot import free_port

from policyd_ipv6 import __version__

# Every test runs the program as a process; most also start Knot.
pytestmark = pytest.mark.process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "policyd_ipv6", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path, knot_port, listen, optin="sender.test\n.opted.test\n", extra=""):
    (tmp_path / "optin").write_text(optin)
    path = tmp_path / "p.toml"
    path.write_text(f'listen = {listen!r}\noptin_file = "optin"\n'.replace("'", '"')
                    + f'nameservers = ["127.0.0.1:{knot_port}"]\n'
                    + "optin_reload_interval_seconds = 0.2\n" + extra)
    return str(path)


def test_version():
    """--version prints the program version."""
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"policyd-ipv6 {__version__}"


@pytest.mark.parametrize("content, words", [
    ('rdns = "sometimes"\n', ['rdns = "sometimes"']),
    ('optin_file = "/nonexistent/optin"\n', ['optin_file = "/nonexistent/optin"', "cannot read"]),
    ('listen = ["tcp:notaport"]\noptin_file = "optin"\n', ['listen = "tcp:notaport"']),
    ('colour = "blue"\n', ["unknown key colour"]),
])
def test_bad_config_stops_serve_with_key_and_value(tmp_path, content, words):
    """serve exits 1 at start-up with a message naming the key and the bad value."""
    (tmp_path / "optin").write_text("sender.test\n")
    (tmp_path / "p.toml").write_text(content)
    result = cli("serve", "--config", str(tmp_path / "p.toml"), "--allow-root")
    assert result.returncode == 1
    assert result.stderr.startswith("policyd-ipv6: configuration error: ")
    for word in words:
        assert word in result.stderr


def test_bad_optin_line_stops_serve(tmp_path):
    """An invalid opt-in file at start-up is a configuration error naming file and line."""
    path = write_config(tmp_path, 53, ["tcp:0:interface=127.0.0.1"], optin="ok.test\nnot ok\n")
    result = cli("serve", "--config", path, "--allow-root")
    assert result.returncode == 1 and "line 2" in result.stderr


def test_port_in_use_stops_serve(tmp_path):
    """A listen endpoint that cannot be bound stops start-up naming the endpoint."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        path = write_config(tmp_path, 53, [f"tcp:{port}:interface=127.0.0.1"])
        result = cli("serve", "--config", path, "--allow-root")
        assert result.returncode == 1
        assert f'listen = "tcp:{port}:interface=127.0.0.1": cannot listen' in result.stderr
    finally:
        busy.close()


@pytest.mark.parametrize("address, sender, recipient, action, trace", [
    (dnslab.WITH_PTR, "a@pass.sender.test", "bob@sender.test", "action=DUNNO", "SPF: pass"),
    (dnslab.NO_PTR, "a@pass.sender.test", "bob@sender.test", "action=450 4.7.25 ", "missing"),
    (dnslab.WITH_PTR, "a@fail.sender.test", "bob@sender.test", "action=450 4.7.26 ",
     "SPF: fail"),
    (dnslab.WITH_PTR, "a@pass.sender.test", "bob@contoso.com", "action=550 5.2.1 ",
     "not in the opt-in table"),
    ("192.0.2.1", "a@fail.sender.test", "bob@contoso.com", "action=DUNNO", "rule: ipv4"),
])
def test_check_prints_the_reply_then_a_trace(tmp_path, knot, address, sender, recipient,
                                              action, trace):
    """check prints exactly the reply serve would send as line 1, then the steps behind it."""
    path = write_config(tmp_path, knot, ["tcp:0:interface=127.0.0.1"])
    result = cli("check", "--config", path, "--client-address", address, "--sender", sender,
                 "--recipient", recipient, "--helo", "helo.sender.test")
    assert result.returncode == {"D": 0, "4": 4, "5": 5}[action[7]], result.stderr
    first, *rest = result.stdout.splitlines()
    assert first.startswith(action)
    assert trace in result.stdout
    assert rest, "a trace follows the reply"


@pytest.mark.parametrize("extra, optin, sender, line1, line2", [
    ('mode = "report"\n', "sender.test\n", "a@pass.sender.test", "action=DUNNO",
     "would: 450 4.7.25 "),
    ("", "sender.test mode=report\n", "a@fail.sender.test", "action=DUNNO",
     "would: 450 4.7.26 "),
    ('report_only_rules = ["no-rdns"]\n', "sender.test\n", "a@fail.sender.test",
     "action=450 4.7.26 ", "would: 450 4.7.25 "),
    ('unlisted_domains = "report"\n', "other.test\n", "a@pass.sender.test", "action=DUNNO",
     "would: 550 5.2.1 "),
])
def test_check_prints_what_report_mode_would_have_answered(tmp_path, knot, extra, optin,
                                                           sender, line1, line2):
    """check prints the reply, then "would: <reply>" for a refusal only reported."""
    path = write_config(tmp_path, knot, ["tcp:0:interface=127.0.0.1"], optin, extra)
    result = cli("check", "--config", path, "--client-address", dnslab.NO_PTR
                 if "4.7.25" in line2 else dnslab.WITH_PTR, "--sender", sender,
                 "--recipient", "bob@sender.test", "--helo", "helo.sender.test")
    assert result.returncode == (4 if line1.startswith("action=4") else 0), result.stderr
    first, second, *rest = result.stdout.splitlines()
    assert first.startswith(line1) and second.startswith(line2), result.stdout
    plain = cli("check", "--config", write_config(tmp_path, knot, ["tcp:0"]), "--client-address",
                dnslab.NO_PTR, "--sender", sender, "--recipient", "bob@sender.test")
    assert "would:" not in plain.stdout


class Daemon:
    """policyd-ipv6 serve as a child process, with its log captured."""

    def __init__(self, config, *options):
        self.log = open(config + ".log", "w+")
        options = options or (("--allow-root",) if os.geteuid() == 0 else ())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "policyd_ipv6", "serve", "--config", config, *options],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_for("ready")

    def text(self):
        self.log.flush()
        with open(self.log.name) as handle:
            return handle.read()

    def wait_for(self, word, timeout=10):
        end = time.monotonic() + timeout
        while word not in self.text():
            assert self.process.poll() is None, self.text()
            assert time.monotonic() < end, f"{word!r} not logged:\n{self.text()}"
            time.sleep(0.05)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        self.log.close()


def ask(sock, **attrs):
    payload = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
               "helo_name": "helo.sender.test", "instance": "", **attrs}
    sock.sendall(b"".join(f"{k}={v}\n".encode() for k, v in payload.items()) + b"\n")
    data = b""
    while not data.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        assert chunk, "connection closed without a reply"
        data += chunk
    return data.decode().strip()


def test_serve_on_unix_socket_reloads_optin_and_stops_cleanly(tmp_path, knot):
    """serve answers over a unix socket with the configured mode, follows opt-in edits, and
    logs one line per decision; SIGHUP reloads; SIGTERM stops it with status 0."""
    sock_path = tmp_path / "policy.sock"
    config = write_config(tmp_path, knot, [f"unix:{sock_path}:mode=660"])
    daemon = Daemon(config)
    try:
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(sock_path))
        assert ask(conn, client_address=dnslab.WITH_PTR, sender="a@pass.sender.test",
                   recipient="b@sender.test") == "action=DUNNO"
        assert ask(conn, client_address=dnslab.WITH_PTR, sender="a@pass.sender.test",
                   recipient="b@new.test").startswith("action=550 5.2.1 ")
        (tmp_path / "optin").write_text("sender.test\nnew.test\n")
        daemon.wait_for("opt-in table loaded (file changed)")
        assert ask(conn, client_address=dnslab.WITH_PTR, sender="a@pass.sender.test",
                   recipient="b@new.test") == "action=DUNNO"
        (tmp_path / "optin").write_text("sender.test\n")
        os.utime(tmp_path / "optin", (1, 1))  # same size class: force a visible change
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("opt-in table loaded (SIGHUP)")
        log = daemon.text()
        assert 'decision client=2001:db8:1::10 helo="helo.sender.test" ' in log
        assert 'rule=pass reply="DUNNO"' in log and "rule=not-opted-in" in log
        conn.close()
    finally:
        daemon.stop()
    assert daemon.process.returncode == 0


def test_serve_closes_on_malformed_request_without_reply(tmp_path, knot):
    """A malformed request gets no reply: the connection is closed and a warning logged."""
    port = free_port()
    daemon = Daemon(write_config(tmp_path, knot, [f"tcp:{port}:interface=127.0.0.1"]))
    try:
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(b"request=smtpd_access_policy\nthis is not an attribute\n\n")
        conn.settimeout(5)
        assert conn.recv(100) == b""
        daemon.wait_for("malformed policy request")
        # and the daemon still serves others
        other = socket.create_connection(("127.0.0.1", port))
        assert ask(other, client_address="192.0.2.1", sender="a@x.test",
                   recipient="b@y.test") == "action=DUNNO"
        other.close()
    finally:
        daemon.stop()


@pytest.fixture
def world_readable_dir(tmp_path_factory):
    """A directory an unprivileged user can read (pytest's own temp dirs are private)."""
    path = tmp_path_factory.mktemp("shared")
    os.chmod(path, 0o755)
    for parent in path.parents:
        if str(parent) in ("/", "/tmp"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o711)
    return path


def test_root_without_user_refuses_to_start(tmp_path):
    """As root with no user configured, serve refuses to start, naming the user key."""
    if os.geteuid() != 0:
        pytest.skip("needs root: checks that the daemon refuses to run as root")
    path = write_config(tmp_path, 53, ["tcp:0:interface=127.0.0.1"])
    result = cli("serve", "--config", path)
    assert result.returncode == 1
    assert 'user = "": refusing to run as root' in result.stderr


def test_root_drops_to_configured_user_and_reloads_config_on_sighup(world_readable_dir, knot):
    """Started as root with user = "nobody", the daemon serves as nobody; SIGHUP re-reads the
    configuration: a bad one keeps the running one, a good one takes effect at once."""
    if os.geteuid() != 0:
        pytest.skip("needs root: checks dropping privileges")
    port = free_port()
    path = write_config(world_readable_dir, knot, [f"tcp:{port}:interface=127.0.0.1"],
                        extra='user = "nobody"\n')
    for name in os.listdir(world_readable_dir):
        os.chmod(world_readable_dir / name, 0o644)
    daemon = Daemon(path, "--log-level", "info")
    try:
        status = open(f"/proc/{daemon.process.pid}/status").read()
        nobody = str(__import__("pwd").getpwnam("nobody").pw_uid)
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [nobody] * 4
        conn = socket.create_connection(("127.0.0.1", port))
        assert ask(conn, client_address=dnslab.NOT_BACK, sender="a@pass.sender.test",
                   recipient="b@sender.test") == "action=DUNNO"     # ptr mode: PTR is enough

        original = open(path).read()
        with open(path, "w") as handle:
            handle.write(original + 'rdns = "never"\n')
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("configuration not reloaded (SIGHUP)")
        assert 'rdns = "never"' in daemon.text()

        with open(path, "w") as handle:
            handle.write(original + 'rdns = "fcrdns"\n')
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("configuration reloaded (SIGHUP)")
        assert ask(conn, client_address=dnslab.NOT_BACK, sender="a@pass.sender.test",
                   recipient="c@sender.test", instance="other").startswith("action=450 4.7.25 ")
        conn.close()
    finally:
        daemon.stop()


def listening_sockets(pid: int) -> list[str]:
    """Local addresses of the TCP/UDP sockets the process listens on or has bound unconnected."""
    result = subprocess.run(["ss", "-H", "-lntup"], capture_output=True, text=True, check=True)
    return sorted(line.split()[4] for line in result.stdout.splitlines()
                  if f"pid={pid}," in line)


def test_nothing_listens_beyond_listen(tmp_path, knot):
    """The daemon listens on exactly the configured endpoints, even while it resolves."""
    if not os.path.exists("/usr/bin/ss") and not os.path.exists("/bin/ss"):
        pytest.skip("ss (iproute2) is not installed")
    port = free_port()
    daemon = Daemon(write_config(tmp_path, knot, [f"tcp:{port}:interface=127.0.0.1"]))
    try:
        conn = socket.create_connection(("127.0.0.1", port))
        assert ask(conn, client_address=dnslab.WITH_PTR, sender="a@pass.sender.test",
                   recipient="b@sender.test") == "action=DUNNO"
        assert listening_sockets(daemon.process.pid) == [f"127.0.0.1:{port}"]
        conn.close()
    finally:
        daemon.stop()


def test_sample_config_serves_as_nobody_when_started_as_root():
    """The README's first command (serve --sample-config, as root) starts and drops to nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the quick start runs as root")
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 10045))
    except OSError:
        pytest.skip("127.0.0.1:10045 is in use")
    busy.close()
    log = open(os.path.join(ROOT, ".sample-serve.log"), "w+")
    process = subprocess.Popen([sys.executable, "-m", "policyd_ipv6", "serve", "--sample-config"],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 10
        while "ready" not in open(log.name).read():
            assert process.poll() is None, open(log.name).read()
            assert time.monotonic() < end
            time.sleep(0.05)
        assert "running as nobody" in open(log.name).read()
        conn = socket.create_connection(("127.0.0.1", 10045))
        assert ask(conn, client_address="192.0.2.1", sender="a@x.test",
                   recipient="b@example.com") == "action=DUNNO"
        conn.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        os.unlink(log.name)


def test_last_log_line_is_written_on_sigterm(tmp_path, knot):
    """SIGTERM ends serve with status 0 and its last line ("stopped") reaches the log."""
    daemon = Daemon(write_config(tmp_path, knot, [f"tcp:{free_port()}:interface=127.0.0.1"]))
    daemon.stop()
    assert daemon.process.returncode == 0
    with open(daemon.log.name) as handle:
        assert handle.read().rstrip().endswith("policyd-ipv6 stopped")
