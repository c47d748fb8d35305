"""Run the real policyd-ipv6 daemon for the lab, exactly as an administrator would start it.

Contract:
- `config_from_example(example_text, overrides)` returns the text of postfix-examples'
  policyd-ipv6.toml with the value of each overridden key replaced in place (comments and
  every other line kept; a key the example lacks is appended), so the lab's configurations
  are the shipped example plus the few settings a lab needs.
- `PolicyDaemon(config_path, log_path, netns)` runs `policyd-ipv6 serve --config FILE` (the
  console script installed next to the running Python, i.e. what `pip install` made) inside
  the namespace, stdout and stderr appended to `log_path`. `start()` (= `launch()` then
  `wait_ready()`, which several daemons can overlap) returns once every
  listen endpoint of the config accepts connections (TCP: a LISTEN socket on the port in the
  daemon's own network namespace, read from /proc/PID/net; unix: a listening socket bound to
  the path there, so a file a killed daemon left behind does not count);
  it raises `DaemonError` with the log's tail if the daemon exits or is not ready in time.
- `stop()` sends SIGTERM to the daemon's PID (SIGKILL after 10 s); `restart()` = stop + start.
- `decisions()` returns the daemon's `decision ...` log lines (see policyd_ipv6/policy/engine.py for
  the fields) as dicts.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from .netns import Namespace
from .process import terminate

START_TIMEOUT_SECONDS = 20.0
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


class DaemonError(RuntimeError):
    """The daemon did not start or stop as expected; the message carries its log."""


def console_script() -> Path:
    """The `policyd-ipv6` script pip installed for this Python (next to sys.executable)."""
    return Path(sys.executable).parent / "policyd-ipv6"


def _toml_value(value) -> str:
    # JSON strings, numbers and lists of them are valid TOML (basic strings, arrays).
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def config_from_example(example_text: str, overrides: dict) -> str:
    """The example configuration with `overrides` (key -> value) applied in place."""
    lines, done, table_at = [], set(), None
    for line in example_text.splitlines():
        if line.startswith("[") and table_at is None:
            table_at = len(lines)  # top-level keys must come before the first [table]
        key = line.split("=", 1)[0].strip() if "=" in line and not line.startswith("#") else None
        if key in overrides and table_at is None:
            lines.append("%s = %s" % (key, _toml_value(overrides[key])))
            done.add(key)
        else:
            lines.append(line)
    missing = ["%s = %s" % (k, _toml_value(v)) for k, v in overrides.items() if k not in done]
    at = len(lines) if table_at is None else table_at
    lines[at:at] = missing
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # the lab never hands the daemon a file that is not TOML
    return text


def _listening_tcp_ports(pid: int) -> set[int]:
    """Ports with a LISTEN socket in the network namespace of process `pid`."""
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path("/proc/%d/net/%s" % (pid, table)).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _listening_unix_paths(pid: int) -> set[str]:
    """Paths of listening Unix sockets in the network namespace of process `pid`."""
    try:
        rows = Path("/proc/%d/net/unix" % pid).read_text().splitlines()[1:]
    except OSError:
        return set()
    # Num RefCount Protocol Flags Type St Inode Path; flag __SO_ACCEPTCON: listening.
    return {fields[7] for fields in (row.split() for row in rows)
            if len(fields) > 7 and int(fields[3], 16) & 0x10000}


class PolicyDaemon:
    """One `policyd-ipv6 serve --config FILE` process."""

    def __init__(self, config_path: Path, log_path: Path, netns: Namespace | None = None):
        self.config_path = Path(config_path)
        self.log_path = Path(log_path)
        self.netns = netns
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        return [str(console_script()), "serve", "--config", str(self.config_path)]

    def endpoints(self) -> tuple[list[int], list[Path]]:
        """(TCP ports, unix socket paths) named by the config's `listen` key."""
        listen = tomllib.loads(self.config_path.read_text()).get(
            "listen", ["tcp:10045:interface=127.0.0.1"])
        ports, paths = [], []
        for endpoint in listen:
            kind, _, rest = endpoint.partition(":")
            if kind in ("tcp", "tcp6"):
                ports.append(int(rest.split(":", 1)[0].replace("port=", "")))
            elif kind == "unix":
                paths.append(Path(rest.split(":", 1)[0].replace("address=", "")))
        return ports, paths

    def start(self) -> PolicyDaemon:
        """Start the daemon and wait until it listens (see the module docstring)."""
        return self.launch().wait_ready()

    def launch(self) -> PolicyDaemon:
        """Start the process without waiting; `wait_ready()` then waits for its listeners."""
        if self.process is not None and self.process.poll() is None:
            raise DaemonError("already running as PID %d" % self.process.pid)
        argv = self.netns.argv(self.argv()) if self.netns else self.argv()
        with open(self.log_path, "ab") as log:
            log.write(("--- start: %s\n" % shlex.join(argv)).encode())
            log.flush()
            # ip netns exec execs the script: this PID is the daemon's own.
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        return self

    def wait_ready(self) -> PolicyDaemon:
        """Wait until every listen endpoint is up; DaemonError if it exits or takes too long."""
        ports, paths = self.endpoints()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise DaemonError("policyd-ipv6 exited with status %s:\n%s"
                                  % (code, self.log_tail()))
            listening = _listening_tcp_ports(self.process.pid)
            bound = _listening_unix_paths(self.process.pid) if paths else set()
            if all(p in listening for p in ports) and all(str(p) in bound for p in paths):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonError("policyd-ipv6 not listening on %s %s after %.0f s:\n%s" % (
                    ports, [str(p) for p in paths], START_TIMEOUT_SECONDS, self.log_tail()))
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it does not exit within 10 s. Idempotent."""
        process, self.process = self.process, None
        terminate(process, grace_seconds=10)

    def restart(self) -> PolicyDaemon:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def decisions(self) -> list[dict[str, str]]:
        """Every `decision key=value ...` line logged so far, as a dict (quotes removed)."""
        out = []
        for line in self.log().splitlines():
            words = line.split(" ", 2)
            if len(words) >= 2 and "decision" in words[:2]:
                fields = {}
                for key, value in _FIELD.findall(line):
                    fields[key] = value[1:-1] if value.startswith('"') else value
                out.append(fields)
        return out
