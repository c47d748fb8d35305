"""Gathering the facts of one message: rDNS and SPF at once, once per message, by a deadline.

Contract: ``FactFinder.for_message(subject, rdns_mode)`` returns the ``MessageFacts`` of the
message the request belongs to, starting its lookups (reverse DNS and SPF concurrently) the
first time; ``rdns_mode`` (an opt-in entry's ``rdns=`` option) overrides ``rdns_mode`` of the
finder, and recipients of one message with different modes get facts of their own.
``MessageFacts.wait(need, call)`` calls ``call(facts)`` once that fact is known (at once if it
is), and ``MessageFacts.when(need)`` is the same as a Deferred that fires (never fails).
When ``deadline_seconds`` pass before a fact is known, the fact becomes a temporary failure
(rDNS ``TEMPFAIL``, SPF ``temperror``) with the detail "deadline": a slow lookup turns into
451 4.4.3, never a hang and never a refusal.

One message, one evaluation: Postfix sends one request per recipient with the same
``instance`` (SMTPD_POLICY_README), possibly over a new connection if it closed the old one
(SMTPD_POLICY_README, on the instance attribute), so the facts are kept process-wide, keyed
by instance and the SPF inputs: the message while its checks run (``pending``, each ends by
its deadline; at most ``max_messages``), then its facts in a bounded, expiring cache, packed
into plain tuples that the garbage collector does not walk (``cache``). A request without an
instance is never shared.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from policyd_ipv6.cache import MEMO, ExpiringCache
from policyd_ipv6.checks.rdns import lookup_rdns, rdns_known
from policyd_ipv6.checks.spf import DEFAULT_LIMITS, Limits, SpfResults, run_spf
from policyd_ipv6.facts import Facts, RdnsFact, RdnsOutcome, SpfFact
from policyd_ipv6.live import Live, Setting
from policyd_ipv6.names import IPAddress
from policyd_ipv6.policy.decision import Need, Subject
from policyd_ipv6.timeouts import Timeout, Timeouts
from policyd_ipv6.vocabulary import Clock, Lookups, SpfResult

__all__ = ["FactFinder", "MessageFacts"]

_log = Logger(namespace="policyd-ipv6")


class MessageFacts:
    """The facts of one message as they arrive; ``facts`` is the current snapshot."""

    def __init__(self, clock: Clock, deadline_seconds: float, timeouts: Timeouts) -> None:
        self.facts = Facts()
        self.started = clock.seconds()
        # Who waits for each fact (``wait``). Two lists, not a dict keyed by Need: an Enum's
        # hash is a Python call, and this runs for every message.
        self._waiting_rdns: list[Callable[[Facts], object]] = []
        self._waiting_spf: list[Callable[[Facts], object]] = []
        self._timeouts, self._deadline_seconds = timeouts, deadline_seconds
        # Armed by start_deadline() once the checks are under way.
        self._timer: Timeout | None = None
        # The checks under way (a Deferred, an SPF evaluation), cancelled at the deadline.
        self.work: list[Any] = []
        # Called once with the facts when both are known (the finder files them away).
        self.on_complete: Callable[[Facts], None] | None = None

    @classmethod
    def known(cls, clock: Clock, facts: Facts) -> MessageFacts:
        """A message whose facts are all known already (kept from an earlier recipient)."""
        # Only what ``when`` and ``facts`` read: this runs for nearly every warm recipient.
        message = cls.__new__(cls)
        message.facts = facts
        return message

    def when(self, need: Need) -> defer.Deferred[Facts]:
        """A Deferred firing with ``self.facts`` once ``need`` is known."""
        if self._known(need):
            return defer.succeed(self.facts)
        d: defer.Deferred[Facts] = defer.Deferred()
        self.wait(need, d.callback)
        return d

    def wait(self, need: Need, call: Callable[[Facts], object]) -> None:
        """Call ``call(self.facts)`` once ``need`` is known: now, if it is. ``call`` must not
        raise (the engine's continuation catches its own errors)."""
        if self._known(need):
            call(self.facts)
        else:
            (self._waiting_rdns if need is Need.RDNS else self._waiting_spf).append(call)

    def _known(self, need: Need) -> bool:
        return (self.facts.rdns if need is Need.RDNS else self.facts.spf) is not None

    def set_rdns(self, fact: RdnsFact) -> None:
        if self.facts.rdns is None:
            self.facts = Facts(fact, self.facts.spf, self.facts.dkim_pending)
            self._wake(Need.RDNS)

    def set_spf(self, fact: SpfFact) -> None:
        if self.facts.spf is None:
            self.facts = Facts(self.facts.rdns, fact, self.facts.dkim_pending)
            self._wake(Need.SPF)

    def _wake(self, need: Need) -> None:
        if self.facts.rdns is not None and self.facts.spf is not None:
            self.work = []  # nothing left to cancel: let the finished checks go
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            complete, self.on_complete = self.on_complete, None
            if complete is not None:
                try:
                    complete(self.facts)
                except Exception:  # a bug filing the facts away must not strand the waiters
                    _log.failure("internal error keeping a message's facts")
        if need is Need.RDNS:
            waiting, self._waiting_rdns = self._waiting_rdns, []
        else:
            waiting, self._waiting_spf = self._waiting_spf, []
        for call in waiting:
            try:
                call(self.facts)
            except Exception:  # a bug in one waiter must not keep the others waiting
                _log.failure("internal error in a request waiting for facts")

    def start_deadline(self) -> None:
        """Arm the deadline, unless every fact is already known (answered from caches)."""
        if self.facts.rdns is None or self.facts.spf is None:
            self._timer = self._timeouts.call(self._deadline_seconds, self._deadline)

    def _deadline(self) -> None:
        running, self.work = self.work, []
        self.set_rdns(RdnsFact(RdnsOutcome.TEMPFAIL, detail="deadline reached"))
        self.set_spf(SpfFact(SpfResult.TEMPERROR, "deadline reached"))
        # Stop the checks still running: their answers can no longer change any reply.
        for check in running:
            check.cancel()  # a Deferred already fired, or an evaluation ended: no effect


class FactFinder:
    """Starts and remembers the lookups of each message. See the module docstring."""

    # Reloadable: read from the configuration in force once the wiring sets ``live``.
    rdns_mode = Setting("rdns")
    deadline_seconds = Setting("decision_deadline_seconds")
    message_ttl_seconds = Setting("message_cache_ttl_seconds")
    live: Live | None = None

    def __init__(self, lookups: Lookups, clock: Clock, rdns_mode: str, deadline_seconds: float,
                 max_messages: int = 20_000, message_ttl_seconds: float = 3600.0,
                 spf_limits: Limits = DEFAULT_LIMITS) -> None:
        self.lookups = lookups
        self.clock = clock
        self.timeouts = Timeouts(clock)  # the messages' deadlines
        self.rdns_mode = rdns_mode
        self.deadline_seconds = deadline_seconds
        self.message_ttl_seconds = message_ttl_seconds
        self.spf_limits = spf_limits
        # Messages whose checks are under way (each ends by its deadline), then their facts,
        # packed (see ``cache``: a full cache the garbage collector never walks).
        self.pending: dict[tuple[object, ...], MessageFacts] = {}
        self.max_pending = max_messages
        self.messages: ExpiringCache[tuple[object, ...], Facts] = ExpiringCache(
            max_messages, clock, pack=Facts.packed, unpack=Facts.unpacked, memo=MEMO)
        # A repeat sender (same IP and domain) costs no SPF run while its answers are fresh.
        self.spf_results = SpfResults(max_messages, clock)
        self._unique = itertools.count()

    def for_message(self, subject: Subject,
                    rdns_mode: str | None = None) -> tuple[MessageFacts, bool]:
        """The message's facts and whether they were already known (shared)."""
        mode = rdns_mode or self.rdns_mode
        key: tuple[object, ...]
        if subject.instance:
            key = (subject.instance, subject.client_address, subject.sender, subject.helo_name,
                   mode)
        else:
            key = ("", next(self._unique))
        under_way = self.pending.get(key)
        if under_way is not None:
            self.messages.hits += 1  # one cache for the metrics: under way or kept
            return under_way, True
        facts = self.messages.get(key)
        if facts is not None:
            return MessageFacts.known(self.clock, facts), True
        ip = subject.ip
        assert ip is not None  # the decision asks for facts only about an address
        # Known at once (Postfix's names, cached answers, a reusable SPF result): set without
        # a Deferred; otherwise the check runs and sets its fact when it ends.
        try:
            rdns_fact = rdns_known(self.lookups, ip, mode, subject.reverse_client_name,
                                   subject.client_name)
        except Exception:
            _log.failure("internal error in the reverse DNS check")
            rdns_fact = RdnsFact(RdnsOutcome.TEMPFAIL, detail="internal error")
        inputs = (ip, subject.sender, subject.helo_name)
        known = self.spf_results.get(*inputs)
        if rdns_fact is not None and known is not None:  # the warm path: nothing to wait for
            facts = Facts(rdns_fact, known)
            if subject.instance:
                self.messages.put(key, facts, self.message_ttl_seconds)
            return MessageFacts.known(self.clock, facts), False
        message = MessageFacts(self.clock, self.deadline_seconds, self.timeouts)
        if subject.instance and len(self.pending) < self.max_pending:
            self.pending[key] = message
            message.on_complete = functools.partial(self._complete, key)
        if rdns_fact is not None:
            message.set_rdns(rdns_fact)
        else:
            rdns = lookup_rdns(self.lookups, ip, mode)
            message.work.append(rdns)
            rdns.addCallback(message.set_rdns)
            rdns.addErrback(self._bug, "reverse DNS check", message.set_rdns,
                            RdnsFact(RdnsOutcome.TEMPFAIL, detail="internal error"))
        if known is None:
            try:
                spf = run_spf(self.lookups, *inputs, self.spf_limits,
                              functools.partial(self._spf_done, message, inputs))
            except Exception:
                _log.failure("internal error in the SPF check")
                spf = SpfFact(SpfResult.TEMPERROR, "internal error")
            if isinstance(spf, SpfFact):
                self._spf_done(message, inputs, spf)
            else:
                message.work.append(spf)
        else:
            message.set_spf(known)
        message.start_deadline()
        return message, False

    def _complete(self, key: tuple[object, ...], facts: Facts) -> None:
        """A message's facts are all known: keep them for its other recipients."""
        self.pending.pop(key, None)
        self.messages.put(key, facts, self.message_ttl_seconds)

    def _spf_done(self, message: MessageFacts, inputs: tuple[IPAddress, str, str],
                  fact: SpfFact) -> None:
        """The SPF evaluation ended: keep its result for reuse, and set the message's fact."""
        try:
            self.spf_results.put(*inputs, fact)
        except Exception:  # a bug: the fact still goes to the message (not kept)
            _log.failure("internal error keeping an SPF result")
        message.set_spf(fact)

    def _bug(self, failure, what: str, setter, fallback) -> None:
        if failure.check(defer.CancelledError):
            return  # the deadline passed and already set the fact
        # A bug must cost a retry (4xx), never a crash or a lost message.
        _log.failure("internal error in the {what}", failure, what=what)
        setter(fallback)
