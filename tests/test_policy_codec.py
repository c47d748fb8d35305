"""Tests of the sans-IO policy protocol codec (policyd_ipv6.policy_codec)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd_ipv6.policy.codec import (
    MAX_ATTRIBUTES,
    MAX_LINE_BYTES,
    MAX_REQUEST_BYTES,
    PolicyDecoder,
    PolicyProtocolError,
    encode_reply,
)

# A request exactly as Postfix 3.7 sends it at RCPT (attribute order as in smtpd_check.c).
POSTFIX_RCPT = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    b"client_address=2001:db8::25\nclient_name=unknown\nclient_port=53412\n"
    b"reverse_client_name=mx.example.net\nserver_address=2001:db8::1\nserver_port=25\n"
    b"helo_name=mx.example.net\nsender=alice@example.net\nrecipient=bob@example.com\n"
    b"recipient_count=0\nqueue_id=\ninstance=1a2b.6650f0c1.3e8a1.0\nsize=0\netrn_domain=\n"
    b"stress=\nsasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\n"
    b"ccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=\n"
    b"encryption_cipher=\nencryption_keysize=0\npolicy_context=\ncompatibility_level=3.6\n\n"
)


def test_postfix_request_decodes_to_attributes():
    """A whole Postfix request gives one dict with every attribute, empty values included."""
    [request] = PolicyDecoder().feed(POSTFIX_RCPT)
    assert request["client_address"] == "2001:db8::25"
    assert request["recipient"] == "bob@example.com"
    assert request["queue_id"] == ""
    assert len(request) == 30


def test_byte_at_a_time_gives_the_same_request():
    """Feeding one byte at a time yields the same request, only when its empty line arrives."""
    decoder = PolicyDecoder()
    got = []
    for i in range(len(POSTFIX_RCPT)):
        got += decoder.feed(POSTFIX_RCPT[i:i + 1])
        if i < len(POSTFIX_RCPT) - 1:
            assert got == []
    assert got == PolicyDecoder().feed(POSTFIX_RCPT)


def test_several_requests_in_one_read_come_out_in_order():
    """Requests that arrive together are returned in order, and pending is false after them."""
    decoder = PolicyDecoder()
    two = POSTFIX_RCPT + POSTFIX_RCPT.replace(b"bob@", b"carol@")
    first, second = decoder.feed(two)
    assert (first["recipient"], second["recipient"]) == ("bob@example.com", "carol@example.com")
    assert not decoder.pending


def test_value_may_contain_equals_sign():
    """Only the first '=' separates name from value."""
    [request] = PolicyDecoder().feed(b"request=smtpd_access_policy\nsender=a=b@x.example\n\n")
    assert request["sender"] == "a=b@x.example"


@pytest.mark.parametrize("stream, why", [
    (b"protocol_state=RCPT\n\n", "not"),                        # no request attribute
    (b"request=junk\n\n", "not smtpd_access_policy"),
    (b"request=smtpd_access_policy\nno equals sign\n\n", "without '='"),
    (b"request=smtpd_access_policy\n=value\n\n", "without a name"),
    (b"request=smtpd_access_policy\nsender=a\nsender=b\n\n", "twice"),
    (b"request=smtpd_access_policy\nsender=a\0b\n\n", "NUL"),
])
def test_malformed_requests_raise_the_codec_error(stream, why):
    """Each kind of malformed request raises PolicyProtocolError saying what was wrong."""
    with pytest.raises(PolicyProtocolError, match=why):
        PolicyDecoder().feed(stream)


def test_overlong_line_is_refused_before_its_end_arrives():
    """A line longer than MAX_LINE_BYTES is refused even without a newline (bounded memory)."""
    decoder = PolicyDecoder()
    with pytest.raises(PolicyProtocolError, match="line longer"):
        decoder.feed(b"sender=" + b"a" * MAX_LINE_BYTES)


def test_too_many_attributes_and_too_large_request_are_refused():
    """Attribute count and total request size are bounded."""
    many = b"".join(b"a%d=1\n" % i for i in range(MAX_ATTRIBUTES + 1)) + b"\n"
    with pytest.raises(PolicyProtocolError, match="attributes"):
        PolicyDecoder().feed(many)
    big = b"".join(b"a%d=%s\n" % (i, b"x" * 8000) for i in range(MAX_REQUEST_BYTES // 8000 + 1))
    with pytest.raises(PolicyProtocolError, match="request longer"):
        PolicyDecoder().feed(big)


def test_decoder_stays_dead_after_an_error():
    """After a protocol error every later feed raises too (the connection must be closed)."""
    decoder = PolicyDecoder()
    with pytest.raises(PolicyProtocolError):
        decoder.feed(b"garbage\n\n")
    with pytest.raises(PolicyProtocolError):
        decoder.feed(POSTFIX_RCPT)


def test_invalid_utf8_is_replaced_not_fatal():
    """Invalid UTF-8 in a value is replaced by U+FFFD rather than breaking the connection."""
    [request] = PolicyDecoder().feed(b"request=smtpd_access_policy\nsender=\xff@x\n\n")
    assert request["sender"] == "\ufffd@x"


def test_encode_reply():
    """A reply is action=... and an empty line; empty or multi-line actions are refused."""
    assert encode_reply("DUNNO") == b"action=DUNNO\n\n"
    for bad in ("", " DUNNO", "450 x\n451 y", "a\0"):
        with pytest.raises(ValueError):
            encode_reply(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0, max_value=3000), max_size=8))
def test_any_byte_stream_gives_requests_or_the_codec_error(data, cuts):
    """Any bytes, split anywhere, give requests or PolicyProtocolError, and the same ones."""
    def run(chunks):
        decoder, out = PolicyDecoder(), []
        try:
            for chunk in chunks:
                out += decoder.feed(chunk)
        except PolicyProtocolError:
            return out, "error"
        return out, "ok"

    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:])]
    whole = run([data])
    split = run(chunks)
    assert split == whole
    for request in whole[0]:
        assert request["request"] == "smtpd_access_policy"


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(
    st.text(st.characters(blacklist_characters="=\n\0", blacklist_categories=("Cs",)), min_size=1,
            max_size=20).filter(lambda k: k != "request"),
    # A CR just before the LF is a CR LF line end (telnet), so no value ends in one here.
    st.text(st.characters(blacklist_characters="\n\0", blacklist_categories=("Cs",)),
            max_size=50).filter(lambda v: not v.endswith("\r")),
    max_size=20))
def test_round_trip_of_well_formed_requests(attrs):
    """A well-formed request encodes and decodes to the same attributes."""
    wire = b"request=smtpd_access_policy\n" + b"".join(
        k.encode() + b"=" + v.encode() + b"\n" for k, v in attrs.items()) + b"\n"
    [request] = PolicyDecoder().feed(wire)
    assert request == {"request": "smtpd_access_policy", **attrs}


def test_crlf_line_ends_give_the_same_request_split_anywhere():
    """A request typed with CR LF line ends (telnet) decodes as with bare LF, however it is
    split, a CR and its LF in different reads included."""
    crlf = POSTFIX_RCPT.replace(b"\n", b"\r\n")
    [expected] = PolicyDecoder().feed(POSTFIX_RCPT)
    assert PolicyDecoder().feed(crlf) == [expected]
    decoder, out = PolicyDecoder(), []
    for i in range(len(crlf)):
        out += decoder.feed(crlf[i:i + 1])
        assert decoder.pending == (i < len(crlf) - 1)
    assert out == [expected]


def test_bare_cr_inside_a_value_is_kept():
    """Only a CR right before an LF is a line end; one inside a value stays."""
    [request] = PolicyDecoder().feed(b"request=smtpd_access_policy\nsender=a\rb@x\n\n")
    assert request["sender"] == "a\rb@x"


@pytest.mark.parametrize("line, why", [
    (b"no equals sign\n", "without '='"),
    (b"=value\n", "without a name"),
    (b"sender=a\0b\n", "NUL"),
    (b"GET / HTTP/1.1\r\n", "without '='"),
])
def test_bad_line_after_the_first_is_refused_as_it_arrives(line, why):
    """A bad line after a good first one raises as soon as its line end arrives, before the
    request's empty line (which may never come)."""
    decoder = PolicyDecoder()
    assert decoder.feed(b"request=smtpd_access_policy\nsender=a@b\n") == []
    with pytest.raises(PolicyProtocolError, match=why):
        for byte in line:  # typed one key at a time
            decoder.feed(bytes([byte]))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"request=smtpd_access_policy", b"a=b", b"a=c", b"=x", b"nox",
                                 b"c=\0", b"d=\xff", b"e=f\r", b"", b"g==h", b"x" * 20000]),
                min_size=0, max_size=6))
def test_one_whole_request_in_one_read_decodes_as_byte_by_byte(lines):
    """A read holding exactly one request (the way Postfix sends it, decoded in place without
    the buffer) gives the same request, or the same error message, as the same bytes arriving
    in two reads (through the buffer)."""
    data = b"\n".join(lines) + b"\n\n"

    def run(chunks):
        decoder, out = PolicyDecoder(), []
        try:
            for chunk in chunks:
                out += decoder.feed(chunk)
        except PolicyProtocolError as error:
            return out, str(error)
        return out, "ok"

    assert run([data]) == run([data[:1], data[1:]])
