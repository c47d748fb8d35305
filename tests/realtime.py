"""Running the real Twisted reactor inside a plain pytest test, for tests that use real sockets.

``wait(deferred, timeout)`` turns the reactor (without ``reactor.run()``, which cannot be
restarted) until the Deferred fires, and returns its result or raises its failure; it fails
the test if nothing happens within ``timeout`` seconds.
"""

from __future__ import annotations

import time

from twisted.python.failure import Failure


def wait(deferred, timeout: float = 10.0):
    from twisted.internet import reactor

    result = []
    deferred.addBoth(result.append)
    end = time.monotonic() + timeout
    while not result and time.monotonic() < end:
        reactor.iterate(0.005)
    assert result, f"no result within {timeout} s"
    if isinstance(result[0], Failure):
        result[0].raiseException()
    return result[0]
