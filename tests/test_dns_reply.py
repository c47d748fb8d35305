"""Tests of the reply parser (policyd_ipv6.resolver.reply), with dnspython as the oracle.

Well-formed replies are built and rendered (with name compression) by dnspython; the parser
must read from them what dnspython's ``resolve_chaining`` and ``lookups._values`` read. Then
the bytes are mangled: whenever dnspython (2.9.1 or later, whose decompression forbids
overlapping pointer targets; 2.9.0 and older, Debian 13's 2.7 included, follow a pointer into a
label that runs over the pointer itself) reads a mangled reply, the parser must read the same
from it, and whatever the bytes, the parser either answers or raises ``MalformedReply``.
"""

import struct

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.version
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd_ipv6.resolver.lookups import _values
from policyd_ipv6.resolver.reply import MalformedReply, name_text, parse_reply, resolve

NEW_DNSPYTHON = (dns.version.MAJOR, dns.version.MINOR, dns.version.MICRO) >= (2, 9, 1)
TYPES = ["A", "AAAA", "PTR", "CNAME", "MX", "TXT"]
NAMES = ["a.example", "B.example", "c.a.example", "x.test", "ex\\.am\\\"ple.test", "\\200.test"]

label = st.sampled_from(NAMES)
rdata = {
    "A": st.ip_addresses(v=4).map(str),
    "AAAA": st.ip_addresses(v=6).map(str),
    "PTR": label.map(lambda n: n + "."),
    "CNAME": label.map(lambda n: n + "."),
    "MX": st.tuples(st.integers(0, 65535), label).map(lambda t: f"{t[0]} {t[1]}."),
    "TXT": st.lists(st.binary(max_size=40), min_size=1, max_size=3).map(
        lambda ss: " ".join('"' + "".join(f"\\{b:03d}" for b in s) + '"' for s in ss)),
}
record = st.sampled_from(TYPES).flatmap(
    lambda t: st.tuples(label, st.just(t), st.integers(0, 2**32 - 1), rdata[t]))
soa = st.tuples(st.sampled_from(["example", "a.example", "test", ""]),
                st.integers(0, 2**31 - 1), st.integers(0, 2**32 - 1))


def build(qname, qtype, rcode, answers, soas):
    """A reply rendered by dnspython: answer records, and SOAs in the authority section."""
    query = dns.message.make_query(qname, qtype, use_edns=0)
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    for name, rtype, ttl, text in answers:
        response.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", rtype, text))
    for zone, ttl, minimum in soas:
        owner = zone + "." if zone else "."
        response.authority.append(dns.rrset.from_text(
            owner, ttl, "IN", "SOA", f"ns.{zone}. host.{zone}. 1 2 3 4 {minimum}" if zone
            else f"ns. host. 1 2 3 4 {minimum}"))
    return response.to_wire()


def oracle(wire):
    """What dnspython reads from the reply: (kind, values, ttl), as ``resolve`` reports it."""
    message = dns.message.from_wire(wire, ignore_trailing=True)
    rrtype = dns.rdatatype.to_text(message.question[0].rdtype)
    try:
        chain = message.resolve_chaining()
    except dns.message.ChainTooLong:
        return ("chain-too-long", (), None)
    except dns.message.AnswerForNXDOMAIN:
        return ("answer-for-nxdomain", (), None)
    if chain.answer is not None:
        return ("answer", _values(chain.answer, rrtype), chain.minimum_ttl)
    kind = "nxdomain" if message.rcode() == dns.rcode.NXDOMAIN else "nodata"
    question = message.question[0]
    has_soa = any(r.rdtype == dns.rdatatype.SOA and r.rdclass == question.rdclass
                  and chain.canonical_name.is_subdomain(r.name) for r in message.authority)
    return (kind, (), chain.minimum_ttl if has_soa else None)


def ours(wire):
    found = resolve(parse_reply(wire))
    return (found.kind, found.values, found.ttl)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(label, st.sampled_from(TYPES), st.sampled_from([0, 3]),
       st.lists(record, max_size=8), st.lists(soa, max_size=2))
def test_well_formed_replies_read_as_dnspython_reads_them(qname, qtype, rcode, answers, soas):
    """A reply dnspython renders gives the same answer, values, TTL and negative TTL."""
    wire = build(qname, qtype, rcode, answers, soas)
    assert ours(wire) == oracle(wire)


@pytest.mark.skipif(not NEW_DNSPYTHON, reason="dnspython before 2.9.1 decompresses more loosely")
@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(label, st.sampled_from(TYPES), st.lists(record, min_size=1, max_size=5),
       st.lists(soa, max_size=1), st.data())
def test_mangled_replies_are_refused_or_read_as_dnspython_reads_them(qname, qtype, answers,
                                                                      soas, data):
    """Flipped, cut or inserted bytes: MalformedReply, or the same reading as dnspython's."""
    wire = bytearray(build(qname, qtype, 0, answers, soas))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(12, len(wire) - 1))
        how = data.draw(st.sampled_from(["flip", "cut", "insert", "pointer"]))
        if how == "flip":
            wire[at] = data.draw(st.integers(0, 255))
        elif how == "cut":
            del wire[at:]
            if len(wire) < 13:
                break
        elif how == "insert":
            wire[at:at] = data.draw(st.binary(min_size=1, max_size=3))
        else:
            wire[at:at + 2] = struct.pack("!H", 0xC000 | data.draw(st.integers(0, len(wire))))
    wire = bytes(wire)
    try:
        expected = oracle(wire)
    except Exception:
        expected = None
    try:
        got = ours(wire)
    except MalformedReply:
        got = None
    if expected is not None:
        assert got == expected
    # Stricter than dnspython is allowed (records of types we do not read are only skipped,
    # so dnspython may refuse where we read): a refused reply is a dropped datagram.


def message_with_name_at(tail: bytes) -> bytes:
    """A header, the question a.example/PTR, one answer whose owner is ``tail``."""
    header = struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0)
    question = b"\x01a\x07example\x00" + struct.pack("!HH", 12, 1)
    return header + question + tail


def test_pointer_loops_and_forward_pointers_are_refused():
    """A pointer to itself, to a later offset or in a cycle never loops: MalformedReply."""
    own = len(message_with_name_at(b""))
    for tail in (struct.pack("!H", 0xC000 | own),           # points at itself
                 struct.pack("!H", 0xC000 | (own + 2)),     # points forward
                 b"\x01b" + struct.pack("!H", 0xC000 | own)):  # a cycle through a label
        with pytest.raises(MalformedReply):
            parse_reply(message_with_name_at(tail + struct.pack("!HHIH", 12, 1, 60, 0)))


def test_names_over_255_octets_through_pointers_are_refused():
    """Labels chained by pointers may not add up to more than 255 octets."""
    header = struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0)
    blob = b""
    offsets = []
    for _ in range(5):  # five 62-octet labels, each ending with a pointer to the previous
        offsets.append(12 + len(blob))
        blob += b"\x3e" + b"x" * 62 + (struct.pack("!H", 0xC000 | offsets[-2])
                                       if len(offsets) > 1 else b"\x00")
    question = struct.pack("!H", 0xC000 | offsets[-1]) + struct.pack("!HH", 12, 1)
    wire = header + blob + question
    with pytest.raises(MalformedReply):
        parse_reply(wire)
    with pytest.raises(dns.exception.DNSException):
        dns.message.from_wire(wire)


def test_a_64_kb_txt_answer_is_read_whole():
    """A TCP-sized TXT answer (230 records of 255-byte strings) parses to every string."""
    response = dns.message.make_response(dns.message.make_query("big.test", "TXT"))
    strings = [bytes([65 + i % 26]) * 250 for i in range(230)]
    response.answer.append(dns.rrset.from_text_list(
        "big.test.", 60, "IN", "TXT", [f'"{s.decode()}" "v{i}"' for i, s in
                                       enumerate(strings)]))
    wire = response.to_wire(max_size=65535)
    assert len(wire) > 60_000
    found = resolve(parse_reply(wire))
    assert found.kind == "answer" and len(found.values) == 230
    assert (strings[7], b"v7") in found.values


def test_names_print_as_dnspython_prints_them():
    """Escapes for special and non-printable octets match dnspython's to_text."""
    for text in ["a.example", "ex\\.am\\\"ple.test", "\\200\\032x.test", "@x.test", "."]:
        name = dns.name.from_text(text)
        assert name_text(name.to_wire().lower()) == name.to_text(omit_final_dot=True).lower()
