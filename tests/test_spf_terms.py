"""Properties of the SPF term helpers that the RFC test suites do not pin down on their own."""

import contextlib
import ipaddress
import time
from unittest import mock

import pytest
import spf
from hypothesis import given
from hypothesis import strategies as st

from policyd_ipv6.checks import spf_terms
from policyd_ipv6.checks.spf_eval import check_host
from policyd_ipv6.checks.spf_terms import (
    SpfPermError,
    check_domain_spec,
    cidr_match,
    expand,
    needs_p,
    parse_term,
)
from policyd_ipv6.resolver.lookups import Answer
from policyd_ipv6.vocabulary import DnsStatus

v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
# Addresses near the client as often as far from it, so that both outcomes come up.
near_v6 = st.tuples(v6, st.integers(0, 128), st.integers(0, 2**128 - 1)).map(
    lambda t: (t[0], ipaddress.IPv6Address(int(t[0]) ^ (t[2] >> t[1]))))


def reference(client, addresses, prefix):
    """cidr_match as it was written with ipaddress alone: the result, or the permerror text."""
    try:
        return any(client in ipaddress.ip_network(a).supernet(new_prefix=prefix)
                   for a in addresses)
    except ValueError as error:
        return f"permerror: {error}"


def outcome(client, addresses, prefix):
    try:
        return cidr_match(client, addresses, prefix)
    except SpfPermError as error:
        return f"permerror: {error}"


@given(near_v6, st.integers(0, 128), v4)
def test_cidr_match_agrees_with_ipaddress_for_ipv6(pair, prefix, other):
    """IPv6 client: the inet_pton path gives ipaddress's answer, other families included."""
    client, address = pair
    for addresses in ([str(address)], [str(other), str(address)], [address.exploded]):
        assert outcome(client, addresses, prefix) == reference(client, addresses, prefix)


@given(v4, v4, st.integers(0, 32))
def test_cidr_match_agrees_with_ipaddress_for_ipv4(client, address, prefix):
    """IPv4 client: the inet_pton path gives ipaddress's answer."""
    assert outcome(client, [str(address)], prefix) == reference(client, [str(address)], prefix)
    assert cidr_match(client, [str(client)], prefix)


@pytest.mark.parametrize("junk", ["not-an-address", "1.2.3.4.5", "2001:db8::1::2"])
def test_cidr_match_text_no_address_reads_is_permerror(junk):
    """What neither reader takes is a permerror, as before."""
    with pytest.raises(SpfPermError):
        cidr_match(ipaddress.ip_address("2001:db8::1"), [junk], 64)


def evaluate(ip, record):
    """(verdict, questions asked) of one evaluation; only the sender's TXT exists."""
    steps = check_host(ip, "a@example.net", "mx.example.net")
    asked = [next(steps)]
    try:
        while True:
            if asked[-1] == ("example.net", "TXT"):
                asked.append(steps.send(Answer(DnsStatus.OK, ((record.encode(),),), 60)))
            else:
                asked.append(steps.send(Answer(DnsStatus.NXDOMAIN, (), 60)))
    except StopIteration as stop:
        return stop.value, asked


@pytest.mark.parametrize("record, result", [
    ("v=spf1 ip6:2001:db8::/64 -all", "pass"),
    ("v=spf1 exists:%{ir}.%{v}._spf.%{d} -all", "fail"),
    ("v=spf1 ip4:192.0.2.0/24 -all", "fail"),
])
def test_check_host_takes_the_address_as_text_or_parsed(record, result):
    """An ipaddress object and its text give the same verdict (macros included)."""
    text = evaluate("2001:db8::25", record)
    parsed = evaluate(ipaddress.ip_address("2001:db8::25"), record)
    assert text == parsed and text[0].result == result
    if "%{ir}" in record:  # the i macro: the address's 32 nibbles, reversed
        assert ("5.2.0.0" + ".0" * 20 + ".8.b.d.0.1.0.0.2.ip6._spf.example.net", "A") in text[1]


# The grammar against pyspf's own expressions (spf.RE_TOPLAB, spf.RE_CHAR, spf.expand_one),
# on texts made of the pieces that matter to them.
spec_texts = st.lists(st.sampled_from(
    ["a", "Z", "0", "9", "-", ".", "_", "%", "{", "}", "p", "\n", ".com", "%{d}", "%{p2}",
     "%%", "%_", "%-"]), max_size=12).map("".join)


def permerror_or_none(call, *args):
    try:
        return call(*args)
    except SpfPermError as error:
        return f"permerror: {error}"


@given(spec_texts)
def test_check_domain_spec_accepts_what_pyspfs_expression_accepts(spec):
    """A domain-spec passes exactly when pyspf's search finds a top label or a macro at its
    end, though the last label alone is matched."""
    assert (permerror_or_none(check_domain_spec, spec) is None) == \
        (spf.RE_TOPLAB.split(spec)[-1] == "")


@given(spec_texts)
def test_macros_are_found_where_pyspfs_expression_finds_them(text):
    """The one-pass macro scan finds the spans pyspf's expression finds, so needs_p too."""
    assert list(spf_terms._macros(text)) == [m.span() for m in spf.RE_CHAR.finditer(text)]
    assert needs_p(text) == any(m.group(0)[2:3].lower() == "p"
                                for m in spf.RE_CHAR.finditer(text))


@given(st.text(st.sampled_from("ab1.-+,/_=^]\\%{ "), max_size=30),
       st.sampled_from(["", "0", "1", "2", "3", "007", "12"]), st.sampled_from(["", "r"]),
       st.text(st.sampled_from(".-+,/_=^]\\%{ "), max_size=3), st.sampled_from(["", "x2"]),
       st.sampled_from([None, "."]))
def test_transformers_give_pyspfs_expansion(value, digits, reverse, delimiters, tail, joiner):
    """Digits, reversal and delimiters (any characters, those special in a regular
    expression's class included) split and join a value as pyspf's expand_one does."""
    spec = digits + reverse + delimiters + tail
    assert spf_terms._transform(value, spec, joiner) == spf.expand_one(value, spec, joiner)


def one_label_at_a_time(name):
    """The cut of RFC 7208 §7.3 as written before: drop a left-hand label while too long."""
    name = name[:-1] if name.endswith(".") else name
    while len(name) > 253 and "." in name:
        name = name[name.index(".") + 1:]
    return name


@given(st.lists(st.integers(0, 300), max_size=12).map(lambda ls: ".".join("a" * n for n in ls)))
def test_a_long_name_keeps_the_labels_a_label_by_label_cut_keeps(name):
    """The cut found in one pass keeps what dropping one left-hand label at a time keeps,
    trailing dot, empty labels and a last label over 253 octets included."""
    assert expand(name, {}) == one_label_at_a_time(name)


macro_texts = st.lists(st.sampled_from(
    ["%{s}", "%{d}", "%{s1r}", "%{dr-}", "%{S}", "%{l-}", ".", "x", "%%", "%-", "%_", "%{c}"]),
    max_size=20).map("".join)
long_values = st.lists(st.integers(0, 120), min_size=1, max_size=5).map(
    lambda ls: ".".join("b-" * n for n in ls))


@given(macro_texts, long_values, long_values, st.booleans())
def test_dropping_left_hand_labels_early_changes_no_expansion(text, s, d, in_exp):
    """Expanding with the labels bound to go dropped after every macro gives the same name
    (or error) as dropping them only at the end."""
    values = {"s": s, "l": s, "d": d}
    with mock.patch.object(spf_terms, "_TRIM_AT", 0):
        early = permerror_or_none(expand, text, values, in_exp)
    assert early == permerror_or_none(expand, text, values, in_exp)


@pytest.mark.parametrize("term, error", [
    ("ip6:2001:db8::/" + "1" * 5000, "Invalid IP6 CIDR length"),
    ("ip4:192.0.2.0/" + "1" * 5000, "Invalid IP4 CIDR length"),
    ("a//" + "1" * 5000, "Invalid IP6 CIDR length"),
    ("mx/" + "1" * 5000 + "//64", "Invalid IP4 CIDR length"),
    ("a/1000", "Invalid IP4 CIDR length"),
])
def test_cidr_lengths_past_ints_digit_limit_are_permerror(term, error):
    """A CIDR length of thousands of digits (more than int() reads) is a permerror like any
    length over the limit, not a ValueError."""
    with pytest.raises(SpfPermError, match=error):
        parse_term(term, "example.net", True)


def test_a_digit_count_past_ints_digit_limit_takes_all_parts():
    """A macro's count of thousands of digits (leading zeros included) counts parts as a short
    one does: more than there are takes them all (RFC 7208 §7.3), not a ValueError."""
    values = {"d": "mail.example.net"}
    assert expand("%{d" + "9" * 5000 + "}.x.example", values) == "mail.example.net.x.example"
    assert expand("%{d" + "0" * 5000 + "2r}", values) == "example.mail"


def test_a_digit_count_past_ints_digit_limit_is_no_error_for_check_host():
    """An exists: with such a count is looked up and fails to match, as any count over the
    labels would (it was an internal error, answered temperror)."""
    verdict, asked = evaluate("2001:db8::25",
                              "v=spf1 exists:%{d" + "9" * 5000 + "}.x.example -all")
    assert verdict.result == "fail" and ("example.net.x.example", "A") in asked


@pytest.mark.parametrize("call", [
    # one 32 KB label that is not a top label: pyspf's expression, 16 s
    lambda: check_domain_spec("x." + "a" * 32_000 + "_"),
    # 8,000 macros expanding to 1 MB of 2-octet labels: cutting one at a time, 26 s
    lambda: expand("%{d}" * 8000 + ".x.example", {"d": "a." * 126 + "a"}),
    # 150 KB of "%{" with no "}" after them: the macro expression, 10 s
    lambda: expand("exists:" + "%{" * 75_000, {}),
])
def test_hostile_domain_specs_take_linear_time(call):
    """Shapes that took quadratic time (10 s and more on these sizes) are done within 1 s of
    CPU; they need a few milliseconds."""
    start = time.process_time()
    with contextlib.suppress(SpfPermError):
        call()
    assert time.process_time() - start < 1
