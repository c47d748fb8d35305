"""What a collection would free, for tests that prove a path leaves no reference cycle.

``cyclic_garbage(keep)`` runs a full collection with ``gc.DEBUG_SAVEALL`` and returns the
unreachable objects for which ``keep(obj)`` is true (the collector's state is restored, and the
objects are released). Tests that share a process with others that leave Twisted timers and
failures behind count only the objects of the path they prove (its classes, its buffers),
not what another test's leftovers make while the reactor turns.
"""

from __future__ import annotations

import gc
from collections.abc import Callable


def cyclic_garbage(keep: Callable[[object], bool]) -> list[str]:
    """Descriptions (type and a short repr) of the unreachable objects ``keep`` picks."""
    flags = gc.get_debug()
    gc.set_debug(flags | gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return [f"{type(o).__module__}.{type(o).__qualname__}: {repr(o)[:80]}"
                for o in gc.garbage if keep(o)]
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()


def instances_of(*classes: type) -> Callable[[object], bool]:
    """A ``keep`` for ``cyclic_garbage``: instances of ``classes`` (subclasses included)."""
    return lambda obj: isinstance(obj, classes)
