"""Graceful stop: stop accepting, answer every request already received, then let the reactor
stop.

Contract: ``drain(clock, ports, policy_factory, milter_factory, grace_seconds)`` returns a
Deferred that fires once every listener in ``ports`` has stopped accepting and every
connection is closed, or ``grace_seconds`` after the call, whichever comes first (it never
fails). A policy connection is closed as soon as it is idle (``PolicyProtocol.idle``: no
request received and unanswered, none half-received): at once for one waiting for its
client's next request, right after its last reply for one still deciding; one that has not
sent its first request yet (accepted just before the stop) is given ``FIRST_REQUEST_SECONDS``
to send it. A milter connection is closed once it owes Postfix no verdict and no message is
open on it (``MilterProtocol.waiting`` is None, ``in_transaction`` false): a message under way
is judged first. What is still open when the grace ends is left to the reactor's own
shutdown, which closes it; Postfix then applies ``milter_default_action`` to those milter
sessions (the packaged map: tempfail for IPv6), so nothing is let in unjudged. Connections
are looked at every ``TICK_SECONDS``, a bounded loop.

Under socket activation, stopping an adopted port closes only this process's copy of the
socket: systemd keeps it open, and new connections wait in its backlog for the next process.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger

__all__ = ["drain", "TICK_SECONDS", "FIRST_REQUEST_SECONDS"]

_log = Logger(namespace="policyd-ipv6")

TICK_SECONDS = 0.02
# A connection accepted just before the stop whose request is still on its way: Postfix
# writes it right after connecting, so it is waited for this long, then closed.
FIRST_REQUEST_SECONDS = 2.0


def _open_connections(policy_factory, milter_factory) -> list:
    found = list(policy_factory.open) if policy_factory is not None else []
    if milter_factory is not None:
        found += list(getattr(milter_factory, "open", ()))
    return found


def _close_settled(policy_factory, milter_factory, first_request_over: bool) -> int:
    """Close every connection that owes nothing; return how many are still open."""
    still = 0
    if policy_factory is not None:
        for proto in list(policy_factory.open):
            if proto.idle and (proto.answered or first_request_over):
                proto._close()
            else:
                still += 1
    if milter_factory is not None:
        for proto in list(getattr(milter_factory, "open", ())):
            if proto.waiting is None and not proto.in_transaction and not proto.closed:
                proto._close()
            elif not proto.closed:
                still += 1
    return still


def drain(clock, ports, policy_factory, milter_factory, grace_seconds: float) -> defer.Deferred:
    """See the module docstring."""
    stopped = [defer.maybeDeferred(port.stopListening) for port in ports]
    done: defer.Deferred = defer.Deferred()
    started = clock.seconds()
    busy = _close_settled(policy_factory, milter_factory, False)
    if busy:
        _log.info("stopping: no new connections; answering {n} request(s) already received "
                  "(at most {s}s)", n=busy, s=grace_seconds)

    def tick() -> None:
        if done.called:
            return
        _close_settled(policy_factory, milter_factory,
                       clock.seconds() - started >= FIRST_REQUEST_SECONDS)
        if not _open_connections(policy_factory, milter_factory):
            loop.stop()
            done.callback(None)
        elif clock.seconds() - started >= grace_seconds:
            left = len(_open_connections(policy_factory, milter_factory))
            _log.warn("stopping: {n} connection(s) still busy after {s}s, closed unanswered",
                      n=left, s=grace_seconds)
            loop.stop()
            done.callback(None)

    loop = task.LoopingCall(tick)
    loop.clock = clock
    loop.start(TICK_SECONDS, now=True).addErrback(
        lambda failure: _log.failure("stopping: draining failed", failure))
    listening: defer.Deferred = defer.DeferredList(stopped, consumeErrors=True)
    return defer.DeferredList([listening, done], consumeErrors=True)
