"""The configuration in force, as the running parts read it: one object that a reload swaps.

Contract: ``InForce`` is one immutable snapshot of what the running daemon obeys: the validated
``config`` and what is derived from it once per load (the decision's ``policy``, the resolved
``nameservers``, the milter's ``authserv_id``). ``Live`` holds the snapshot in force in its one
attribute ``now``; ``daemon.wiring`` replaces ``now`` in a single assignment at SIGHUP, and
writes nothing else (the assignment itself updates the attached parts, below).

A running part declares each reloadable value as a class attribute ``Setting("key")`` (read
from ``now.config.key``) or ``Setting("name", derived=True)`` (read from ``now.name``). The
wiring attaches each part once (``Live.attach``); from then on every swap of ``now`` writes
the part's values from the new snapshot into the part, in the same assignment, so a reload
cannot forget a part and a read is a plain attribute (read on every request: no Python call).
A part built on its own (tests, the ``check`` command's pieces) is never attached and keeps
the value its constructor assigned. No I/O, no Twisted.
"""

from __future__ import annotations

import weakref
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
    """The snapshot in force, ``now``, replaced whole at a reload; the parts attached to it get
    the new snapshot's values in that same assignment."""

    def __init__(self, now: InForce) -> None:
        self._now = now
        self._parts: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def now(self) -> InForce:
        return self._now

    @now.setter
    def now(self, value: InForce) -> None:
        self._now = value
        for part in list(self._parts):
            _apply(part, value)

    @property
    def config(self) -> Any:
        return self._now.config

    def attach(self, part: Any) -> None:
        """From now on ``part``'s Settings follow ``now`` (and ``part.live`` is this)."""
        part.live = self
        self._parts.add(part)
        _apply(part, self._now)


def _apply(part: Any, now: InForce) -> None:
    """Write ``now``'s value of every Setting of the part's class (and its bases) into it."""
    seen: set[str] = set()
    for klass in type(part).__mro__:
        for name, value in vars(klass).items():
            if name not in seen:
                seen.add(name)
                if isinstance(value, Setting):
                    part.__dict__[name] = value.read(now)


class Setting:
    """A reloadable value of a running part: the snapshot's once the part is attached, else its
    own.

    ``Setting("dns_timeout_seconds")`` reads ``now.config.dns_timeout_seconds``;
    ``Setting("policy", derived=True)`` reads ``now.policy``. Assigning the attribute stores
    the part's own value (used until it is attached; an attached part's next reload writes
    over it). A non-data descriptor: the value lives in the part's own ``__dict__``, so a read
    never calls this class.
    """

    def __init__(self, key: str, derived: bool = False) -> None:
        self.read = attrgetter(("" if derived else "config.") + key)
        self.name = key  # the attribute's name, once the class is built (__set_name__)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        raise AttributeError(f"{type(obj).__name__}.{self.name}: neither assigned nor attached")
