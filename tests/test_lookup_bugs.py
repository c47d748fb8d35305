"""A bug below the checks (not a DNS fault) gives a temporary failure and is logged at error
level with its traceback, never passed off silently as a DNS temperror."""

from fakes import FakeDnsClient
from twisted.internet import task
from twisted.logger import LogLevel, globalLogPublisher

from policyd_ipv6.resolver import lookups
from policyd_ipv6.resolver.client import TransientDnsError
from policyd_ipv6.resolver.lookups import Lookups


class Client:
    """A client whose query fails with the given exception."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def ask(self, wire_name, rdtype, deliver, max_size):
        deliver(self.error)


def lookup_logged(client, name="x.test", rrtype="TXT"):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        results = []
        Lookups(client, task.Clock()).lookup(name, rrtype).addCallback(results.append)
    finally:
        globalLogPublisher.removeObserver(events.append)
    return results[0], [e for e in events if e.get("log_namespace") == "policyd-ipv6"]


def test_unexpected_exception_is_logged_with_traceback_and_answers_tempfail():
    """An exception that is not a DNS fault gives tempfail and one error event with the failure."""
    answer, events = lookup_logged(Client(AttributeError("'GenericRdata' has no 'strings'")))
    assert answer.status == "tempfail"
    assert [e["log_level"] for e in events] == [LogLevel.error]
    assert events[0]["log_failure"].check(AttributeError)
    assert "x.test" in events[0]["log_format"].format(**events[0])


def test_bug_in_interpretation_is_logged(monkeypatch):
    """An answer whose interpretation raises (as an unloadable record type did) is logged."""

    def broken(rrset, rrtype):
        raise AttributeError("'GenericRdata' object has no attribute 'strings'")

    monkeypatch.setattr(lookups, "_values", broken)
    answer, events = lookup_logged(FakeDnsClient().add("x.test", "TXT", '"v=spf1 -all"'))
    assert answer.status == "tempfail"
    assert len(events) == 1 and events[0]["log_failure"].check(AttributeError)


def test_dns_fault_stays_quiet():
    """A transient DNS fault is data (tempfail with its detail), not a logged error."""
    answer, events = lookup_logged(Client(TransientDnsError("timeout")))
    assert answer.status == "tempfail" and answer.detail == "timeout"
    assert events == []
