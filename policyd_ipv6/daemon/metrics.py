"""Prometheus metrics: what the daemon decided, asked, kept and refused, as counters.

Contract: ``Metrics(clock)`` holds a registry of its own (never prometheus_client's global
one) with the library's process metrics. ``Metrics.attach(service)`` hooks a running
``wiring.PolicyService``: the policy listener's engine and the lookups' DNS client are wrapped
(``CountingEngine``, ``CountingDnsClient``: the answer passes through unchanged, the count
is taken on the way), and a collector reads, at each scrape, the counts the parts keep
themselves (caches' ``hits``/``misses`` and sizes, connections, refusals, milter verdicts and
DKIM signatures, the opt-in table, the pauses ``daemon.collector`` timed once
``Metrics.collector`` is set, and the metrics listener's own open connections and refusals once
``Metrics.listener`` is: ``metrics_http.metrics_factory`` sets it). ``Metrics.observe_log``
is a ``twisted.logger`` observer counting internal errors: events of the daemon's namespace
that carry a traceback at level error or above. ``Metrics.snapshot()`` collects every metric
(on the reactor thread: it reads live objects); ``render(snapshot)`` turns it into the
Prometheus text format (pure: the HTTP side, ``metrics_http``, runs it in a thread). Nothing
here can fail a decision: a counting error is logged and the answer goes on.

The names and labels are a contract (README "Metrics"); ``NAMES`` lists every metric this
module exports, for the documentation and the Grafana dashboard's test. The decision's
``outcome``: ``defer`` (a 4xx reply), ``reject`` (5xx), ``report`` (DUNNO, with a refusal only
reported: would=), ``accept`` (DUNNO otherwise). A DNS query's ``outcome``: ``answer``,
``nxdomain``, ``nodata``, ``servfail``, ``timeout``, ``too_large`` (a reply over the size the
query takes, refused unread: an SPF TXT set over the per-evaluation cap) or ``error`` (refused,
unreachable, a broken answer, abandoned at the decision's deadline).
"""

from __future__ import annotations

import functools
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.internet import defer
from twisted.logger import Logger, LogLevel

from policyd_ipv6.daemon.collector import BUCKETS
from policyd_ipv6.resolver.client import MAX_REPLY_SIZE, ReplyTooLarge, TransientDnsError
from policyd_ipv6.resolver.reply import Reply
from policyd_ipv6.vocabulary import Clock

__all__ = ["Metrics", "CountingEngine", "CountingDnsClient", "decision_outcome", "render",
           "NAMES", "CONTENT_TYPE"]

_log = Logger(namespace="policyd-ipv6")

# The text exposition format 0.0.4: what Prometheus 2.x reads, and what every
# prometheus_client release writes for these names.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_P = "policyd_ipv6_"
NAMES = tuple(_P + n for n in (
    "decisions_total", "decision_duration_seconds", "dns_queries_total",
    "dns_query_duration_seconds", "cache_lookups_total", "cache_entries", "connections",
    "connections_refused_total", "milter_messages_total", "dkim_signatures_total",
    "optin_entries", "optin_last_load_timestamp_seconds", "optin_load_failures_total",
    "optin_skipped_rows", "optin_from_last_good_copy", "internal_errors_total",
    "gc_pause_duration_seconds", "gc_longest_pause_seconds"))
_DECISION_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
_DNS_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


def decision_outcome(action: str, would: str) -> str:
    """The ``outcome`` label of a policy reply (``Verdict.action``, ``Verdict.would``)."""
    if action[:1] == "4" or action.upper().startswith("DEFER"):
        return "defer"
    if action[:1] == "5" or action.upper().startswith("REJECT"):
        return "reject"
    return "report" if would else "accept"


def dns_outcome(result: object) -> str:
    """The ``outcome`` label of what a query ended with: a response, or its exception (or a
    Failure of it)."""
    if isinstance(result, (dns.message.Message, Reply)):
        if result.rcode() == dns.rcode.NXDOMAIN:
            return "nxdomain"
        return "answer" if result.answer else "nodata"
    error = getattr(result, "value", result)
    if isinstance(error, ReplyTooLarge):
        return "too_large"
    if isinstance(error, TransientDnsError):
        # The client's reason lists each try: "timeout from ...; SERVFAIL from ...".
        why = str(error)
        if "SERVFAIL" in why:
            return "servfail"
        if "timeout" in why:
            return "timeout"
    return "error"


class CountingEngine:
    """The policy engine as the policy listener sees it, counting each decision."""

    def __init__(self, engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def answer(self, attributes: dict[str, str]):
        return self.engine.answer(attributes).addCallback(self._count)

    def answer_now(self, attributes: dict[str, str]):
        outcome = self.engine.answer_now(attributes)
        if isinstance(outcome, defer.Deferred):
            return outcome.addCallback(self._count)
        return self._count(outcome)

    def answer_with(self, attributes: dict[str, str], deliver, failed):
        outcome = self.engine.answer_with(attributes, functools.partial(self._counted, deliver),
                                          failed)
        return None if outcome is None else self._count(outcome)

    def _counted(self, deliver, outcome) -> None:
        deliver(self._count(outcome))

    def _count(self, outcome):
        try:
            verdict = outcome.verdict
            self.metrics.decisions.labels(
                rule=str(verdict.rule),
                outcome=decision_outcome(verdict.action, verdict.would)).inc()
            self.metrics.decision_seconds.observe(outcome.elapsed_ms / 1000)
        except Exception:
            _log.failure("internal error counting a decision (the reply goes out)")
        return outcome

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class CountingDnsClient:
    """A ``DnsClient`` that counts and times each query it passes on."""

    def __init__(self, client, clock: Clock, metrics: Metrics) -> None:
        self.client = client
        self.clock = clock
        self.metrics = metrics

    def ask(self, wire_name: bytes, rdtype, deliver, max_size: int = MAX_REPLY_SIZE):
        """``DnsClient.ask`` (the lookups' way in), counted when the query ends, or as "error"
        when it is cancelled (abandoned at the deadline)."""
        counted = _CountedQuery(self, dns.rdatatype.to_text(rdtype), deliver)
        counted.query = self.client.ask(wire_name, rdtype, counted.delivered, max_size)
        return counted

    def _count(self, result, rrtype: str, start: float):
        try:
            self.metrics.dns_queries.labels(type=rrtype, outcome=dns_outcome(result)).inc()
            self.metrics.dns_seconds.labels(type=rrtype).observe(
                max(0.0, self.clock.seconds() - start))
        except Exception:
            _log.failure("internal error counting a DNS query (the answer goes on)")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


class _CountedQuery:
    """A query of ``CountingDnsClient.ask``: counted once, when it ends or is cancelled."""

    def __init__(self, client: CountingDnsClient, rrtype: str, deliver) -> None:
        self.client = client
        self.rrtype = rrtype
        self.start = client.clock.seconds()
        self.deliver = deliver  # None once counted
        self.query: Any = None  # the client's, to cancel

    def delivered(self, result) -> None:
        deliver, self.deliver = self.deliver, None
        if deliver is not None:
            self.client._count(result, self.rrtype, self.start)
            deliver(result)

    def cancel(self) -> None:
        if self.deliver is not None:
            self.deliver = None
            self.client._count(defer.CancelledError(), self.rrtype, self.start)
        self.query.cancel()


class _Snapshot:
    """Metric families collected already: what ``generate_latest`` reads."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def render(snapshot: _Snapshot) -> bytes:
    """The Prometheus text format of a ``Metrics.snapshot()`` (no live object is read)."""
    return generate_latest(snapshot)  # type: ignore[arg-type, unused-ignore]


class Metrics:
    """See the module docstring."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        r = self.registry
        self.decisions = Counter(
            _P + "decisions", "Policy decisions, by rule and outcome (accept, defer: 4xx, "
            "reject: 5xx, report: a refusal only reported).", ["rule", "outcome"], registry=r)
        self.decision_seconds = Histogram(
            _P + "decision_duration_seconds", "Time from a policy request to its reply.",
            buckets=_DECISION_BUCKETS, registry=r)
        self.dns_queries = Counter(
            _P + "dns_queries", "DNS queries sent (each with its tries), by type and outcome.",
            ["type", "outcome"], registry=r)
        self.dns_seconds = Histogram(
            _P + "dns_query_duration_seconds", "Time a DNS query took, tries included.",
            ["type"], buckets=_DNS_BUCKETS, registry=r)
        self.internal_errors = Counter(
            _P + "internal_errors", "Internal errors (bugs) logged with a traceback.",
            registry=r)
        self.service: Any = None
        self.collector: Any = None  # a running daemon.collector.Collector: its pauses
        self.listener: Any = None  # the metrics listener's factory (metrics_http): its refusals
        self._optin_seen: Any = None
        self._optin_failures_before = 0  # failures of opt-in watchers a reload replaced
        r.register(self)

    def attach(self, service) -> None:
        """Count what ``service`` (a ``wiring.PolicyService``) does from now on."""
        self.service = service
        service.factory.engine = CountingEngine(service.factory.engine, self)
        service.lookups.client = CountingDnsClient(service.lookups.client, self.clock, self)

    def observe_log(self, event: dict) -> None:
        """A log observer: count the daemon's events carrying a traceback (level error+)."""
        if (event.get("log_failure") is not None
                and event.get("log_namespace") == "policyd-ipv6"
                and event.get("log_level", LogLevel.error) >= LogLevel.error):
            self.internal_errors.inc()

    def snapshot(self) -> _Snapshot:
        """Every metric, collected now (call it on the reactor thread)."""
        return _Snapshot(list(self.registry.collect()))

    def describe(self) -> list:
        return []  # the families below are named at each collect()

    def collect(self):
        """The counts the service's parts keep themselves (a prometheus_client collector)."""
        service = self.service
        if service is None:
            return
        caches = {"dns": service.lookups.cache, "message": service.finder.messages,
                  "spf": service.finder.spf_results}
        lookups = CounterMetricFamily(
            _P + "cache_lookups", "Attempts to find an entry in a cache, by result.",
            labels=["cache", "result"])
        entries = GaugeMetricFamily(_P + "cache_entries", "Entries a cache holds.",
                                    labels=["cache"])
        for name, cache in caches.items():
            lookups.add_metric([name, "hit"], cache.hits)
            lookups.add_metric([name, "miss"], cache.misses)
            entries.add_metric([name], len(getattr(cache, "cache", cache)))
        yield lookups
        yield entries
        yield from self._connections(service)
        yield from self._optin(service)
        yield from self._pauses()

    def _connections(self, service):
        policy, milter = service.factory, service.milter_factory
        listeners = {"policy": policy, "milter": milter}
        open_ = GaugeMetricFamily(_P + "connections", "Open connections, by listener.",
                                  labels=["listener"])
        refused = CounterMetricFamily(
            _P + "connections_refused", "Connections the daemon closed at once or to make "
            "room (max_connections; the metrics listener's own fixed bound), or refused "
            "(milter_peer_users), by listener.", labels=["listener"])
        for name, factory in listeners.items():
            open_.add_metric([name], factory.connections if factory is not None else 0)
            refused.add_metric([name], factory.over_limit.refused + factory.peer_check.refused
                               if factory is not None else 0)
        listener = self.listener  # the metrics listener's factory: protocols are those open
        open_.add_metric(["metrics"], len(listener.protocols) if listener is not None else 0)
        refused.add_metric(["metrics"], listener.over_limit.refused
                           if listener is not None else 0)
        yield open_
        yield refused
        messages = CounterMetricFamily(
            _P + "milter_messages", "Messages the milter answered at end of message, by rule.",
            labels=["rule"])
        signatures = CounterMetricFamily(
            _P + "dkim_signatures", "DKIM signatures verified by the milter, by result.",
            labels=["result"])
        if milter is not None:
            for rule, count in sorted(milter.messages.items()):
                messages.add_metric([str(rule)], count)
            for result, count in sorted(milter.signatures.items()):
                signatures.add_metric([str(result)], count)
        yield messages
        yield signatures

    def _optin(self, service):
        watcher = service.optin
        if watcher is not self._optin_seen:
            if self._optin_seen is not None:  # a reload put a watcher of a new file in place
                self._optin_failures_before += self._optin_seen.failures
            self._optin_seen = watcher
        yield GaugeMetricFamily(_P + "optin_entries", "Entries of the opt-in table in force.",
                                value=len(watcher.table))
        yield GaugeMetricFamily(
            _P + "optin_last_load_timestamp_seconds",
            "When the opt-in table in force was loaded (Unix time).", value=watcher.loaded_at)
        yield CounterMetricFamily(
            _P + "optin_load_failures", "Loads of the opt-in table that failed (the previous "
            "table stayed in force).", value=self._optin_failures_before + watcher.failures)
        # The database source only (a file with a bad line is refused whole): rows its last load
        # left out, and whether the daemon serves the state directory's copy (database down).
        yield GaugeMetricFamily(
            _P + "optin_skipped_rows", "Rows of the opt-in database the last load skipped "
            "(each logged with a warning naming it).", value=getattr(watcher, "skipped_rows", 0))
        yield GaugeMetricFamily(
            _P + "optin_from_last_good_copy", "1 while the opt-in table in force is the "
            "last-good copy in state_directory (the database did not answer at start-up).",
            value=1 if getattr(watcher, "origin", "") == "last-good copy" else 0)

    def _pauses(self):
        """The garbage collector's pauses (``daemon.collector``), as it counted them."""
        pauses = HistogramMetricFamily(
            _P + "gc_pause_duration_seconds", "Garbage collections (the reactor stops for "
            "each), by generation: 0 young, 1 middle, 2 old or full.", labels=["generation"])
        collector = self.collector
        for generation in range(3):
            counts = collector.pauses[generation] if collector else [0] * (len(BUCKETS) + 1)
            total, buckets = 0, []
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
                total += count
                buckets.append((bound, total))
            pauses.add_metric([str(generation)], buckets,
                              collector.pause_sum[generation] if collector else 0.0)
        yield pauses
        yield GaugeMetricFamily(
            _P + "gc_longest_pause_seconds", "The longest garbage collection since start-up.",
            value=collector.longest if collector else 0.0)
