"""Tests of untrusted-name normalisation (policyd_ipv6.names)."""

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from policyd_ipv6.names import client_ip, domain_key, helo_domain, recipient_domain
from policyd_ipv6.text import printable


@pytest.mark.parametrize("text, expected", [
    ("2001:db8::25", "2001:db8::25"),
    ("2001:DB8:0:0::25", "2001:db8::25"),
    ("::ffff:192.0.2.10", "192.0.2.10"),
    ("192.0.2.10", "192.0.2.10"),
    ("fe80::1%eth0", "fe80::1"),
    ("unknown", None),
    ("", None),
    ("[2001:db8::1]", None),
])
def test_client_ip(text, expected):
    """client_address parses to an address (IPv4-mapped becomes IPv4) or None."""
    result = client_ip(text)
    assert (str(result) if result is not None else None) == expected


def _ipaddress_parse(text):
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0].strip())
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


_ADDRESS_TEXT = st.one_of(
    st.text(alphabet="0123456789abcdefABCDEF:.% x\x00", max_size=45),
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),
    st.tuples(st.lists(st.integers(0, 300), min_size=3, max_size=5),
              st.booleans()).map(lambda t: ("::ffff:" if t[1] else "")
                                 + ".".join(map(str, t[0]))),
)


@given(_ADDRESS_TEXT)
@example("01.2.3.4")
@example("::1.02.3.4")
@example("1.2.3.4\x00x")
@example("1:2:3:4:5:6:1.2.3.4")
def test_client_ip_agrees_with_ipaddress(text):
    """client_ip's fast path (the C parser, inet_pton) gives what ipaddress's own parse of the
    text gives, for any text: the same address, or None."""
    assert client_ip(text) == _ipaddress_parse(text)


# Postfix's internal (unquoted) form, as a policy request's recipient and sender carry it
# (smtpd.c extract_addr: tok822_internalize); the client's form is in the comment.
@pytest.mark.parametrize("address, expected", [
    ("bob@Contoso.COM", "contoso.com"),
    ("bob@contoso.com.", "contoso.com"),
    ('"x\\@contoso.com', "contoso.com"),        # <"\"x\\"@contoso.com>
    ("john smith@Example.NET", "example.net"),  # <"john smith"@example.net>
    ("a@b@contoso.com", "contoso.com"),         # <"a@b"@contoso.com>
    ('a"@b@contoso.com', "contoso.com"),        # <"a\"@b"@contoso.com>
    ('"unterminated@x', "x"),                   # <"\"unterminated"@x>
    ("postmaster", None),
    ("bob@", None),
    ("bob@.", None),
    ("<bob@x.example>", "x.example"),
    ("bob@[IPv6:2001:db8::1]", "[ipv6:2001:db8::1]"),
])
def test_recipient_domain_internal_form(address, expected):
    """In Postfix's unquoted internal form the domain is what follows the last @."""
    assert recipient_domain(address) == expected


# The milter's SMFIC_MAIL / SMFIC_RCPT argument: the address as the client wrote it, quotes
# kept (milter/end_of_message.py reads the sender's domain from it).
@pytest.mark.parametrize("address, expected", [
    ('<"a@b"@contoso.com>', "contoso.com"),     # quoted local part containing @
    ('"a\\"@b"@contoso.com', "contoso.com"),    # escaped quote inside the quoted string
    ('"\\"x\\\\"@Contoso.COM', "contoso.com"),  # the escaped backslash before the @
    ('"bob@x"', None),                          # quoted local part only: no domain
    ('<"a@b">', None),
    ('"a@b\\"c"', None),
])
def test_recipient_domain_raw_quoted_form(address, expected):
    """In the client's quoted form the domain follows the last @, and an @ inside a quoted
    local part with nothing after the quotes gives no domain."""
    assert recipient_domain(address) == expected


@pytest.mark.parametrize("name, expected", [
    ("Example.COM.", "example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("_spf.example.com", "_spf.example.com"),
    ("a" * 64 + ".com", None),                 # label over 63
    (".".join(["a" * 60] * 5), None),          # name over 253
    ("[192.0.2.1]", None),
    ("exa mple.com", None),
    ("-bad.com", None),
    ("", None),
])
def test_domain_key(name, expected):
    """Domain names normalise to lower-case A-labels; anything else gives None."""
    assert domain_key(name) == expected


@pytest.mark.parametrize("helo, expected", [
    ("mx.example.net", "mx.example.net"),
    ("localhost", None),
    ("[IPv6:2001:db8::1]", None),
    ("[192.0.2.1]", None),
    ("192.0.2.1", None),
    ("_x.example.net", None),
])
def test_helo_domain(helo, expected):
    """Only a multi-label, non-numeric host name is an SPF HELO identity."""
    assert helo_domain(helo) == expected


def test_printable_escapes_and_bounds():
    """Untrusted text is escaped (quotes, controls, non-ASCII) and truncated."""
    assert printable('a"b\\c\n\x00é') == 'a\\"b\\\\c\\x0a\\x00\\xe9'
    assert printable("x" * 300, 10) == "x" * 10 + "..."


@given(st.text(max_size=600))
def test_no_function_raises_on_any_text(text):
    """Every normaliser returns a value or None for any string; none raises."""
    client_ip(text)
    recipient_domain(text)
    domain_key(text)
    helo_domain(text)
    out = printable(text)
    assert out.isascii() and "\n" not in out
