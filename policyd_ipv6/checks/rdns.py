"""The reverse DNS check (rule 2 of EOP): does the client address have a (valid) PTR record?

Contract: ``check_rdns(lookups, ip, mode, reverse_client_name, client_name)`` returns a
Deferred that always fires with an ``RdnsFact``; it never fails. ``rdns_known`` (same
arguments) returns that fact at once when no lookup is needed (Postfix's names, or every
answer in the lookups' cache), else None.

- ``mode == "ptr"`` (EOP as documented): PASS when the address has a PTR record whose target is
  a host name; MISSING for NXDOMAIN, no PTR data, or only targets that are not host names (as
  Postfix treats them, myaddrinfo.c); TEMPFAIL for a transient fault. No forward lookup.
- ``mode == "fcrdns"`` (Gmail's rule): PASS as soon as one PTR name has an AAAA (A for IPv4)
  record equal to the client address, even if another name's lookup failed; otherwise
  TEMPFAIL if any forward lookup failed temporarily, else UNCONFIRMED.

Postfix has already looked the client up: ``reverse_client_name`` (unverified PTR name) and
``client_name`` (forward-confirmed name) are "unknown" when its lookup failed, whether the
failure was temporary or not (smtpd_peer.c). A name there is therefore proof and saves the
lookups; "unknown" is checked with our own lookups, which tell the two failures apart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

from policyd_ipv6.facts import RdnsFact, RdnsOutcome
from policyd_ipv6.names import IPAddress, client_ip, host_name
from policyd_ipv6.vocabulary import Answer, DnsStatus, Lookups, Waiter

__all__ = ["check_rdns", "rdns_known", "lookup_rdns", "MAX_PTR_NAMES"]

_log = Logger(namespace="policyd-ipv6")

# RFC 7208 §4.6.4 bounds the ptr mechanism to 10 names; the same bound serves here.
MAX_PTR_NAMES = 10


def _host_names(values: tuple) -> tuple[str, ...]:
    names = [name for name in map(host_name, values) if name is not None]
    return tuple(dict.fromkeys(names))[:MAX_PTR_NAMES]


def check_rdns(lookups: Lookups, ip: IPAddress, mode: str, reverse_client_name: str = "unknown",
               client_name: str = "unknown") -> defer.Deferred[RdnsFact]:
    """See the module docstring."""
    known = rdns_known(lookups, ip, mode, reverse_client_name, client_name)
    if known is not None:
        return defer.succeed(known)
    return lookup_rdns(lookups, ip, mode)


def lookup_rdns(lookups: Lookups, ip: IPAddress, mode: str) -> defer.Deferred[RdnsFact]:
    """The lookups of ``check_rdns`` once ``rdns_known`` has said None (no second look at
    Postfix's names or the cache). Cancelling the Deferred withdraws its lookups."""
    check: _Lookups | None = None
    result: defer.Deferred[RdnsFact] = defer.Deferred(
        lambda _d: None if check is None else check.cancel())
    check = _Lookups(lookups, ip, mode, result.callback)
    check.start()
    return result


def rdns_known(lookups: Lookups, ip: IPAddress, mode: str, reverse_client_name: str = "unknown",
               client_name: str = "unknown") -> RdnsFact | None:
    """The fact ``check_rdns`` would give, at once, when Postfix's names or the lookups' cache
    already hold every answer it needs; None when a lookup is still to be made."""
    if mode == "fcrdns" and client_name not in ("", "unknown"):
        return RdnsFact(RdnsOutcome.PASS, (client_name.lower(),), client_name.lower(),
                        "confirmed by Postfix (client_name)")
    if mode == "ptr" and reverse_client_name not in ("", "unknown"):
        return RdnsFact(RdnsOutcome.PASS, (reverse_client_name.lower(),), None,
                        "found by Postfix (reverse_client_name)")
    answer = lookups.cached(ip.reverse_pointer, "PTR")
    if answer is None:
        return None
    first = _ptr_fact(answer, mode)
    if isinstance(first, RdnsFact):
        return first
    rrtype = "AAAA" if ip.version == 6 else "A"
    outcomes: dict[str, str] = {}
    for name in first:
        forward = lookups.cached(name, rrtype)
        if forward is None:
            return None
        if forward.ok and any(_same(ip, value) for value in forward.values):
            return RdnsFact(RdnsOutcome.PASS, first, name, f"{name} resolves back ({rrtype})")
        outcomes[name] = forward.status if forward.ok is False else "other address"
    return _unconfirmed(first, outcomes)


def _ptr_fact(answer: Answer, mode: str) -> RdnsFact | tuple[str, ...]:
    """The fact a PTR answer settles, or the names to confirm (fcrdns)."""
    if answer.status == DnsStatus.TEMPFAIL:
        return RdnsFact(RdnsOutcome.TEMPFAIL, detail=f"PTR lookup: {answer.detail}")
    if not answer.ok:
        return RdnsFact(RdnsOutcome.MISSING, detail=f"PTR lookup: {answer.status}")
    names = _host_names(answer.values)
    if not names:
        return RdnsFact(RdnsOutcome.MISSING, detail="PTR target is not a host name")
    if mode == "ptr":
        return RdnsFact(RdnsOutcome.PASS, names, None, "PTR found")
    return names


def _unconfirmed(names: tuple[str, ...], outcomes: dict[str, str]) -> RdnsFact:
    """No name resolved back: TEMPFAIL if a forward lookup failed temporarily."""
    details = ", ".join(f"{n}: {s}" for n, s in outcomes.items())
    temporary = any(s == DnsStatus.TEMPFAIL for s in outcomes.values())
    outcome = RdnsOutcome.TEMPFAIL if temporary else RdnsOutcome.UNCONFIRMED
    return RdnsFact(outcome, names, None, f"forward lookups: {details}")


class _Lookups:
    """The PTR lookup, then (fcrdns) the forward lookups of its names, all at once: the first
    name whose addresses include ``ip`` wins. ``deliver`` is called once with the fact, unless
    ``cancel()`` came first (which withdraws the lookups still under way). Callbacks, not
    Deferreds: this runs for every cold message."""

    def __init__(self, lookups: Lookups, ip: IPAddress, mode: str,
                 deliver: Callable[[RdnsFact], object]) -> None:
        self.lookups = lookups
        self.ip = ip
        self.mode = mode
        self.rrtype = "AAAA" if ip.version == 6 else "A"  # of the forward lookups
        self.deliver: Callable[[RdnsFact], object] | None = deliver
        self.waiting: list[Waiter] = []
        self.names: tuple[str, ...] = ()
        self.outcomes: dict[str, str] = {}

    def start(self) -> None:
        got = self.lookups.ask(self.ip.reverse_pointer, "PTR", self._ptr)
        if isinstance(got, Answer):
            self._ptr(got)
        else:
            self.waiting.append(got)

    def _ptr(self, answer: Answer) -> None:
        try:
            self._after_ptr(answer)
        except Exception:  # a bug: the check ends at once as a temporary failure, logged
            self._bug()

    def _after_ptr(self, answer: Answer) -> None:
        first = _ptr_fact(answer, self.mode)
        if isinstance(first, RdnsFact):
            self._end(first)
            return
        self.names = first
        for name in first:
            if self.deliver is None:  # settled by an answer known at once
                return
            got = self.lookups.ask(name, self.rrtype, functools.partial(self._forward, name))
            if isinstance(got, Answer):
                self._forward(name, got)
            else:
                self.waiting.append(got)

    def _forward(self, name: str, answer: Answer) -> None:
        if self.deliver is None:
            return  # settled already (the other lookups go on: their answers are cached)
        try:
            self._confirm(name, answer)
        except Exception:
            self._bug()

    def _confirm(self, name: str, answer: Answer) -> None:
        if answer.ok and any(_same(self.ip, value) for value in answer.values):
            self._end(RdnsFact(RdnsOutcome.PASS, self.names, name,
                               f"{name} resolves back ({self.rrtype})"))
            return
        self.outcomes[name] = answer.status if answer.ok is False else "other address"
        if len(self.outcomes) == len(self.names):
            self._end(_unconfirmed(self.names, self.outcomes))

    def _bug(self) -> None:
        _log.failure("internal error in the reverse DNS check")
        self._end(RdnsFact(RdnsOutcome.TEMPFAIL, detail="internal error"))

    def _end(self, fact: RdnsFact) -> None:
        deliver, self.deliver = self.deliver, None
        if deliver is not None:
            deliver(fact)

    def cancel(self) -> None:
        self.deliver = None
        waiting, self.waiting = self.waiting, []
        for waiter in waiting:
            waiter.cancel()


def _same(ip: IPAddress, text: str) -> bool:
    return client_ip(text) == ip
