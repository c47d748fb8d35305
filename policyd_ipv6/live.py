"""The configuration in force, as the running parts read it: one object that a reload swaps.

Contract: ``InForce`` is one immutable snapshot of what the running daemon obeys: the validated
``config`` and what is derived from it once per load (the decision's ``policy``, the resolved
``nameservers``, the milter's ``authserv_id``). ``Live`` holds the snapshot in force in its one
attribute ``now``; ``daemon.wiring`` replaces ``now`` in a single assignment at SIGHUP, and
nothing else is written.

A running part declares each reloadable value as a class attribute ``Setting("key")`` (read
from ``now.config.key``) or ``Setting("name", derived=True)`` (read from ``now.name``). Once the
wiring has set the part's ``live`` attribute, every read of the value goes to the snapshot in
force, so a reload cannot forget a part. A part built on its own (tests, the ``check``
command's pieces) has no ``live`` and keeps the value its constructor assigned. No I/O, no
Twisted; the reads cost two attribute look-ups.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any

__all__ = ["InForce", "Live", "Setting"]


@dataclass(frozen=True)
class InForce:
    """One configuration and what the daemon derived from it (see the module docstring)."""

    config: Any  # daemon.config.Config (not imported: this module sits below the daemon)
    policy: Any = None  # policy.decision.Policy
    nameservers: tuple = ()  # resolver.wire.Nameserver, the configured or resolv.conf's
    authserv_id: str = ""


class Live:
    """The snapshot in force; ``now`` is the only attribute, replaced whole at a reload."""

    def __init__(self, now: InForce) -> None:
        self.now = now

    @property
    def config(self) -> Any:
        return self.now.config


class Setting:
    """A reloadable value of a running part: the snapshot's when the part is live, else its own.

    ``Setting("dns_timeout_seconds")`` reads ``live.now.config.dns_timeout_seconds``;
    ``Setting("policy", derived=True)`` reads ``live.now.policy``. Assigning the attribute
    stores the part's own value (used while it has no ``live``).
    """

    def __init__(self, key: str, derived: bool = False) -> None:
        self.key = key
        self.derived = derived
        self.slot = "_" + key
        # One C-level getter for the whole path: read on every request.
        self._read = attrgetter(("now." if derived else "now.config.") + key)

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        own = obj.__dict__
        live = own.get("live")
        if live is None:
            return own[self.slot]
        return self._read(live)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value
