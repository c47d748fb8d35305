"""Tests of the DKIM check (policyd_ipv6.dkim_check): keys made by openssl, messages signed by
dkimpy, key records served by the DNS fake and by a real Knot server."""

import pytest
from dkimkeys import DkimKey, message, require_openssl, sign
from fakes import FakeDnsClient
from lab.knot import KnotServer, free_port, require_knot
from lab.zones import Zone, txt_rdata
from realtime import wait
from twisted.internet import defer, task

from policyd_ipv6.checks import dkim_verify
from policyd_ipv6.checks.dkim import MAX_LISTED, MAX_SIGNATURES, check_dkim
from policyd_ipv6.resolver.lookups import Lookups


@pytest.fixture(scope="module")
def key():
    require_openssl()
    return DkimKey.generate(1024)


@pytest.fixture(scope="module")
def other_key():
    require_openssl()
    return DkimKey.generate(1024)


def lookups_with(records=None, broken=()):
    clock = task.Clock()
    fake = FakeDnsClient(records or {}, broken=set(broken))
    return Lookups(fake, clock), fake


def published(key, selector="lab", domain="sender.test"):
    return {(f"{selector}._domainkey.{domain}", "TXT"): [txt_rdata(key.record())]}


def run(lookups, raw, **kwargs):
    result = []
    check_dkim(lookups, raw, **kwargs).addCallback(result.append)
    assert result, "check_dkim did not fire synchronously with an immediate DNS fake"
    return result[0]


def test_a_valid_signature_passes_with_its_domain_and_selector(key):
    """A message signed by dkimpy with a published key passes, naming d= and s=."""
    lookups, fake = lookups_with(published(key))
    fact = run(lookups, sign(message(), key, "sender.test", "lab"))
    assert (fact.result, fact.domain, fact.selector) == ("pass", "sender.test", "lab")
    assert fact.signatures[0].result == "pass" and len(fact.signatures[0].b_prefix) == 8
    assert fake.queries == [("lab._domainkey.sender.test", "TXT")]


def test_an_unsigned_message_is_none_and_costs_no_lookup(key):
    """No DKIM-Signature: result none, no DNS query."""
    lookups, fake = lookups_with(published(key))
    fact = run(lookups, message())
    assert fact.result == "none" and fact.signatures == () and fake.queries == []


def test_an_altered_body_fails_with_the_body_hash_reason(key):
    """A body changed after signing fails, and the reason says the body hash differs."""
    lookups, _ = lookups_with(published(key))
    raw = sign(message(body=b"Pay 10 EUR.\r\n"), key, "sender.test", "lab")
    fact = run(lookups, raw.replace(b"Pay 10 EUR.", b"Pay 99 EUR."))
    assert fact.result == "fail"
    assert fact.signatures[0].result == "fail" and "body hash" in fact.signatures[0].reason


def test_a_signature_made_with_another_key_fails(key, other_key):
    """A signature that does not match the published key fails."""
    lookups, _ = lookups_with(published(key))
    fact = run(lookups, sign(message(), other_key, "sender.test", "lab"))
    assert fact.result == "fail" and fact.signatures[0].result == "fail"


def test_a_missing_key_is_a_permanent_error(key):
    """A selector without a key record (NXDOMAIN) fails permanently, not temporarily."""
    lookups, _ = lookups_with({("sender.test", "TXT"): ['"v=spf1 -all"']})
    fact = run(lookups, sign(message(), key, "sender.test", "lab"))
    assert fact.result == "fail"
    assert fact.signatures[0].result == "permerror" and "no key" in fact.signatures[0].reason


def test_a_key_lookup_that_fails_temporarily_is_temperror(key):
    """SERVFAIL/timeout fetching the only key gives temperror: the sender must retry."""
    lookups, _ = lookups_with(broken=["lab._domainkey.sender.test"])
    fact = run(lookups, sign(message(), key, "sender.test", "lab"))
    assert fact.result == "temperror" and fact.signatures[0].result == "temperror"


def test_every_signature_is_tried_not_only_the_first(key, other_key):
    """A bad first signature does not hide a valid second one (and a temporary failure of
    one key does not matter when another signature verifies)."""
    records = {**published(key, "good", "list.test"), **published(other_key, "old", "sender.test")}
    lookups, _ = lookups_with(records, broken=["gone._domainkey.third.test"])
    raw = sign(message(), key, "list.test", "good")
    raw = sign(raw, key, "sender.test", "old")  # published key is other_key: fails
    raw = sign(raw, key, "third.test", "gone")  # key lookup fails temporarily
    fact = run(lookups, raw)
    assert [s.result for s in fact.signatures] == ["temperror", "fail", "pass"]
    assert (fact.result, fact.domain, fact.selector) == ("pass", "list.test", "good")


def test_a_malformed_signature_is_a_failure_not_a_crash(key):
    """A DKIM-Signature without the required tags is a failed signature; no exception."""
    lookups, fake = lookups_with(published(key))
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test\r\n" + message()
    fact = run(lookups, raw)
    assert fact.result == "fail" and fact.signatures[0].result == "permerror"
    assert fake.queries == []


def test_signatures_beyond_the_bound_cost_no_lookup(key):
    """At most MAX_SIGNATURES signatures are verified (keys fetched); the next ones up to
    MAX_LISTED are listed as policy, not verified; the rest are ignored."""
    lookups, fake = lookups_with({})
    raw = message()
    for n in range(MAX_LISTED + 5):
        raw = sign(raw, key, f"d{n}.test", "s")
    fact = run(lookups, raw)
    assert len(fact.signatures) == MAX_LISTED and len(fake.queries) == MAX_SIGNATURES
    skipped = fact.signatures[MAX_SIGNATURES:]
    assert {s.result for s in skipped} == {"policy"} and "not verified" in skipped[0].reason


def test_a_hostile_header_block_gives_a_fact(key):
    """Binary junk where headers belong gives a fact, never an exception."""
    lookups, _ = lookups_with({})
    fact = run(lookups, b"\x00\xff: \r\n\r\nDKIM-Signature: x\r\n")
    assert fact.result in ("none", "fail")


def test_a_pool_receives_large_work_and_small_work_stays_inline(key):
    """With a pool, verification over INLINE_WORK_BYTES goes to it; a small message does not."""
    lookups, _ = lookups_with(published(key))
    calls = []

    class Pool:
        def submit(self, request, data):
            calls.append(request["job"])
            head, body = data[:request["head_end"]], data[request["body_start"]:]
            jobs = [(i, n.encode("latin-1"), r.encode("latin-1")) for i, n, r in request["jobs"]]
            return defer.succeed([[i, str(res), why] for i, (res, why)
                                  in dkim_verify.verify_all(head, body, jobs).items()])

    assert run(lookups, sign(message(), key, "sender.test", "lab"), pool=Pool()).result == "pass"
    assert calls == []
    large = sign(message(body=b"x" * 76 * 1000 + b"\r\n"), key, "sender.test", "lab")
    assert run(lookups, large, pool=Pool()).result == "pass" and calls == ["verify"]


def test_dkimpy_never_does_its_own_dns(key, monkeypatch):
    """dkimpy only sees the prefetched record: its own resolver is never called."""
    import dkim

    def forbidden(*args, **kwargs):
        raise AssertionError("dkimpy tried its own DNS lookup")

    monkeypatch.setattr(dkim, "get_txt", forbidden)
    lookups, _ = lookups_with(published(key))
    assert run(lookups, sign(message(), key, "sender.test", "lab")).result == "pass"


# -- against a real Knot ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def knot_keys(key, other_key):
    require_knot()
    zone = Zone("sender.test")
    zone.add("lab._domainkey", "TXT", txt_rdata(key.record()))
    big = DkimKey.generate(2048)  # its record is over 255 bytes: several TXT strings
    zone.add("big._domainkey", "TXT", txt_rdata(big.record()))
    with KnotServer({"sender.test": zone.text()}, [("127.0.0.1", free_port())]) as server:
        yield server, big


@pytest.mark.knot
def test_against_knot_valid_altered_unknown_selector_long_key_and_pool(knot_keys, key):
    """Through the daemon's DNS client and a real Knot: a valid signature passes (also with a
    2048-bit key served as several TXT strings, and for a large message verified by a worker
    process), an altered body fails, an unknown selector is a permanent error."""
    from twisted.internet import reactor

    from policyd_ipv6.checks.dkim_pool import DkimPool
    from policyd_ipv6.resolver.client import DnsClient
    from policyd_ipv6.resolver.wire import Nameserver

    server, big = knot_keys
    lookups = Lookups(DnsClient(reactor, [Nameserver("127.0.0.1", server.listen[0][1])],
                                1.0, 1), reactor)
    signed = sign(message(), key, "sender.test", "lab")
    large = sign(message(body=(b"y" * 76 + b"\r\n") * 20000), key, "sender.test", "lab")
    pool = DkimPool(reactor, workers=1)
    pool.start()
    submitted = []
    submit = pool.submit
    pool.submit = lambda request, data: submitted.append(len(data)) or submit(request, data)
    try:
        facts = wait(defer.gatherResults([
            check_dkim(lookups, signed),
            check_dkim(lookups, signed.replace(b"Hello.", b"Hullo.")),
            check_dkim(lookups, sign(message(), key, "sender.test", "nosuch")),
            check_dkim(lookups, sign(message(), big, "sender.test", "big")),
            check_dkim(lookups, large, pool=pool),
        ]))
    finally:
        pool.stop()
    valid, altered, unknown, long_key, pooled = facts
    assert valid.result == "pass" and long_key.result == "pass"
    assert altered.result == "fail" and "body hash" in altered.signatures[0].reason
    assert unknown.result == "fail" and unknown.signatures[0].result == "permerror"
    assert pooled.result == "pass" and submitted and submitted[0] > 1_500_000


def test_a_bug_in_the_check_is_logged_and_temporary(monkeypatch):
    """An exception inside the DKIM check (a bug, not hostile input) gives temperror, so the
    message is deferred, and is logged at error level with its traceback."""
    from twisted.logger import globalLogPublisher

    from policyd_ipv6.checks import dkim as dkim_check

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(dkim_check, "_check", explode)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        fact = run(Lookups(FakeDnsClient(), task.Clock()), message("a@example.net"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert fact.result == "temperror" and "boom" in fact.reason
    (event,) = [e for e in events if "log_failure" in e]
    assert event["log_level"].name in ("error", "critical")
    assert "RuntimeError" in event["log_failure"].getTraceback()
