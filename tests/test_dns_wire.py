"""Tests of the query encoder and reply matcher (policyd_ipv6.dns_wire)."""

import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd_ipv6.resolver.wire import EDNS_PAYLOAD, encode_name, encode_query, is_reply_to

PTR_NAME = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"


def test_query_is_what_dnspython_reads():
    """dnspython parses the query: one IN question, RD set, EDNS0 with our payload size."""
    wire = encode_query(0x1234, encode_name(PTR_NAME), dns.rdatatype.PTR)
    message = dns.message.from_wire(wire)
    assert message.id == 0x1234
    assert message.flags & dns.flags.RD and not message.flags & dns.flags.QR
    [question] = message.question
    assert question.name == dns.name.from_text(PTR_NAME)
    assert question.rdtype == dns.rdatatype.PTR
    assert message.edns == 0 and message.payload == EDNS_PAYLOAD


@pytest.mark.parametrize("name", ["a" * 64 + ".example", "a..example", "bücher.example",
                                  ".".join(["a" * 63] * 4) + ".x"])
def test_names_dns_cannot_carry_are_refused(name):
    """Over-long or empty labels, over-long names and non-ASCII names raise ValueError."""
    with pytest.raises(ValueError):
        encode_name(name)


def test_root_and_trailing_dot():
    """The root is one zero octet; a trailing dot changes nothing."""
    assert encode_name("") == b"\x00"
    assert encode_name("example.com.") == encode_name("example.com") == b"\x07example\x03com\x00"


def reply_for(query: bytes, **changes) -> bytes:
    request = dns.message.from_wire(query)
    response = dns.message.make_response(request)
    for name, value in changes.items():
        setattr(response, name, value)
    return response.to_wire()


def test_reply_matching():
    """A real reply matches; another ID, another question, or a query does not."""
    query = encode_query(7, encode_name("example.com"), dns.rdatatype.TXT)
    assert is_reply_to(query, reply_for(query))
    assert not is_reply_to(query, reply_for(query, id=8))
    other = encode_query(7, encode_name("example.org"), dns.rdatatype.TXT)
    assert not is_reply_to(query, reply_for(other))
    other_type = encode_query(7, encode_name("example.com"), dns.rdatatype.A)
    assert not is_reply_to(query, reply_for(other_type))
    assert not is_reply_to(query, query)  # QR not set
    assert not is_reply_to(query, b"\x00\x07")


def test_reply_matching_ignores_ascii_case():
    """A server may echo the question in another case (RFC 4343)."""
    query = encode_query(9, encode_name("example.com"), dns.rdatatype.TXT)
    upper = encode_query(9, encode_name("EXAMPLE.com"), dns.rdatatype.TXT)
    assert is_reply_to(query, reply_for(upper))


@given(st.binary(max_size=600))
def test_matcher_never_raises(junk):
    """Any bytes are matched or not, without an exception."""
    query = encode_query(1, encode_name("example.com"), dns.rdatatype.A)
    assert is_reply_to(query, junk) in (True, False)
