"""The metrics: what a running service counts, read back from its registry after real work.

A ``PolicyService`` is built from a configuration file, its DNS client replaced by the fake,
and driven through its policy listener (``StringTransport``, ``task.Clock``); the registry is
read with ``get_sample_value`` and the text format with ``render``.
"""

from __future__ import annotations

import ipaddress

import pytest
from fakes import FakeDnsClient
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from policyd_ipv6.daemon.config import load_config
from policyd_ipv6.daemon.metrics import NAMES, Metrics, decision_outcome, dns_outcome, render
from policyd_ipv6.daemon.metrics_http import MAX_CONNECTIONS, metrics_factory
from policyd_ipv6.daemon.wiring import PolicyService
from policyd_ipv6.resolver.client import ReplyTooLarge, TransientDnsError

ADDR = "2001:db8::25"
NOPTR = "2001:db8::26"
RECORDS = {(ipaddress.ip_address(ADDR).reverse_pointer, "PTR"): ["mx.example.net."],
           ("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"']}
P = "policyd_ipv6_"

# The contract of the issue: each metric's labels, exactly.
LABELS = {
    "decisions_total": {"rule", "outcome"}, "decision_duration_seconds": set(),
    "dns_queries_total": {"type", "outcome"}, "dns_query_duration_seconds": {"type"},
    "cache_lookups_total": {"cache", "result"}, "cache_entries": {"cache"},
    "connections": {"listener"}, "connections_refused_total": {"listener"},
    "milter_messages_total": {"rule"}, "dkim_signatures_total": {"result"},
    "optin_entries": set(), "optin_last_load_timestamp_seconds": set(),
    "optin_load_failures_total": set(), "internal_errors_total": set(),
    "optin_skipped_rows": set(), "optin_from_last_good_copy": set(),
    "gc_pause_duration_seconds": {"generation"}, "gc_longest_pause_seconds": set(),
}


class Daemon:
    """A service counted by ``Metrics``, and one policy connection to it."""

    def __init__(self, tmp_path, extra: str = "") -> None:
        (tmp_path / "optin").write_text("contoso.com\n")
        self.path = tmp_path / "p.toml"
        self.path.write_text('listen = ["tcp:0"]\noptin_file = "optin"\n'
                             'nameservers = ["192.0.2.53"]\nmilter_listen = ["tcp:0"]\n' + extra)
        self.clock = task.Clock()
        self.service = PolicyService(load_config(str(self.path)), self.clock)
        self.fake = FakeDnsClient(RECORDS, broken={"broken.example"})
        self.service.lookups.client = self.fake
        self.metrics = Metrics(self.clock)
        self.metrics.attach(self.service)
        self.proto = self.service.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def ask(self, address=ADDR, recipient="bob@contoso.com", sender="alice@example.net",
            instance="i1") -> str:
        attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                 "client_address": address, "client_name": "unknown",
                 "reverse_client_name": "unknown", "helo_name": "mx.example.net",
                 "sender": sender, "recipient": recipient, "instance": instance}
        self.transport.clear()
        self.proto.dataReceived(b"".join(f"{k}={v}\n".encode() for k, v in attrs.items())
                                + b"\n")
        return self.transport.value().decode()

    def value(self, name: str, **labels) -> float | None:
        self.metrics.snapshot()  # the collector reads the live parts at each scrape
        return self.metrics.registry.get_sample_value(P + name, labels)


def test_decisions_are_counted_by_rule_and_outcome_ipv4_included(tmp_path):
    """Each reply counts once under its rule: IPv4 accepted, 550 reject, 450 defer, DUNNO."""
    d = Daemon(tmp_path)
    assert "DUNNO" in d.ask(address="192.0.2.10")
    assert "550" in d.ask(recipient="bob@example.org", instance="i2")
    assert "450" in d.ask(address=NOPTR, instance="i3")
    assert "DUNNO" in d.ask(instance="i4")
    assert d.value("decisions_total", rule="ipv4", outcome="accept") == 1
    assert d.value("decisions_total", rule="not-opted-in", outcome="reject") == 1
    assert d.value("decisions_total", rule="no-rdns", outcome="defer") == 1
    assert d.value("decisions_total", rule="pass", outcome="accept") == 1
    assert d.value("decision_duration_seconds_count") == 4


def test_a_refusal_only_reported_counts_as_report(tmp_path):
    """In report mode the 450 a sender without PTR would get is counted as outcome report."""
    d = Daemon(tmp_path, 'mode = "report"\n')
    assert "DUNNO" in d.ask(address=NOPTR)
    assert d.value("decisions_total", rule="no-rdns", outcome="report") == 1


def test_outcome_of_each_reply_kind():
    """4xx and DEFER are defer, 5xx and REJECT reject, DUNNO with would= report, else accept."""
    assert decision_outcome("451 4.4.3 later", "") == "defer"
    assert decision_outcome("DEFER_IF_PERMIT later", "") == "defer"
    assert decision_outcome("550 5.2.1 no", "") == "reject"
    assert decision_outcome("DUNNO", "550 5.2.1 no") == "report"
    assert decision_outcome("DUNNO", "") == "accept"


def test_dns_queries_are_counted_by_type_and_outcome(tmp_path):
    """The queries a decision sends count as answer or nxdomain, each with a duration."""
    d = Daemon(tmp_path)
    d.ask(address=NOPTR)
    d.ask()
    assert d.value("dns_queries_total", type="PTR", outcome="answer") == 1
    assert d.value("dns_queries_total", type="PTR", outcome="nxdomain") == 1
    assert d.value("dns_queries_total", type="TXT", outcome="answer") == 1
    assert d.value("dns_query_duration_seconds_count", type="PTR") == 2


def test_a_query_abandoned_at_the_deadline_counts_once_as_error(tmp_path):
    """A PTR query nobody answers is cancelled when the decision's deadline passes: it counts
    once, as "error", and the decision is a temporary refusal."""
    d = Daemon(tmp_path)
    d.fake.silent.add(ipaddress.ip_address(NOPTR).reverse_pointer)
    assert d.ask(address=NOPTR) == ""  # waiting for the PTR
    d.clock.advance(60)
    assert d.transport.value().startswith(b"action=451 ")
    assert d.value("dns_queries_total", type="PTR", outcome="error") == 1
    d.clock.advance(60)
    assert d.value("dns_queries_total", type="PTR", outcome="error") == 1


def test_dns_failures_are_told_apart():
    """A response, SERVFAIL, timeouts, oversized replies and other faults each get their own
    outcome."""
    fake = FakeDnsClient(RECORDS)
    assert dns_outcome(fake.response("example.net", 16)) == "answer"
    assert dns_outcome(fake.response("example.net", 28)) == "nodata"
    assert dns_outcome(fake.response("nowhere.example", 28)) == "nxdomain"
    assert dns_outcome(Failure(TransientDnsError("SERVFAIL from 192.0.2.53:53"))) == "servfail"
    assert dns_outcome(Failure(TransientDnsError("timeout from 192.0.2.53:53"))) == "timeout"
    assert dns_outcome(Failure(TransientDnsError("port unreachable from x"))) == "error"
    assert dns_outcome(Failure(ReplyTooLarge(70000, 8192))) == "too_large"
    assert dns_outcome(Failure(defer.CancelledError())) == "error"


def test_cache_lookups_count_hits_and_misses(tmp_path):
    """The second recipient of a message is a message-cache hit; its entries are counted."""
    d = Daemon(tmp_path)
    d.ask(recipient="bob@contoso.com")
    d.ask(recipient="carol@contoso.com")
    assert d.value("cache_lookups_total", cache="message", result="miss") == 1
    assert d.value("cache_lookups_total", cache="message", result="hit") == 1
    assert d.value("cache_lookups_total", cache="spf", result="miss") == 1
    assert d.value("cache_lookups_total", cache="dns", result="miss") >= 2
    assert d.value("cache_entries", cache="message") == 1
    assert d.value("cache_entries", cache="spf") == 1
    assert d.value("cache_entries", cache="dns") >= 2


def test_connections_and_refusals_are_counted(tmp_path):
    """An open policy connection is counted; one past max_connections is a refusal."""
    d = Daemon(tmp_path)
    assert d.value("connections", listener="policy") == 1
    assert d.value("connections", listener="milter") == 0
    d.service.factory.max_connections = 1
    d.proto.busy = True  # not idle: the newcomer is the one closed
    late = d.service.factory.buildProtocol(None)
    late.makeConnection(StringTransport())
    assert d.value("connections_refused_total", listener="policy") == 1
    assert d.value("connections_refused_total", listener="milter") == 0


def test_the_metrics_listeners_refusals_are_counted(tmp_path):
    """A connection the metrics listener closes past its fixed bound is counted under
    listener="metrics" (0 before it)."""
    d = Daemon(tmp_path)
    listener = metrics_factory(d.metrics, d.clock)
    assert d.value("connections_refused_total", listener="metrics") == 0
    for _ in range(MAX_CONNECTIONS):
        listener.buildProtocol(None).makeConnection(StringTransport())
    assert listener.buildProtocol(None) is None
    assert d.value("connections_refused_total", listener="metrics") == 1
    assert d.value("connections_refused_total", listener="policy") == 0


def test_the_metrics_listeners_open_connections_are_counted(tmp_path):
    """The connections gauge counts the metrics listener's open connections under
    listener="metrics" (0 before its factory exists), one fewer once one is closed."""
    d = Daemon(tmp_path)
    assert d.value("connections", listener="metrics") == 0
    listener = metrics_factory(d.metrics, d.clock)
    held = [listener.buildProtocol(None) for _ in range(3)]
    for protocol in held:
        protocol.makeConnection(StringTransport())
    assert d.value("connections", listener="metrics") == 3
    held[0].connectionLost(Failure(ConnectionDone()))
    assert d.value("connections", listener="metrics") == 2
    assert d.value("connections", listener="policy") == 1


def test_optin_table_loads_and_failures(tmp_path):
    """The opt-in gauges follow the table in force; a reload that fails is counted."""
    d = Daemon(tmp_path)
    assert d.value("optin_entries") == 1
    d.clock.advance(100)
    (tmp_path / "optin").write_text("contoso.com\nfabrikam.com\n")
    assert d.service.optin.reload("test")
    assert d.value("optin_entries") == 2
    assert d.value("optin_last_load_timestamp_seconds") == 100
    (tmp_path / "optin").write_text("not a domain!\n")
    assert not d.service.optin.reload("test")
    assert d.value("optin_load_failures_total") == 1
    assert d.value("optin_entries") == 2


def test_database_source_skipped_rows_and_last_good_copy_are_exported(tmp_path):
    """With the PostgreSQL source, its skipped rows and serving the last-good copy are gauges
    (a file source reports 0 for both)."""
    d = Daemon(tmp_path)
    assert d.value("optin_skipped_rows") == 0 and d.value("optin_from_last_good_copy") == 0

    class DatabaseSource:  # the attributes optin.postgresql.PostgresOptin keeps
        table = d.service.optin.table
        loaded_at, failures, skipped_rows, origin = None, 2, 3, "last-good copy"
    d.service.optin = DatabaseSource()
    assert d.value("optin_skipped_rows") == 3 and d.value("optin_from_last_good_copy") == 1
    DatabaseSource.origin = "database"
    assert d.value("optin_from_last_good_copy") == 0


def test_milter_verdicts_and_signatures_are_exported(tmp_path):
    """What the milter factory counted is exported by rule and by signature result."""
    d = Daemon(tmp_path)
    d.service.milter_factory.messages["dkim-pass"] += 2
    d.service.milter_factory.signatures["fail"] += 1
    assert d.value("milter_messages_total", rule="dkim-pass") == 2
    assert d.value("dkim_signatures_total", result="fail") == 1


def test_internal_errors_are_counted_from_the_log(tmp_path):
    """A daemon event with a traceback at error level counts; a plain error line does not."""
    d = Daemon(tmp_path)
    failure = Failure(ValueError("bug"))
    from twisted.logger import LogLevel
    d.metrics.observe_log({"log_namespace": "policyd-ipv6", "log_level": LogLevel.critical,
                           "log_failure": failure})
    d.metrics.observe_log({"log_namespace": "policyd-ipv6", "log_level": LogLevel.error})
    d.metrics.observe_log({"log_namespace": "other", "log_level": LogLevel.critical,
                           "log_failure": failure})
    assert d.value("internal_errors_total") == 1


def test_every_contract_metric_is_exported_with_exactly_its_labels(tmp_path):
    """After some work the text names each metric of the contract, with exactly its labels,
    and the library's process metrics."""
    d = Daemon(tmp_path)
    d.ask()
    d.service.milter_factory.messages["unsigned"] += 1
    d.service.milter_factory.signatures["pass"] += 1
    snapshot = d.metrics.snapshot()
    seen: dict[str, set[str]] = {}
    for family in snapshot.families:
        for sample in family.samples:
            if sample.name.startswith(P) and not sample.name.endswith("_created"):
                base = sample.name
                for suffix in ("_bucket", "_count", "_sum"):
                    if family.type == "histogram" and base.endswith(suffix):
                        base = base[:-len(suffix)]
                seen.setdefault(base, set()).update(set(sample.labels) - {"le"})
    assert seen == {P + name: labels for name, labels in LABELS.items()}
    assert set(NAMES) == set(seen)
    text = render(snapshot).decode()
    assert "process_resident_memory_bytes" in text or "python_info" in text


@pytest.mark.parametrize("name", sorted(LABELS))
def test_names_list_the_contract(name):
    """NAMES, which the README and the dashboard test use, holds each contract metric."""
    assert P + name in NAMES
