"""The one-call name checks hold to the label-by-label rules they replaced, on generated
names: ``names.domain_key``'s whole-name pattern against a per-label check (RFC 1035 §2.3.4,
underscores allowed, no label starting or ending with a hyphen, a line end is no label), and
the SPF evaluator's ``_carriable`` against "every label 1-63 characters"."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd_ipv6.checks.spf_eval import _carriable
from policyd_ipv6.names import domain_key

pytestmark = pytest.mark.unit

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")
_labels = st.one_of(
    st.text(alphabet="ab-_0.", min_size=0, max_size=5),
    st.text(alphabet="a-", min_size=60, max_size=66),
    st.sampled_from(["", "-", "a-", "-a", "a\n", "\n", "xn--bcher-kva", "é", "A"]))


def reference_key(domain: str):
    domain = domain.strip().rstrip(".")
    if not domain or domain.startswith("[") or not domain.isascii():
        return "skip"
    domain = domain.lower()
    if len(domain) > 253:
        return None
    return domain if all(_LABEL.match(label) for label in domain.split(".")) else None


@settings(max_examples=1000, deadline=None)
@given(st.lists(_labels, min_size=1, max_size=6))
def test_domain_key_matches_the_per_label_rule(labels):
    name = ".".join(labels)
    expected = reference_key(name)
    if expected != "skip":
        assert domain_key(name) == expected


@settings(max_examples=1000, deadline=None)
@given(st.lists(_labels, min_size=1, max_size=6))
def test_carriable_matches_every_label_one_to_63(labels):
    name = ".".join(labels)
    assert _carriable(name) == all(0 < len(label) < 64 for label in name.split("."))


def test_a_line_end_inside_is_no_label():
    assert domain_key("abc\n.example") is None
    assert domain_key("mx.example.net") == "mx.example.net"
