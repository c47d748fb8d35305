"""Stopping a process the lab started: SIGTERM by PID, SIGKILL if it lingers.

Contract: ``terminate(process, grace_seconds)`` takes a ``subprocess.Popen`` (or None) that
this test run started, sends SIGTERM, waits up to ``grace_seconds``, then SIGKILLs and reaps
it. Idempotent: an already finished process (or None) is left as it is. Only the given PID is
signalled, never a name or a process group.
"""

from __future__ import annotations

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
