"""Tests of the SPF check driver (policyd_ipv6.checks.spf) against the DNS fake."""

import ipaddress

import pytest
from fakes import FakeDnsClient
from twisted.internet import task

from policyd_ipv6.checks.spf import check_spf
from policyd_ipv6.resolver.lookups import Lookups

IP = ipaddress.ip_address("2001:db8::25")


def run(fake, sender="alice@example.net", helo="mx.example.net", ip=IP):
    lookups = Lookups(fake, task.Clock())
    results = []
    check_spf(lookups, ip, sender, helo).addCallback(results.append)
    assert len(results) == 1, "the fake answers synchronously, so the check must be done"
    return results[0], lookups


@pytest.mark.parametrize("record, expected", [
    ("v=spf1 ip6:2001:db8::/64 -all", "pass"),
    ("v=spf1 ip6:2001:db8:1::/64 -all", "fail"),
    ("v=spf1 ip6:2001:db8:1::/64 ~all", "softfail"),
    ("v=spf1 ?all", "neutral"),
    ("v=spf1 ip6:2001:db8::/64 ip4:192.0.2.0/24 bogus:x -all", "permerror"),
    ("v=spf1 redirect=", "permerror"),
])
def test_results_for_records(record, expected):
    """pyspf's result for the sender domain's record comes through unchanged."""
    fact, _ = run(FakeDnsClient({("example.net", "TXT"): [f'"{record}"']}))
    assert fact.result == expected
    assert fact.identity == "alice@example.net"


def test_sender_in_postfixs_internal_form_is_checked_at_its_domain():
    """A sender Postfix passes unquoted (MAIL FROM:<"\\"a\\\\"@example.net> arrives as
    "a\\@example.net) is checked against example.net's record, not taken as domainless."""
    fact, _ = run(FakeDnsClient({("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"']}),
                  sender='"a\\@example.net')
    assert fact.result == "pass" and fact.identity == '"a\\@example.net'


def test_a_long_explanation_is_cut_before_the_fact_keeps_it():
    """An exp= text that expands long (here 2,000 characters; macros can make megabytes) is
    kept to MAX_EXPLANATION characters: SPF facts are cached, and a bound in entries alone
    would not bound their memory."""
    from policyd_ipv6.checks.spf import MAX_EXPLANATION

    long_text = " ".join(f'"{"x" * 199}"' for _ in range(10))  # 10 strings, joined: 1,990
    fact, _ = run(FakeDnsClient({
        ("example.net", "TXT"): ['"v=spf1 -all exp=why.example.net"'],
        ("why.example.net", "TXT"): [long_text],
    }))
    assert fact.result == "fail"
    assert len(fact.explanation) == MAX_EXPLANATION and fact.explanation.endswith("...")
    assert fact.explanation.startswith("x" * 100)


def test_no_record_is_none():
    """A domain without an SPF record gives none."""
    fact, _ = run(FakeDnsClient({("example.net", "A"): ["192.0.2.1"]}))
    assert fact.result == "none"


def test_include_and_mx_are_followed():
    """include: and mx mechanisms are resolved through several asynchronous lookups."""
    fake = FakeDnsClient({
        ("example.net", "TXT"): ['"v=spf1 include:_spf.example.org -all"'],
        ("_spf.example.org", "TXT"): ['"v=spf1 mx -all"'],
        ("_spf.example.org", "MX"): ["10 mx1.example.org.", "20 mx2.example.org."],
        ("mx1.example.org", "AAAA"): ["2001:db8:1::1"],
        ("mx2.example.org", "AAAA"): ["2001:db8::25"],
    })
    fact, lookups = run(fake)
    assert fact.result == "pass"
    assert ("mx2.example.org", "AAAA") in fake.queries
    assert len(fake.queries) == len(set(fake.queries))  # each name asked once


def test_null_sender_uses_helo_identity():
    """For MAIL FROM:<> the identity is postmaster@HELO (RFC 7208 §2.4)."""
    fake = FakeDnsClient({("mx.example.net", "TXT"): ['"v=spf1 ip6:2001:db8::25 -all"']})
    fact, _ = run(fake, sender="")
    assert (fact.result, fact.identity) == ("pass", "postmaster@mx.example.net")


@pytest.mark.parametrize("helo", ["[IPv6:2001:db8::25]", "localhost", "", "192.0.2.1"])
def test_null_sender_with_non_domain_helo_is_none(helo):
    """A null sender whose HELO is not a domain name gives none, with no lookup at all."""
    fake = FakeDnsClient()
    fact, _ = run(fake, sender="", helo=helo)
    assert fact.result == "none"
    assert fake.queries == []


def test_temporary_dns_failure_is_temperror():
    """A transient DNS fault on the record lookup gives temperror."""
    fact, _ = run(FakeDnsClient(broken={"example.net"}))
    assert fact.result == "temperror"


def test_void_lookup_limit_is_permerror():
    """More than two void lookups is a permerror (RFC 7208 §4.6.4)."""
    fake = FakeDnsClient({("example.net", "TXT"):
                          ['"v=spf1 a:n1.example.net a:n2.example.net a:n3.example.net -all"']})
    fact, _ = run(fake)
    assert fact.result == "permerror"
    assert "Void lookup" in fact.explanation


def test_more_than_ten_dns_mechanisms_is_permerror():
    """The 10-lookup limit of RFC 7208 §4.6.4 stays in force."""
    terms = " ".join(f"a:h{i}.example.net" for i in range(11))
    records = {("example.net", "TXT"): [f'"v=spf1 {terms} -all"']}
    records.update({(f"h{i}.example.net", "AAAA"): ["2001:db8:9::1"] for i in range(11)})
    fact, _ = run(FakeDnsClient(records))
    assert fact.result == "permerror"


def test_include_loop_is_permerror():
    """An include loop ends in permerror, not a hang."""
    fake = FakeDnsClient({("example.net", "TXT"): ['"v=spf1 include:example.net -all"']})
    fact, _ = run(fake)
    assert fact.result == "permerror"


@pytest.mark.parametrize("sender", [
    "alice@" + "a" * 64 + ".example",
    "alice@" + ".".join(["a" * 60] * 5),
    "alice@[192.0.2.1]",
    "alice@exa mple.net",
    "noatsign",
])
def test_unusable_sender_domain_is_none(sender):
    """A sender domain that is not a domain name gives none (RFC 7208 §4.3), never an exception."""
    fact, _ = run(FakeDnsClient(), sender=sender)
    assert fact.result == "none"


def test_exception_inside_the_evaluator_becomes_temperror(monkeypatch):
    """A bug inside the evaluator gives temperror (the temporary reply: the fault is ours),
    never an escaping exception."""
    from policyd_ipv6.checks import spf_eval

    def explode(self, *args, **kwargs):
        raise RuntimeError("boom")
        yield  # a generator, as the real one

    monkeypatch.setattr(spf_eval._Evaluation, "record", explode)
    fact, _ = run(FakeDnsClient({("example.net", "TXT"): ['"v=spf1 -all"']}))
    assert fact.result == "temperror" and fact.explanation == "internal error"


def test_evaluation_waits_for_asynchronous_answers():
    """With delayed answers the check completes only after the lookups arrive."""
    clock = task.Clock()
    fake = FakeDnsClient({("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"']},
                         clock=clock, delay=0.5)
    results = []
    check_spf(Lookups(fake, clock), IP, "alice@example.net", "mx.example.net").addCallback(
        results.append)
    assert results == []
    clock.advance(0.5)
    assert [r.result for r in results] == ["pass"]


def test_results_are_reused_per_domain_unless_macros_are_used():
    """A macro-free result serves every local part of the domain; a macro result only its own."""
    from twisted.internet import task as _task

    from policyd_ipv6.checks.spf import SpfResults

    fake = FakeDnsClient({("example.net", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"'],
                          ("macro.example", "TXT"): ['"v=spf1 exists:%{l}.x.macro.example -all"']})
    clock = _task.Clock()
    results = SpfResults(100, clock)
    fact, _ = run(fake, sender="alice@example.net")
    results.put(IP, "alice@example.net", "mx.example.net", fact)
    reused = results.get(IP, "bob@example.net", "other.example.net")
    assert reused.result == "pass" and reused.identity == "bob@example.net"
    assert results.get(ipaddress.ip_address("2001:db8::26"), "bob@example.net", "h.example") is None

    macro, _ = run(fake, sender="alice@macro.example")
    assert macro.macros
    results.put(IP, "alice@macro.example", "mx.example.net", macro)
    assert results.get(IP, "bob@macro.example", "mx.example.net") is None
    assert results.get(IP, "alice@macro.example", "mx.example.net") is not None
    clock.advance(301)  # the fake's TTL is 300 s
    assert results.get(IP, "alice@example.net", "mx.example.net") is None


def test_a_result_serves_the_domain_in_u_labels_and_a_labels_alike():
    """bücher.example and xn--bcher-kva.example are one domain (RFC 7208 §4.3: evaluated at
    its A-labels), so one macro-free result serves senders written either way."""
    from twisted.internet import task as _task

    from policyd_ipv6.checks.spf import SpfResults

    fake = FakeDnsClient({("xn--bcher-kva.example", "TXT"): ['"v=spf1 ip6:2001:db8::/64 -all"']})
    results = SpfResults(100, _task.Clock())
    fact, _ = run(fake, sender="alice@bücher.example")
    assert fact.result == "pass"
    results.put(IP, "alice@bücher.example", "mx.example.net", fact)
    reused = results.get(IP, "bob@xn--bcher-kva.example", "mx.example.net")
    assert reused.result == "pass" and reused.identity == "bob@xn--bcher-kva.example"
    assert results.get(IP, "carol@BÜCHER.example.", "mx.example.net").result == "pass"


def test_names_a_record_needs_are_fetched_at_once():
    """include/a/mx names of a record are asked for together, before pyspf reaches them."""
    clock = task.Clock()
    fake = FakeDnsClient({
        ("example.net", "TXT"): ['"v=spf1 include:one.example a:host.example mx -all"'],
        ("one.example", "TXT"): ['"v=spf1 ip6:2001:db8:9::/64 -all"'],
        ("host.example", "AAAA"): ["2001:db8::25"],
        ("example.net", "MX"): ["10 mx.example.net."],
    }, clock=clock, delay=0.02)
    results = []
    check_spf(Lookups(fake, clock), IP, "alice@example.net", "mx.example.net").addCallback(
        results.append)
    clock.advance(0.02)   # the record arrives; its names are asked for at once
    assert {("one.example", "TXT"), ("host.example", "AAAA"), ("example.net", "MX")} <= set(
        fake.queries)
    clock.advance(0.02)
    clock.advance(0.02)
    assert [r.result for r in results] == ["pass"]   # two round trips after the record


@pytest.mark.parametrize("ip, family", [
    (IP, "AAAA"),
    (ipaddress.ip_address("192.0.2.25"), "A"),
    (ipaddress.ip_address("::ffff:192.0.2.25"), "A"),  # IPv4 to SPF (RFC 7208 §5)
    ("2001:db8::25", "AAAA"),  # text is parsed once
])
def test_prefetched_addresses_are_of_the_clients_family(ip, family):
    """The a and MX-exchange names are prefetched with the type the client's family needs,
    taken from the address object the check is given."""
    clock = task.Clock()
    fake = FakeDnsClient({
        ("example.net", "TXT"): ['"v=spf1 a:host.example mx -all"'],
        ("example.net", "MX"): ["10 mx.example.net."],
    }, clock=clock, delay=0.02)
    check_spf(Lookups(fake, clock), ip, "alice@example.net", "mx.example.net")
    clock.advance(0.02)  # the record: its names are asked for
    clock.advance(0.02)  # the MX: its exchange is asked for
    assert ("host.example", family) in fake.queries
    assert ("mx.example.net", family) in fake.queries
    other = "A" if family == "AAAA" else "AAAA"
    assert not any(rrtype == other for _name, rrtype in fake.queries)


def test_macro_names_are_not_prefetched():
    """A name with a macro depends on the evaluation: it is left to pyspf."""
    from policyd_ipv6.checks.spf import _named_lookups

    names = list(_named_lookups("v=spf1 include:%{d}.x.example exists:%{i}.y.example "
                                "a mx/24 redirect=r.example", "d.example", "AAAA"))
    assert names == [("d.example", "AAAA"), ("d.example", "MX"), ("r.example", "TXT")]


def test_work_is_linear_in_the_lookups(monkeypatch):
    """A record of 10 mx of 10 exchanges each answers every question once: no replays."""
    from policyd_ipv6.checks import spf_eval

    mx = " ".join(f"mx:m{i}.example.net" for i in range(10))
    records = {("example.net", "TXT"): [f'"v=spf1 {mx} -all"']}
    for i in range(10):
        records[(f"m{i}.example.net", "MX")] = [f"{j} x{i}-{j}.example.net." for j in range(10)]
        records.update({(f"x{i}-{j}.example.net", "AAAA"): ["2001:db8:9::1"]
                        for j in range(10)})
    asked = []
    original = spf_eval._Evaluation.dns

    def counting(self, name, rrtype, count_void=True):
        asked.append((name, rrtype))
        return (yield from original(self, name, rrtype, count_void))

    monkeypatch.setattr(spf_eval._Evaluation, "dns", counting)
    fact, _ = run(FakeDnsClient(records))
    assert fact.result == "fail"
    assert len(asked) == 1 + 10 + 100 == len(set(asked))


def test_void_limit_is_configurable():
    """spf_void_limit raises RFC 7208's two void lookups; one past it is still permerror."""
    from policyd_ipv6.checks.spf import Limits

    fake = FakeDnsClient({("example.net", "TXT"):
                          ['"v=spf1 a:n1.example.net a:n2.example.net a:n3.example.net -all"']})
    lookups = Lookups(fake, task.Clock())
    results = []
    check_spf(lookups, IP, "alice@example.net", "mx.example.net",
              Limits(void_lookups=3)).addCallback(results.append)
    assert results[0].result == "fail"
    check_spf(lookups, IP, "alice@example.net", "mx.example.net",
              Limits(void_lookups=2)).addCallback(results.append)
    assert results[1].result == "permerror"


def test_txt_bytes_past_the_cap_are_permerror():
    """TXT answers over the per-evaluation byte cap end the evaluation with permerror."""
    big = " ".join(['"' + "x" * 250 + '"'] * 40)  # 10,000 bytes in one TXT record
    includes = " ".join(f"include:i{i}.example.net" for i in range(4))
    records = {("example.net", "TXT"): [f'"v=spf1 {includes} -all"']}
    records.update({(f"i{i}.example.net", "TXT"): ['"v=spf1 ?all"', big] for i in range(4)})
    fact, _ = run(FakeDnsClient(records))
    assert fact.result == "permerror" and "TXT records over 32768 bytes" in fact.explanation


def test_macro_split_across_strings_is_detected():
    """A macro whose % and { sit in different TXT strings still marks the result per sender."""
    fake = FakeDnsClient({("example.net", "TXT"):
                          ['"v=spf1 exists:%" "{l}.x.example.net -all"']})
    fact, _ = run(fake)
    assert fact.result == "fail" and fact.macros


def test_explanation_is_fetched_and_expanded():
    """exp= is looked up on fail and its macros expanded (RFC 7208 §6.2)."""
    fake = FakeDnsClient({("example.net", "TXT"): ['"v=spf1 -all exp=why.example.net"'],
                          ("why.example.net", "TXT"): ['"%{l} may not send from %{c}"']})
    fact, _ = run(fake)
    assert fact.result == "fail"
    assert fact.explanation == "alice may not send from 2001:db8::25"


def txt_strings(record):
    """A TXT record as the fake takes it: quoted strings of at most 250 characters."""
    return " ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))


LONG_SENDER = "a." * 490 + "a@example.net"  # 993 characters, 491 labels


@pytest.mark.parametrize("record, sender, expected", [
    ("v=spf1 a:x." + "a" * 32_000 + "_ -all", "alice@example.net", "permerror"),
    ("v=spf1 exists:" + "%{s}" * 8000 + ".x.example -all", LONG_SENDER, "fail"),
    ("v=spf1 exists:" + "%{" * 16_000 + " -all", "alice@example.net", "permerror"),
])
def test_records_built_for_quadratic_time_are_judged_at_the_txt_cap(record, sender, expected):
    """A 32 KB record of one long label, of 8,000 macros expanding to 8 MB of labels, or of
    16,000 unclosed macros is judged (each took seconds to hours of reactor CPU)."""
    assert len(record) < 32_768
    fact, _ = run(FakeDnsClient({("example.net", "TXT"): [txt_strings(record)]}), sender=sender)
    assert fact.result == expected


@pytest.mark.parametrize("term, expected", [
    ("exists:%{d" + "9" * 5000 + "}.x.example", "fail"),
    ("ip6:2001:db8::/" + "1" * 5000, "permerror"),
    ("a//" + "1" * 5000, "permerror"),
])
def test_numbers_past_ints_digit_limit_are_no_internal_error(term, expected):
    """A count or CIDR length of 5,000 digits gives the result any number past the limit
    gives, not temperror from a ValueError (logged as an internal error, never cached)."""
    record = f"v=spf1 {term} -all"
    fact, _ = run(FakeDnsClient({("example.net", "TXT"): [txt_strings(record)]}))
    assert fact.result == expected
