"""Started as root, serve drops to its user safely: from a clone only root can read, and never
serving as root when the drop fails.

The daemon runs as a real process against a real Knot on loopback, as in test_cli.py.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import dns
import dnslab
import pytest
import spf
from lab.knot import free_port

pytestmark = [pytest.mark.process, pytest.mark.knot]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST = ("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={ip}\n"
           "helo_name=helo.sender.test\nsender=a@pass.sender.test\nrecipient=b@sender.test\n"
           "instance=root-clone\n\n")


@pytest.fixture
def readable_config(knot):
    """A configuration and opt-in file that the user nobody can read; (path, policy port)."""
    directory = tempfile.mkdtemp(prefix="policyd-conf-")
    os.chmod(directory, 0o755)
    port = free_port()
    with open(os.path.join(directory, "optin"), "w") as handle:
        handle.write("sender.test\n")
    config = os.path.join(directory, "p.toml")
    with open(config, "w") as handle:
        handle.write(f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
                     f'optin_file = "{directory}/optin"\n'
                     f'nameservers = ["127.0.0.1:{knot}"]\nuser = "nobody"\n')
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o644)
    yield config, port
    shutil.rmtree(directory)


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: starts the daemon as root to drop to nobody")


def ask(port: int) -> bytes:
    """Send one request needing SPF; return the reply (b"" if closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(REQUEST.format(ip=dnslab.WITH_PTR).encode())
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def serve(config: str, cwd: str, program: list[str] | None = None):
    """``python -m policyd_ipv6 serve --config CONFIG`` (or ``program`` in place of ``-m
    policyd_ipv6``) started in ``cwd``, its output in CONFIG.log; returns (process, log path)."""
    log_path = config + ".log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, *(program or ["-m", "policyd_ipv6"]),
                                    "serve", "--config", config], cwd=cwd, stdout=log,
                                   stderr=subprocess.STDOUT)
    return process, log_path


def wait_for(log_path: str, process, word: str, timeout: float = 15.0) -> str:
    end = time.monotonic() + timeout
    while True:
        with open(log_path) as handle:
            text = handle.read()
        if word in text:
            return text
        assert process.poll() is None, text
        assert time.monotonic() < end, f"{word!r} not logged:\n{text}"
        time.sleep(0.05)


def test_serve_from_a_root_only_clone_checks_spf_as_nobody(readable_config):
    """From a clone in a mode-700 root directory (its libraries beside it, as a virtual
    environment in the clone would have them), serve drops to nobody and SPF still passes:
    nothing the daemon needs is loaded only after the drop, and nothing fails unlogged."""
    needs_root()
    config, port = readable_config
    clone = tempfile.mkdtemp(prefix="policyd-clone-", dir="/root" if os.path.isdir("/root")
                             else None)
    try:
        os.chmod(clone, 0o700)
        shutil.copytree(os.path.join(ROOT, "policyd_ipv6"), os.path.join(clone, "policyd_ipv6"))
        # The libraries whose modules are loaded on first use, beside the package: run from
        # the clone, python -m finds these first (sys.path[0] is the working directory).
        shutil.copytree(os.path.dirname(dns.__file__), os.path.join(clone, "dns"))
        shutil.copy(spf.__file__, clone)
        try:
            import idna
        except ImportError:
            pass
        else:
            shutil.copytree(os.path.dirname(idna.__file__), os.path.join(clone, "idna"))
        process, log_path = serve(config, clone)
        try:
            wait_for(log_path, process, "ready")
            reply = ask(port)
            text = wait_for(log_path, process, "decision client=")
        finally:
            process.terminate()
            process.wait(timeout=10)
        with open(log_path) as handle:
            text = handle.read()
        assert "running as nobody" in text
        assert reply == b"action=DUNNO\n\n", text
        assert "spf=pass" in text
        for hidden in ("error", "critical", "Traceback", "internal"):
            assert hidden not in text
    finally:
        shutil.rmtree(clone)


FAILING_SETUID = """
import os, sys
def setuid(uid):
    raise PermissionError(1, "Operation not permitted")
os.setuid = setuid
from policyd_ipv6.daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_failed_privilege_drop_exits_non_zero_without_answering(readable_config):
    """When setuid fails after binding, serve logs the error and exits 1, and no request is
    answered meanwhile (it never serves as root)."""
    needs_root()
    config, port = readable_config
    process, log_path = serve(config, ROOT, ["-c", FAILING_SETUID])
    replies = []
    try:
        end = time.monotonic() + 15
        while process.poll() is None and time.monotonic() < end:
            try:
                replies.append(ask(port))
            except OSError:
                time.sleep(0.01)  # not bound yet, or already closed
        status = process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with open(log_path) as handle:
        text = handle.read()
    assert status == 1, text
    assert "cannot drop privileges to user nobody" in text
    assert not any(replies), replies
    assert "decision client=" not in text and "ready" not in text


def test_optin_file_the_user_cannot_see_warns_once_and_keeps_the_table(knot):
    """An opt-in file in a directory only root can enter (the quick start from a clone in
    /root) is loaded before the drop; nobody then gets one warning naming the file and the
    user, no error at each poll, the table keeps deciding, and a change is picked up once the
    directory is made readable."""
    needs_root()
    directory = tempfile.mkdtemp(prefix="policyd-conf-")
    # Inside the test's own directory, not below /root: whether nobody may enter /root itself
    # differs between machines (mode 700 on a fresh Debian root), and making the hidden
    # directory readable must be all it takes for the change to be seen.
    hidden = tempfile.mkdtemp(prefix="policyd-hidden-", dir=directory)
    try:
        os.chmod(directory, 0o755)
        os.chmod(hidden, 0o700)
        optin = os.path.join(hidden, "optin")
        with open(optin, "w") as handle:
            handle.write("sender.test\n")
        port = free_port()
        config = os.path.join(directory, "p.toml")
        with open(config, "w") as handle:
            handle.write(f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
                         f'optin_file = "{optin}"\noptin_reload_interval_seconds = 0.1\n'
                         f'nameservers = ["127.0.0.1:{knot}"]\nuser = "nobody"\n')
        process, log_path = serve(config, ROOT)
        try:
            wait_for(log_path, process, "ready")
            time.sleep(1)  # ten polls
            reply = ask(port)
            wait_for(log_path, process, "decision client=")
            with open(log_path) as handle:
                text = handle.read()
            os.chmod(hidden, 0o755)
            with open(optin, "w") as handle:
                handle.write("other.test\n")
            loaded = wait_for(log_path, process, "opt-in table loaded (file changed)")
        finally:
            process.terminate()
            process.wait(timeout=10)
        assert reply == b"action=DUNNO\n\n", text
        warnings = [line for line in text.splitlines() if line.startswith("warn opt-in file")]
        assert len(warnings) == 1, text
        assert optin in warnings[0] and "user nobody" in warnings[0], text
        assert "make it readable by nobody" in warnings[0], text
        for hidden_word in ("error", "critical", "Traceback", "not reloaded"):
            assert hidden_word not in loaded
    finally:
        shutil.rmtree(directory)
