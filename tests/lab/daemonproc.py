"""The real daemon as a child process on loopback, and a Postfix-like policy client, for tests.

Contract:
- ``ServeProcess(directory, settings, optin)`` writes ``policyd.toml`` (the ``settings`` dict,
  plus a TCP listener on a free loopback port and ``optin_file = "optin"``) and the opt-in file
  into ``directory`` (a setting given as None is left out: ``optin_file=None`` for
  ``optin_postgresql``), runs ``python -m policyd_ipv6 serve --config FILE`` from the repository
  (as test_cli.py does; ``--allow-root`` when run by root) with its output in ``serve.log``,
  and returns from ``start()`` once the daemon logs "ready". ``rlimit_nofile=(soft, hard)``
  starts it under that open-file limit;
  ``file_modes_apply=True`` starts it without the capabilities that let root ignore file
  modes (``setpriv`` drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding set),
  so a mode-000 file is unreadable to it even when the tests run as root. ``stop()`` sends
  SIGTERM to its PID (SIGKILL after 10 s) and is idempotent.
- ``rss_kib()`` reads VmRSS from /proc/PID/status; ``log()``, ``wait_for(text)``,
  ``problems()`` (logged tracebacks, unhandled errors and internal-error lines, which no test
  may ever see) help the assertions.
- ``request(**attrs)`` gives the bytes of one policy request as Postfix sends it (RCPT stage);
  ``ask(sock, data, timeout)`` sends it and returns the reply line (``action=...``), or None
  when the daemon closes the connection without a reply (Postfix's failure contract).
- ``is_valid_action(text)``: the access(5) actions this daemon may ever answer.
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from .knot import free_port
from .process import terminate

__all__ = ["ServeProcess", "request", "ask", "is_valid_action", "ROOT"]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 15.0

# DUNNO, or a 4xx/5xx reject with an RFC 3463 code of the same class and printable ASCII text.
ACTION = re.compile(r"DUNNO|([45])\d\d \1\.\d{1,3}\.\d{1,3} [\x20-\x7e]*[\x21-\x7e]")
_PROBLEMS = re.compile(r"Traceback|Unhandled|internal error|^critical ", re.MULTILINE)


def is_valid_action(text: str) -> bool:
    return ACTION.fullmatch(text) is not None


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings, numbers and lists of them are valid TOML


class ServeProcess:
    def __init__(self, directory, settings: dict | None = None, optin: str = "",
                 rlimit_nofile: tuple[int, int] | None = None,
                 file_modes_apply: bool = False) -> None:
        self.directory = Path(directory)
        self.port = free_port()
        settings = {"listen": [f"tcp:{self.port}:interface=127.0.0.1"],
                    "optin_file": "optin", **(settings or {})}
        self.settings = {k: v for k, v in settings.items() if v is not None}
        self.optin_path = self.directory / "optin"
        self.config_path = self.directory / "policyd.toml"
        self.log_path = self.directory / "serve.log"
        self.rlimit_nofile = rlimit_nofile
        self.file_modes_apply = file_modes_apply
        self.process: subprocess.Popen | None = None
        self.optin_path.write_text(optin)
        self.config_path.write_text("".join(f"{k} = {_toml(v)}\n"
                                            for k, v in self.settings.items()))

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "policyd_ipv6", "serve", "--config", str(self.config_path)]
        if os.geteuid() == 0:
            argv.append("--allow-root")  # a disposable test lab; the privilege tests are elsewhere
        if self.file_modes_apply:
            argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *argv]
        return argv

    def start(self) -> ServeProcess:
        limit = self.rlimit_nofile
        if limit is not None and os.geteuid() != 0:
            # only root may raise its hard limit; others stay within theirs
            current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            limit = (min(limit[0], current_hard), min(limit[1], current_hard))

        def preexec() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, limit)

        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv(), cwd=ROOT, env=env,
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, preexec_fn=preexec)
        try:
            self.wait_for("ready", START_TIMEOUT_SECONDS)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def problems(self) -> list[str]:
        """Log lines that show an exception or internal error (never expected)."""
        return [m.group(0) + ": " + self.log()[m.start():m.start() + 200]
                for m in _PROBLEMS.finditer(self.log())]

    def wait_for(self, text: str, timeout: float = 10.0, after: int = 0) -> None:
        """Wait until ``text`` appears in the log (past offset ``after``)."""
        end = time.monotonic() + timeout
        while text not in self.log()[after:]:
            if not self.alive():
                raise AssertionError(f"policyd-ipv6 exited ({self.process.returncode}) "
                                     f"before logging {text!r}:\n{self.log()[-3000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"{text!r} not logged within {timeout} s:\n"
                                     f"{self.log()[-3000:]}")
            time.sleep(0.05)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.settimeout(timeout)
        return sock

    def ask(self, data: bytes, timeout: float = 10.0) -> str | None:
        """One request on a new connection; the reply line, or None if closed without one."""
        with self.connect(timeout) as sock:
            return ask(sock, data, timeout)

    def stop(self) -> None:
        process, self.process = self.process, None
        terminate(process, grace_seconds=10)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def request(**attrs) -> bytes:
    """A RCPT-stage policy request as Postfix 3.x sends it; ``attrs`` override or add."""
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
            "protocol_name": "ESMTP", "client_address": "2001:db8::25", "client_name": "unknown",
            "reverse_client_name": "unknown", "client_port": "40000",
            "helo_name": "mx.example.net", "sender": "a@example.net",
            "recipient": "b@example.com", "recipient_count": "0", "queue_id": "",
            "instance": "", "size": "0", "sasl_username": ""}
    base.update(attrs)
    return b"".join(f"{k}={v}\n".encode() for k, v in base.items()) + b"\n"


def ask(sock: socket.socket, data: bytes, timeout: float = 10.0) -> str | None:
    """Send ``data`` and read one reply; None when the connection closes without one."""
    sock.settimeout(timeout)
    sock.sendall(data)
    reply = b""
    while not reply.endswith(b"\n\n"):
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            assert reply == b"", f"connection closed in the middle of a reply: {reply!r}"
            return None
        reply += chunk
    text = reply.decode("ascii")
    assert text.count("\n") == 2 and text.startswith("action="), f"not one reply: {text!r}"
    return text[len("action="):-2]
