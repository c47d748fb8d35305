"""Typed, cached DNS lookups for the checks: the one resolver adapter of the daemon.

Contract: ``Lookups.lookup(name, rrtype)`` returns a Deferred that always fires (never fails)
with an ``Answer``: ``status`` is ``ok`` (with ``values``), ``nxdomain``, ``nodata`` (includes
names that cannot exist: over-long, empty labels, CNAME loops) or ``tempfail`` (timeouts,
SERVFAIL...: a transient fault, with ``detail``). ``Lookups.cached(name, rrtype)`` answers
synchronously from the cache, or ``None``. Values are plain Python: PTR and CNAME targets as
lower-case names without the trailing dot, A/AAAA as address text, MX as (preference, name),
TXT as a tuple of ``bytes`` strings per record.

Answers are cached for their DNS TTL (negative answers for the SOA minimum, RFC 2308), bounded
by ``max_ttl_seconds``, by ``max_entries`` and by ``max_bytes`` (an estimate of the memory the
answers hold: one TXT set can be 64 KB, so a count alone bounds nothing); concurrent lookups
of the same name share one query, and at most ``max_inflight`` names are asked at once (each
holds a socket). Temporary failures are not cached. Names are always absolute: no search
list. An unexpected exception (a bug, not a DNS fault) also gives ``tempfail``, and is logged
at error level with its traceback.

``lookup(name, rrtype, max_size)`` bounds the reply in bytes: a longer one is not read and
gives ``tempfail`` with ``too_large`` set (the caller decides what that means: for SPF's TXT
cap, a permerror); lookups with different bounds do not share a query. Cancelling the
Deferred of a lookup withdraws that caller; when no caller is left, the query is cancelled
too (its socket closed), and nothing is cached from it. ``ask(name, rrtype, deliver,
max_size)`` is ``lookup`` without a Deferred (the checks' way in, once per cold lookup): the
Answer at once when it is known, else a waiter whose ``deliver`` is called once, and whose
``cancel()`` withdraws it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.ttl
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from policyd_ipv6.cache import ExpiringCache
from policyd_ipv6.live import Live, Setting
from policyd_ipv6.resolver.client import MAX_REPLY_SIZE, ReplyTooLarge, TransientDnsError
from policyd_ipv6.resolver.reply import Reply, resolve
from policyd_ipv6.resolver.wire import encode_name
from policyd_ipv6.vocabulary import Answer, Clock, DnsClient, DnsStatus

__all__ = ["Answer", "Lookups"]

_log = Logger(namespace="policyd-ipv6")

_NEGATIVE_TTL_FALLBACK = 60.0  # when a negative answer carries no SOA


def _values(rrset, rrtype: str) -> tuple:
    if rrtype in ("PTR", "CNAME"):
        return tuple(r.target.to_text(omit_final_dot=True).lower() for r in rrset)
    if rrtype in ("A", "AAAA"):
        return tuple(r.address for r in rrset)
    if rrtype == "MX":
        return tuple((r.preference, r.exchange.to_text(omit_final_dot=True).lower())
                     for r in rrset)
    return tuple(tuple(r.strings) for r in rrset)  # TXT


def interpret_reply(reply: Reply, max_ttl: float) -> Answer:
    """``interpret`` for the client's own parsed reply (``resolver.reply``)."""
    if reply.opcode != 0:
        return Answer(DnsStatus.TEMPFAIL, detail="unusable answer (not a query response)")
    found = resolve(reply)
    if found.kind == "chain-too-long":
        return Answer(DnsStatus.NODATA, detail="CNAME chain too long")
    if found.kind == "answer-for-nxdomain":
        return Answer(DnsStatus.TEMPFAIL, detail="unusable answer (AnswerForNXDOMAIN)")
    if found.ttl is None:
        return Answer(DnsStatus.NXDOMAIN if found.kind == "nxdomain" else DnsStatus.NODATA,
                      ttl=min(_NEGATIVE_TTL_FALLBACK, max_ttl))
    ttl = float(min(found.ttl, max_ttl))
    if found.kind == "answer":
        return Answer(DnsStatus.OK, found.values, ttl=ttl)
    return Answer(DnsStatus.NXDOMAIN if found.kind == "nxdomain" else DnsStatus.NODATA, ttl=ttl)


def interpret(response: dns.message.Message | Reply, rrtype: str, max_ttl: float) -> Answer:
    """Turn a NOERROR/NXDOMAIN response into an Answer, following its CNAME chain."""
    if isinstance(response, Reply):
        return interpret_reply(response, max_ttl)
    if not isinstance(response, dns.message.QueryMessage):  # opcode not QUERY
        return Answer(DnsStatus.TEMPFAIL, detail="unusable answer (not a query response)")
    try:
        chain = response.resolve_chaining()
    except dns.message.ChainTooLong:
        return Answer(DnsStatus.NODATA, detail="CNAME chain too long")
    except Exception as error:  # FormError, AnswerForNXDOMAIN...: a broken answer
        return Answer(DnsStatus.TEMPFAIL, detail=f"unusable answer ({error.__class__.__name__})")
    ttl = float(min(chain.minimum_ttl, max_ttl))
    if chain.answer is not None:
        return Answer(DnsStatus.OK, _values(chain.answer, rrtype), ttl=ttl)
    if chain.minimum_ttl >= dns.ttl.MAX_TTL:
        ttl = min(_NEGATIVE_TTL_FALLBACK, max_ttl)
    status = (DnsStatus.NXDOMAIN if response.rcode() == dns.rcode.NXDOMAIN
              else DnsStatus.NODATA)
    return Answer(status, ttl=ttl)


# A generous estimate (CPython 3.11, tracemalloc: a 1,000-byte TXT answer holds about 520
# bytes more than its text... this counts 900): the key, the Answer, the cache slot, then
# each value's object headers and characters.
_ANSWER_OVERHEAD = 600
_VALUE_OVERHEAD = 100


def answer_size(key: tuple[str, str], answer: Answer) -> int:
    """An estimate of the bytes a cached answer holds, for the cache's byte bound."""
    size = _ANSWER_OVERHEAD + len(key[0]) + len(answer.detail)
    for value in answer.values:
        if isinstance(value, tuple):  # TXT strings, or MX (preference, name)
            size += _VALUE_OVERHEAD + sum(_VALUE_OVERHEAD // 2 + len(str(part))
                                          for part in value)
        else:
            size += _VALUE_OVERHEAD + len(value)
    return size


class Lookups:
    """See the module docstring. ``client`` is a ``DnsClient`` (``resolver.client``'s, or a
    test's fake), asked through its ``ask``: no Deferred per query."""

    max_ttl_seconds = Setting("dns_max_ttl_seconds")  # reloadable (``live``)
    live: Live | None = None

    def __init__(self, client: DnsClient, clock: Clock, max_entries: int = 100_000,
                 max_ttl_seconds: float = 3600.0, max_inflight: int = 10_000,
                 max_bytes: int = 32 * 1024 * 1024) -> None:
        self.client = client
        # Each query in flight holds a socket: past this many, a new name fails temporarily at
        # once rather than running the process out of file descriptors.
        self.max_inflight = max_inflight
        self.cache: ExpiringCache[tuple[str, str], Answer] = ExpiringCache(
            max_entries, clock, max_bytes, Answer.packed, Answer.unpacked)
        self.max_ttl_seconds = max_ttl_seconds
        # (name, type, max_size or None) -> the query and the Deferreds of those waiting on it
        self._inflight: dict[tuple[str, str, int | None], _Flight] = {}

    def cached(self, name: str, rrtype: str) -> Answer | None:
        return self.cache.get((name.lower().rstrip("."), rrtype))

    def lookup(self, name: str, rrtype: str,
               max_size: int | None = None) -> defer.Deferred[Answer]:
        """``ask``'s Deferred form: cancelling the Deferred withdraws this caller."""
        waiter: _Waiter | None = None
        d: defer.Deferred[Answer] = defer.Deferred(
            lambda _d: None if waiter is None else waiter.cancel())
        got = self.ask(name, rrtype, d.callback, max_size)
        if isinstance(got, Answer):
            return defer.succeed(got)
        waiter = got
        return d

    def ask(self, name: str, rrtype: str, deliver: Callable[[Answer], object],
            max_size: int | None = None) -> Answer | _Waiter:
        """The Answer at once when it is known (cached; a name DNS cannot carry; too many
        queries in flight; a query that failed at once): ``deliver`` is then never called.
        Otherwise a waiter: ``deliver(answer)`` is called once when the answer comes, unless
        the waiter's ``cancel()`` came first. What ``lookup`` does, without a Deferred."""
        key = (name.lower().rstrip("."), rrtype)
        answer = self.cache.get(key)
        if answer is not None:
            return answer
        flight_key = (*key, max_size)
        flight = self._inflight.get(flight_key)
        if flight is None:
            started = self._start(key, flight_key, max_size)
            if isinstance(started, Answer):
                return started
            flight = started
        waiter = _Waiter(flight, deliver)
        flight.waiters.append(waiter)
        return waiter

    def _start(self, key: tuple[str, str], flight_key: tuple[str, str, int | None],
               max_size: int | None) -> Answer | _Flight:
        """Send the query of a new flight; its Answer if it ended at once."""
        try:
            wire_name = encode_name(key[0])
            qtype = _QTYPES.get(key[1]) or dns.rdatatype.from_text(key[1])
        except (dns.exception.DNSException, ValueError) as error:
            return Answer(DnsStatus.NODATA, detail=f"not a DNS name ({error})"[:200])
        if len(self._inflight) >= self.max_inflight:
            return Answer(DnsStatus.TEMPFAIL, detail="too many DNS queries in flight")
        flight = self._inflight[flight_key] = _Flight(self, flight_key)
        query = self.client.ask(wire_name, qtype, flight.delivered,
                                MAX_REPLY_SIZE if max_size is None else max_size)
        if flight.answer is not None:  # it failed (or was answered) before we got here
            return flight.answer
        flight.query = query
        return flight

    def _deliver(self, answer: object, flight: _Flight) -> None:
        if self._inflight.get(flight.key) is not flight:
            return  # every waiter withdrew and the query was cancelled: nobody to tell
        del self._inflight[flight.key]
        key = flight.key[:2]
        if not isinstance(answer, Answer):
            # A bug below us (or a module that cannot be loaded): the mail gets a temporary
            # refusal, and the log says why, with the traceback.
            if isinstance(answer, Failure):
                _log.failure("internal error in the DNS lookup of {name} {rrtype}; answered as "
                             "a temporary failure", answer, level=LogLevel.error,
                             name=key[0], rrtype=key[1])
            answer = Answer(DnsStatus.TEMPFAIL, detail=f"internal error: {answer!r}"[:200])
        if answer.status != DnsStatus.TEMPFAIL:
            self.cache.put(key, answer, answer.ttl, answer_size(key, answer))
        flight.answer = answer
        waiters, flight.waiters = flight.waiters, []
        for waiter in waiters:
            deliver, waiter.deliver = waiter.deliver, None
            if deliver is None:
                continue  # withdrew (its deadline passed)
            try:
                deliver(answer)
            except Exception:  # one waiter's bug must not keep the answer from the others
                _log.failure("internal error taking the DNS answer for {name} {rrtype}",
                             name=key[0], rrtype=key[1])


# The types the checks ask for, without dnspython's text-to-type lookup per query.
_QTYPES = {name: int(dns.rdatatype.from_text(name))
           for name in ("A", "AAAA", "PTR", "TXT", "MX", "CNAME")}


def _error_answer(error: BaseException) -> Answer | None:
    """A query's error as an Answer: transient DNS faults are tempfail (a reply over the
    query's bound marked ``too_large``); anything else is a bug (None)."""
    if isinstance(error, ReplyTooLarge):
        return Answer(DnsStatus.TEMPFAIL, detail=str(error), too_large=True)
    if isinstance(error, TransientDnsError):
        return Answer(DnsStatus.TEMPFAIL, detail=str(error))
    return None


class _Flight:
    """One query under way and the callers waiting on it."""

    def __init__(self, lookups: Lookups, key: tuple[str, str, int | None]) -> None:
        self.lookups = lookups
        self.key = key
        self.waiters: list[_Waiter] = []
        self.query: Any = None  # the client's query (to cancel it); None once answered
        self.answer: Answer | None = None  # once answered

    def delivered(self, result: Any) -> None:
        """The client's end of the query (a response, or the error it failed with) as an
        Answer for the waiters; an error that is not a DNS fault stays a Failure (logged)."""
        self.query = None
        try:
            if isinstance(result, BaseException):
                result = _error_answer(result) or Failure(result)
            else:  # resolver.reply's Reply, or a test's fake dns.message.Message
                result = interpret(result, self.key[1], self.lookups.max_ttl_seconds)
        except Exception:
            result = Failure()
        self.lookups._deliver(result, self)

    def withdraw(self) -> None:
        """A waiter was cancelled; the last one out cancels the query (and frees its socket)."""
        if self.lookups._inflight.get(self.key) is not self:
            return  # already answered
        if any(waiter.deliver is not None for waiter in self.waiters):
            return
        del self.lookups._inflight[self.key]
        self.waiters = []
        if self.query is not None:
            query, self.query = self.query, None
            query.cancel()


class _Waiter:
    """One caller of ``Lookups.ask`` waiting on a flight."""

    __slots__ = ("flight", "deliver")

    def __init__(self, flight: _Flight, deliver: Callable[[Answer], object]) -> None:
        self.flight = flight
        self.deliver: Callable[[Answer], object] | None = deliver  # None: delivered, or cancelled

    def cancel(self) -> None:
        """Withdraw: ``deliver`` is not called; the last waiter out cancels the query."""
        if self.deliver is not None:
            self.deliver = None
            self.flight.withdraw()
