"""SPF macro expansion is bounded by what is kept: an explanation is built only as far as the
fact keeps it, a domain-spec whose last label is too long for DNS only as far as the cut
needs, and a count of 0 is a syntax error (RFC 7208 §7.1), never an expansion."""

import tracemalloc
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd_ipv6.checks import spf_macros
from policyd_ipv6.checks.spf_eval import DEFAULT_EXPLANATIONS, MAX_EXPLANATION, check_host
from policyd_ipv6.checks.spf_macros import expand
from policyd_ipv6.checks.spf_terms import SpfPermError
from policyd_ipv6.resolver.lookups import Answer
from policyd_ipv6.vocabulary import DnsStatus

LOCAL = "a" * 2000  # a 2 KB local part without a dot: one long label
SENDER = LOCAL + "@example.net"
VALUES = {"s": SENDER, "l": LOCAL, "d": "example.net", "o": "example.net", "i": "192.0.2.1",
          "h": "mx.example.net", "v": "in-addr", "c": "192.0.2.1", "r": "mx", "t": "0"}


def evaluate(record, explanation=None):
    """(verdict, questions asked) for SENDER: example.net has ``record``, why.example.net the
    ``explanation`` (if any), and no other name exists."""
    texts = {"example.net": record, "why.example.net": explanation}
    steps = check_host("2001:db8::25", SENDER, "mx.example.net")
    asked = [next(steps)]
    try:
        while True:
            name, rrtype = asked[-1]
            text = texts.get(name) if rrtype == "TXT" else None
            asked.append(steps.send(
                Answer(DnsStatus.NXDOMAIN, (), 60) if text is None
                else Answer(DnsStatus.OK, ((text.encode(),),), 60)))
    except StopIteration as stop:
        return stop.value, asked


def peak_bytes(call, *args):
    """(what ``call(*args)`` returns, the most memory allocated at once while it ran)."""
    tracemalloc.start()
    try:
        return call(*args), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def distinct(macro, size=32_000):
    """Text of distinct macros, ``macro(n)`` for n = 0, 1, ..., of about ``size`` octets."""
    out, length, n = [], 0, 0
    while length < size:
        out.append(macro(n))
        length += len(out[-1])
        n += 1
    return "".join(out)


@pytest.mark.parametrize("text", ["%{s}" * 8000, "%{l}." * 6400, "%{S}" * 8000])
def test_an_explanation_is_built_only_as_far_as_the_fact_keeps_it(text):
    """32 KB of one macro over a 2 KB sender (16 MB in full) is built to the limit and no
    further: its memory is that of the text's macros, not of their expansion."""
    limit = MAX_EXPLANATION + 1
    kept, peak = peak_bytes(expand, text, VALUES, True, limit)
    assert kept == expand(text[:40], VALUES, True)[:limit]
    assert peak < 2_000_000


def test_an_explanation_of_distinct_macros_expands_only_those_it_keeps():
    """Thousands of distinct macros, each of 2 KB: the first is past the limit, the others are
    checked and never transformed."""
    text = distinct(lambda n: f"%{{s-{n}}}")
    with mock.patch.object(spf_macros, "_piece", wraps=spf_macros._piece) as counted:
        kept = expand(text, VALUES, True, MAX_EXPLANATION + 1)
    assert kept == SENDER[:MAX_EXPLANATION + 1]
    assert counted.call_count == 1


texts = st.lists(st.one_of(
    st.sampled_from(["%{s}", "%{l2-}", "%{dr}", "%{i}", "%{S}", "%%", "%_", "%-", "%{c}",
                     "%{t}", "%{o1}"]),
    st.text(st.sampled_from("ab. -"), max_size=30)), max_size=30).map("".join)


@given(texts, st.integers(0, 600), st.integers(0, 80))
def test_an_explanation_cut_at_a_limit_is_the_whole_one_cut(text, limit, local):
    """The first LIMIT characters of an explanation are those of its whole expansion (or the
    same error: pyspf's expression refuses a final "%%")."""
    values = dict(VALUES, s="b." * local + "@example.net", l="b." * local)
    try:
        whole = expand(text, values, True)[:limit]
    except SpfPermError as error:
        whole = str(error)
    try:
        assert expand(text, values, True, limit) == whole
    except SpfPermError as error:
        assert str(error) == whole


def test_a_hostile_explanation_reaches_the_verdict_as_its_first_characters():
    """check_host expands exp= text only one character past what the fact keeps."""
    verdict, _ = evaluate("v=spf1 -all exp=why.example.net", "%{s}" * 8000)
    assert verdict.result == "fail" and verdict.explained
    assert verdict.explanation == SENDER[:MAX_EXPLANATION + 1]


@pytest.mark.parametrize("text", ["x.%{l}" + "%{l}" * 8000,
                                  "x." + distinct(lambda n: f"%{{l-{n}}}")])
def test_a_long_last_label_is_built_only_as_far_as_the_cut_needs(text):
    """A domain-spec whose last label runs to megabytes (16 MB, or thousands of distinct
    macros) is built to 255 characters and given as its last 254: no macro is transformed
    for more, and no more memory is taken than the text's macros need."""
    with mock.patch.object(spf_macros, "_transform", wraps=spf_macros._transform) as counted:
        name, peak = peak_bytes(expand, text, VALUES)
    assert name == "a" * 254
    assert peak < 2_000_000
    assert counted.call_count <= 2
    assert all((call.args[3] if len(call.args) > 3 else len(call.args[0])) <= 255
               for call in counted.call_args_list)


@pytest.mark.parametrize("record, result", [
    ("v=spf1 exists:x.%{l}%{l} a:x.%{l} mx:%{l}%{l} ptr:x.%{l} -all", "fail"),
    ("v=spf1 include:x.%{l}%{l} -all", "permerror"),
    ("v=spf1 redirect=x.%{l}%{l}", "permerror"),
    ("v=spf1 -all exp=x.%{l}%{l}", "fail"),
])
def test_a_name_with_a_label_too_long_for_dns_is_never_looked_up(record, result):
    """A name whose last label is too long for DNS (given in part) has no records, as before:
    no mechanism matches, an include or a redirect to it is permerror, its exp= is not had."""
    verdict, asked = evaluate(record)
    assert verdict.result == result
    assert all(len(name) < 300 for name, _ in asked)
    if result == "fail":
        assert verdict.explanation == DEFAULT_EXPLANATIONS["fail"]


@pytest.mark.parametrize("text", ["%{d0}.x.example", "%{d00r}", "x.%{l0-}.y", "%{d}.%{s0}",
                                  "%{D" + "0" * 5000 + "}"])
def test_a_count_of_0_is_a_syntax_error(text):
    """RFC 7208 §7.1: "If a DIGIT is specified, the value MUST be nonzero" (pyspf 2.0.14 took
    %{d0} for all labels but the first); in a domain-spec or an explanation alike."""
    for in_exp in (False, True):
        with pytest.raises(SpfPermError, match="must be nonzero"):
            expand(text, VALUES, in_exp)


def test_a_count_with_leading_zeros_is_its_value():
    """A count of 02 is a count of 2, not of 0."""
    assert expand("%{d02}.x", VALUES) == "example.net.x"
    assert expand("%{d001r}", VALUES) == "example"


@pytest.mark.parametrize("record, explanation, result, text", [
    ("v=spf1 exists:%{d0}.x.example -all", None, "permerror", None),
    ("v=spf1 -all exp=why.example.net", "why %{d0}", "fail", DEFAULT_EXPLANATIONS["fail"]),
])
def test_a_count_of_0_is_permerror_for_check_host(record, explanation, result, text):
    """A record with %{d0} is permerror; an explanation with it is ignored (RFC 7208 §6.2)."""
    verdict, _ = evaluate(record, explanation)
    assert verdict.result == result
    if text is not None:
        assert verdict.explanation == text and not verdict.explained
