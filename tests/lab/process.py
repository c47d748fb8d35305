"""Stopping a process the lab started: SIGTERM by PID, SIGKILL if it lingers.

Contract: ``terminate(process, grace_seconds)`` takes a ``subprocess.Popen`` (or None) that
this test run started, sends SIGTERM, waits up to ``grace_seconds``, then SIGKILLs and reaps
it. Idempotent: an already finished process (or None) is left as it is. Only the given PID is
signalled, never a name or a process group. ``ServerProcess`` is the shape the lab's servers
share: a ``process``, a private ``directory`` and a ``log_path``, removed by an idempotent
``stop()`` that also runs on leaving a ``with`` block (subclasses provide ``start()``).
"""

from __future__ import annotations

import shutil
import signal
import subprocess


def terminate(process: subprocess.Popen | None, grace_seconds: float = 10.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_seconds)


class ServerProcess:
    process: subprocess.Popen | None = None
    directory = None
    grace_seconds = 5.0

    def start(self):
        raise NotImplementedError

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log (``log_path``), for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, TypeError, AttributeError):  # no directory yet, or no log
            return "(no log)"

    def stop(self) -> None:
        """Stop the process by PID (SIGTERM, then SIGKILL) and remove the directory."""
        process, self.process = self.process, None
        terminate(process, self.grace_seconds)
        directory, self.directory = self.directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
