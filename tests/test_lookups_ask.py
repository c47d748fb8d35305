"""``Lookups.ask``, the lookups without a Deferred (the SPF and reverse DNS checks' way in).

A client played by hand: each query it is given waits until the test delivers its end (a
response, or the error it failed with), as ``resolver.client.DnsClient.ask`` does.
"""

from __future__ import annotations

import dns.rdatatype
import pytest
from fakes import FakeDnsClient
from twisted.internet import task
from twisted.logger import LogLevel, globalLogPublisher

from policyd_ipv6.resolver.client import TransientDnsError
from policyd_ipv6.resolver.lookups import Answer, Lookups
from policyd_ipv6.vocabulary import DnsStatus

pytestmark = pytest.mark.unit

RECORDS = FakeDnsClient({("a.example", "AAAA"): ["2001:db8::1"]})


class HandQuery:
    def __init__(self, rdtype: int, deliver) -> None:
        self.rdtype = rdtype
        self.deliver = deliver
        self.cancelled = False

    def answer(self, name: str = "a.example") -> None:
        self.deliver(RECORDS.response(name, self.rdtype))

    def cancel(self) -> None:
        self.cancelled = True
        self.deliver = None


class HandClient:
    def __init__(self, fail_at_once: bool = False) -> None:
        self.queries: list[HandQuery] = []
        self.fail_at_once = fail_at_once

    def ask(self, wire_name: bytes, rdtype: int, deliver, max_size: int) -> HandQuery:
        query = HandQuery(rdtype, deliver)
        self.queries.append(query)
        if self.fail_at_once:  # as DnsClient.ask does when no socket can be opened
            deliver(TransientDnsError("send failed (OSError) from 192.0.2.53:53"))
        return query


def make(**kwargs) -> tuple[Lookups, HandClient]:
    client = HandClient(**kwargs)
    return Lookups(client, task.Clock()), client


def test_a_cached_answer_is_given_at_once_and_deliver_is_never_called():
    lookups, client = make()
    first: list = []
    lookups.ask("a.example", "AAAA", first.append)
    client.queries[0].answer()
    later: list = []
    answer = lookups.ask("A.Example.", "AAAA", later.append)
    assert isinstance(answer, Answer) and answer.values == ("2001:db8::1",)
    assert len(client.queries) == 1 and later == [] and first == [answer]


def test_callers_of_one_name_share_one_query_and_each_gets_the_answer_once():
    lookups, client = make()
    seen: list = []
    lookups.ask("a.example", "AAAA", lambda a: seen.append(("one", a)))
    lookups.ask("a.example", "AAAA", lambda a: seen.append(("two", a)))
    [query] = client.queries
    query.answer()
    assert [who for who, _ in seen] == ["one", "two"] and seen[0][1] is seen[1][1]
    assert seen[0][1].status == DnsStatus.OK and lookups._inflight == {}


def test_a_withdrawn_caller_is_not_told_and_the_query_goes_on_for_the_others():
    lookups, client = make()
    seen: list = []
    mine = lookups.ask("a.example", "AAAA", lambda a: seen.append("withdrawn"))
    lookups.ask("a.example", "AAAA", lambda a: seen.append("kept"))
    mine.cancel()
    [query] = client.queries
    assert not query.cancelled
    query.answer()
    assert seen == ["kept"]


def test_the_last_caller_out_cancels_the_query_and_nothing_is_cached():
    lookups, client = make()
    seen: list = []
    waiters = [lookups.ask("a.example", "AAAA", seen.append) for _ in range(2)]
    for waiter in waiters:
        waiter.cancel()
    [query] = client.queries
    assert query.cancelled and lookups._inflight == {} and seen == []
    lookups.ask("a.example", "AAAA", seen.append)  # asked again: a new query
    assert len(client.queries) == 2 and lookups.cached("a.example", "AAAA") is None


def test_a_caller_whose_deliver_fails_does_not_keep_the_answer_from_the_others():
    lookups, client = make()
    seen: list = []
    events: list = []

    def broken(_answer):
        raise ZeroDivisionError("a bug in one caller")

    lookups.ask("a.example", "AAAA", broken)
    lookups.ask("a.example", "AAAA", seen.append)
    globalLogPublisher.addObserver(events.append)
    try:
        client.queries[0].answer()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [a.status for a in seen] == [DnsStatus.OK]
    [error] = [e for e in events if e.get("log_namespace") == "policyd-ipv6"]
    assert error["log_level"] == LogLevel.critical and error["log_failure"].check(
        ZeroDivisionError)


def test_a_query_that_fails_inside_ask_is_answered_at_once():
    """The client delivers before ``ask`` returns: the caller gets the tempfail Answer, not a
    waiter, and no flight is left behind."""
    lookups, client = make(fail_at_once=True)
    seen: list = []
    answer = lookups.ask("a.example", "AAAA", seen.append)
    assert isinstance(answer, Answer) and answer.status == DnsStatus.TEMPFAIL
    assert "send failed" in answer.detail and seen == [] and lookups._inflight == {}


def test_a_name_dns_cannot_carry_is_nodata_at_once_without_a_query():
    lookups, client = make()
    answer = lookups.ask("x" * 64 + ".example", "AAAA", lambda a: None)
    assert isinstance(answer, Answer) and answer.status == DnsStatus.NODATA
    assert client.queries == []


def test_lookup_is_ask_with_a_deferred_and_cancelling_it_withdraws():
    lookups, client = make()
    d = lookups.lookup("a.example", "AAAA")
    d.addErrback(lambda _failure: None)  # the CancelledError, expected
    d.cancel()
    assert client.queries[0].cancelled and lookups._inflight == {}
    seen: list = []
    lookups.lookup("a.example", "AAAA").addCallback(seen.append)
    client.queries[1].answer()
    assert [a.values for a in seen] == [("2001:db8::1",)]
    assert client.queries[1].rdtype == dns.rdatatype.AAAA
