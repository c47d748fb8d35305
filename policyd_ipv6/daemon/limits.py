"""Resource limits: open files for connections and DNS sockets.

Contract: ``raise_open_files_limit()`` lifts the soft RLIMIT_NOFILE to the hard limit and
returns ``(soft, hard)`` afterwards (every smtpd process holds one policy connection, and the
default soft limit of 1024 is below what a busy MX needs). ``descriptor_budget`` splits what
there is between connections and DNS queries in flight. Neither raises.
"""

from __future__ import annotations

import resource

__all__ = ["raise_open_files_limit", "descriptor_budget"]


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; return (soft, hard) afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def descriptor_budget(open_files: int, max_connections: int,
                      listeners: int = 1, reserved: int = 0) -> tuple[int, int]:
    """Split the open-files limit: (connections per kind of listener, DNS queries in flight).

    A quarter of the descriptors (at least 64) stays for DNS sockets, log files and listeners,
    so that accept() never meets EMFILE, which Twisted answers by dropping clients silently.
    ``reserved`` descriptors go to connections bounded elsewhere (the metrics listener's); the
    rest is shared by the ``listeners`` kinds of connection (policy, and the milter's when it
    is on: one SMTP session can hold one of each).
    """
    reserve = max(64, open_files // 4)
    connections = max(1, min(max_connections, (open_files - reserve - reserved) // listeners))
    return connections, max(8, reserve - 32)
