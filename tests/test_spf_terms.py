"""Properties of the SPF term helpers that the RFC test suites do not pin down on their own."""

import ipaddress
import re
from unittest import mock
from urllib.parse import quote

import pytest
import spf
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd_ipv6.checks import spf_macros
from policyd_ipv6.checks.spf_eval import check_host
from policyd_ipv6.checks.spf_macros import check_domain_spec, expand, needs_p
from policyd_ipv6.checks.spf_terms import SpfPermError, cidr_match, parse_term
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


# Text near IPv6 addresses: their pieces, joined with colons, dots and junk.
_IP6_PIECES = ["::", ":", "1", "0", "ffff", "FFFF", "00000", "12345", "abcd", "g", " ", "%eth0",
               "1.2.3.4", "01.2.3.4", "256.1.1.1", "1.2.3", "1.2.3.4.5", ".", "1:2:3:4:5:6:7:8",
               "::1.2.3.4", "\u0661", "\x00"]
ip6_texts = st.lists(st.sampled_from(_IP6_PIECES), max_size=10).map("".join)


def ipaddress_takes(text):
    """What the ip6: term took when it was read with ipaddress (scope ids refused)."""
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return "%" not in text and bool(text)


@settings(max_examples=3000)
@given(st.one_of(ip6_texts, v6.map(str), v6.map(lambda a: a.exploded),
                 st.text(max_size=12).filter(lambda t: "/" not in t)))
def test_ip6_term_takes_what_ipaddress_takes(text):
    """ip6: reads its address with inet_pton, which takes exactly the texts ipaddress did."""
    try:
        parse_term(f"ip6:{text}", "example.net", True)
        taken = True
    except SpfPermError:
        taken = False
    assert taken == ipaddress_takes(text), text


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
    assert list(spf_macros._macros(text)) == [m.span() for m in spf.RE_CHAR.finditer(text)]
    assert needs_p(text) == any(m.group(0)[2:3].lower() == "p"
                                for m in spf.RE_CHAR.finditer(text))


@given(st.text(st.sampled_from("ab1.-+,/_=^]\\%{ "), max_size=30),
       st.sampled_from(["", "01", "1", "2", "3", "007", "12"]), st.sampled_from(["", "r"]),
       st.text(st.sampled_from(".-+,/_=^]\\%{ "), max_size=3), st.sampled_from(["", "x2"]),
       st.sampled_from([None, "."]))
def test_transformers_give_pyspfs_expansion(value, digits, reverse, delimiters, tail, joiner):
    """Digits, reversal and delimiters (any characters, those special in a regular
    expression's class included) split and join a value as pyspf's expand_one does."""
    spec = digits + reverse + delimiters + tail
    assert spf_macros._transform(value, spec, joiner) == spf.expand_one(value, spec, joiner)


def one_label_at_a_time(name):
    """The cut of RFC 7208 §7.3 as written before: drop a left-hand label while too long."""
    name = name[:-1] if name.endswith(".") else name
    while len(name) > 253 and "." in name:
        name = name[name.index(".") + 1:]
    return name


def label_cut(name):
    """A name still over 253 octets after the cut (one label, never looked up) as ``expand``
    gives it: its last 254 octets."""
    return name[-254:]


@given(st.lists(st.integers(0, 300), max_size=12).map(lambda ls: ".".join("a" * n for n in ls)))
def test_a_long_name_keeps_the_labels_a_label_by_label_cut_keeps(name):
    """The cut found in one pass keeps what dropping one left-hand label at a time keeps,
    trailing dot, empty labels and a last label over 253 octets (its last 254) included."""
    assert expand(name, {}) == label_cut(one_label_at_a_time(name))


def expanded_then_cut(text, values):
    """A domain-spec expanded as pyspf's expand does, every macro from the left (expand_one,
    quote), then cut one left-hand label at a time; but a count of 0 is a permerror (RFC 7208
    §7.1), and a last label over 253 octets is given as its last 254."""
    if spf.RE_INVALID_MACRO.search(text):
        raise SpfPermError("invalid-macro-char ", text)
    out, end = [], 0
    for match in spf.RE_CHAR.finditer(text):
        macro = match.group()
        out.append(text[end:match.start()])
        end = match.end()
        if macro[1] != "{":
            out.append({"%": "%", "_": " ", "-": "%20"}[macro[1]])
            continue
        letter = macro[2].lower()
        if letter in "crt":
            raise SpfPermError("c,r,t macros allowed in exp= text only", macro)
        if letter not in values:
            raise SpfPermError("Unknown Macro Encountered", macro)
        digits = re.match("[0-9]*", macro[3:-1]).group()
        if digits and int(digits) == 0:
            raise SpfPermError("a macro's DIGIT must be nonzero", macro)
        value = values[letter]
        piece = spf.expand_one(value, macro[3:-1], spf.JOINERS.get(letter)) if value else ""
        out.append(quote(piece, "~") if letter != macro[2] else piece)
    out.append(text[end:])
    return label_cut(one_label_at_a_time("".join(out)))


# Macros with every kind of transformer (a count of 0, of 1, reversed, other delimiters, upper
# case), literals (long labels, dots, a final dot) and values of long or short labels, so that
# names pass 253 octets in all the ways the cut, the count and the reversal meet.
macros = st.builds("%{{{}{}{}{}}}".format, st.sampled_from("sldoSLDcx"),
                   st.sampled_from(["", "0", "1", "2", "3", "01", "12", "99999999999"]),
                   st.sampled_from(["", "r"]), st.text(st.sampled_from(".-+_"), max_size=2))
macro_texts = st.lists(st.one_of(
    macros, st.sampled_from([".", "x", "a.b", "%%", "%-", "%_", "%{", "}"]),
    st.integers(1, 300).map(lambda n: "y" * n)), max_size=20).map("".join)
long_values = st.lists(st.one_of(st.integers(0, 90).map(lambda n: "b" * n),
                                 st.sampled_from(list(".-+_"))), max_size=40).map("".join)


@settings(max_examples=1000)  # the boundaries are narrow: searched more than by default
@given(macro_texts, long_values, long_values)
def test_a_domain_spec_built_from_the_right_is_the_one_expanded_in_full(text, s, d):
    """Expanding a domain-spec from the right, only as far as the cut keeps, gives the name
    (or error) that expanding every macro and then cutting gives."""
    values = {"s": s, "l": s, "d": d, "o": d}
    assert permerror_or_none(expand, text, values) == \
        permerror_or_none(expanded_then_cut, text, values)


@given(long_values, st.sampled_from(["", "01", "1", "2", "001", "12", "99999999999"]),
       st.sampled_from(["", "r"]), st.text(st.sampled_from(".-+_"), max_size=2),
       st.sampled_from([None, "."]), st.integers(1, 400))
@settings(max_examples=1000)
def test_the_last_characters_of_a_transform_are_those_of_the_whole(value, digits, reverse,
                                                                   delimiters, joiner, keep):
    """Transforming for the last KEEP characters gives the last KEEP of the whole transform."""
    spec = digits + reverse + delimiters
    assert spf_macros._transform(value, spec, joiner, keep) == \
        spf_macros._transform(value, spec, joiner)[-keep:]


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


LONG_LOCAL = "a." * 999 + "a"  # a 2 KB local part of 1,000 labels


def record_of(macro, size=32_000):
    """A domain-spec of distinct macros (``macro(n)`` for n = 0, 1, ...) of ``size`` octets."""
    out, n = [], 0
    while sum(map(len, out)) + len(macro(n)) < size:
        out.append(macro(n))
        n += 1
    return "".join(out) + ".x.example"


@pytest.mark.parametrize("text, values", [
    # distinct reversed macros, each of 1,000 labels: all expanded, 0.3 s
    (record_of(lambda n: f"%{{l{n or ''}r}}"), {"l": LONG_LOCAL}),
    # the same macro 8,000 times over 1 MB of labels
    ("%{d}" * 8000 + ".x.example", {"d": "a." * 126 + "a"}),
    # distinct macros that leave nothing of the value: a count of 1 with a delimiter at the end
    # the parts are taken from
    (record_of(lambda n: f"%{{l1-{n}}}"), {"l": "a" * 2000 + "-"}),
    (record_of(lambda n: f"%{{l1r-{n}}}"), {"l": "-" + "a" * 2000}),
])
def test_a_32_kb_domain_spec_expands_a_few_macros(text, values):
    """Only the macros right of the cut are transformed, each for at most 255 characters: a
    few bounded transforms for a 32 KB record of thousands of macros over a 2 KB sender."""
    transform = spf_macros._transform
    with mock.patch.object(spf_macros, "_transform", wraps=transform) as counted:
        name = expand(text, values)
    assert len(name) <= 253 and name.endswith(".x.example")
    assert counted.call_count <= 4
    assert all(call.args[3] <= 255 for call in counted.call_args_list if len(call.args) > 3)


class RecordedPattern:
    """A compiled expression that records the length of each text it matches in full."""

    def __init__(self, pattern):
        self.pattern, self.lengths = pattern, []

    def fullmatch(self, text):
        self.lengths.append(len(text))
        return self.pattern.fullmatch(text)


def test_a_domain_specs_top_label_is_matched_once_anchored():
    """A 32 KB label that is not a top label is matched once, from its start (pyspf's
    expression, searched through the spec from every position, took 16 s)."""
    recorded = RecordedPattern(spf_macros._TOPLABEL)
    with mock.patch.object(spf_macros, "_TOPLABEL", recorded), \
            pytest.raises(SpfPermError, match="Invalid domain"):
        check_domain_spec("x." + "a" * 32_000 + "_")
    assert recorded.lengths == [32_001]


class ScannedText(str):
    """Text that counts the characters its ``find`` calls look through."""

    scanned = 0

    def find(self, sub, start=0, end=None):
        found = super().find(sub, start, end)
        ScannedText.scanned += (len(self) if found < 0 else found + len(sub)) - start
        return found


def test_unclosed_macros_are_scanned_once():
    """150 KB of "%{" without a "}" are looked through about twice, not once from each (the
    macro expression, searching again from each, took 10 s)."""
    text = ScannedText("exists:" + "%{" * 75_000)
    ScannedText.scanned = 0
    assert list(spf_macros._macros(text)) == []
    assert ScannedText.scanned <= 2 * len(text)


@given(st.one_of(st.text(st.sampled_from("ab1.-_"), max_size=300),
                 st.lists(st.integers(0, 70), max_size=8).map(
                     lambda ls: ".".join("a" * n for n in ls) + "."),
                 st.text(max_size=40).filter(lambda t: "%" not in t)))
def test_a_domain_spec_without_macros_expands_as_the_general_path_does(text):
    """The shortcut for a domain-spec without "%" (the final dot dropped, nothing else) gives
    what the macro expander gives it, cut included (a name over 253 octets takes that path)."""
    assert expand(text, {}) == spf_macros._expand_name(text, [], {})
