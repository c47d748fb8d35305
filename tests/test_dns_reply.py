"""Tests of the reply parser (policyd_ipv6.resolver.reply), with dnspython as the oracle.

Well-formed replies are built and rendered (with name compression) by dnspython; the parser
must read from them what dnspython's ``resolve_chaining`` and ``lookups._values`` read. Then
the bytes are mangled: whenever dnspython reads a mangled reply, the parser must read the same
from it, and whatever the bytes, the parser either answers or raises ``MalformedReply``.

The oracle reads names as dnspython 2.9.1 does, whatever dnspython is installed. Before 2.9.1
(Debian 12's 2.3 and Debian 13's 2.7 included) dnspython lets a compression pointer's target
hold a label that runs over the pointer itself, and then goes on reading the message from
after that label, inside the pointer's own name. RFC 1035 4.1.4 makes the pointer the end of
its name and its target "a prior occurrence of the same name": a label that contains the
pointer is no prior occurrence, and the next field starts right after the pointer. So the
parser refuses such a name, as dnspython 2.9.1 does (it bounds the target by the part of the
name that pointed), and on older dnspython the oracle's name decoding is 2.9.1's
(``strict_name_from_wire``). The message id is drawn too: the header can be such a target.
"""

import contextlib
import struct
from unittest import mock

import dns.exception
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

STRICT_DNSPYTHON = (dns.version.MAJOR, dns.version.MINOR, dns.version.MICRO) >= (2, 9, 1)
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


def build(qname, qtype, rcode, answers, soas, message_id=1):
    """A reply rendered by dnspython: answer records, and SOAs in the authority section."""
    query = dns.message.make_query(qname, qtype, use_edns=0)
    query.id = message_id  # not make_query's random one: a failure must replay
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


def strict_name_from_wire(parser, decompress=True):
    """``dns.name.from_wire_parser`` as in dnspython 2.9.1, on the parser of 2.3 to 2.9.0: the
    one change is that a pointer's target must end before the part of the name that pointed
    (``decompress``, 2.9's, only for its callers: the message's names are all decompressed)."""
    labels = []
    biggest_pointer = parser.current
    hops = 0
    saved_end = parser.end
    try:
        with parser.restore_furthest():
            start = parser.current
            count = parser.get_uint8()
            while count != 0:
                if count < 64:
                    labels.append(parser.get_bytes(count))
                elif count >= 192:
                    if not decompress:
                        raise dns.exception.FormError
                    current = (count & 0x3F) * 256 + parser.get_uint8()
                    if current >= biggest_pointer:
                        raise dns.name.BadPointer
                    biggest_pointer = current
                    hops += 1
                    if hops > dns.name.MAX_COMPRESSION_POINTER_CHAIN:
                        raise dns.name.PointerChainTooLong
                    parser.end = start  # 2.9.1's parser.restrict_end(start)
                    parser.seek(current)
                    start = current
                else:
                    raise dns.name.BadLabelType
                count = parser.get_uint8()
            labels.append(b"")
    finally:
        parser.end = saved_end
    return dns.name.Name(labels)


def strict_oracle(wire, strict=STRICT_DNSPYTHON):
    """``oracle``, with names read by dnspython 2.9.1's rule (see the module docstring)."""
    with (contextlib.nullcontext() if strict
          else mock.patch.object(dns.name, "from_wire_parser", strict_name_from_wire)):
        return oracle(wire)


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


def mangled(data, wire):
    """``wire`` with 1 to 4 bytes flipped, cut, inserted or made a compression pointer."""
    wire = bytearray(wire)
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
    return bytes(wire)


replies = st.builds(build, label, st.sampled_from(TYPES), st.just(0),
                    st.lists(record, min_size=1, max_size=5), st.lists(soa, max_size=1),
                    st.integers(0, 65535))


def reading(read, wire):
    """What ``read`` (an oracle) reads from ``wire``, or None when it refuses the bytes."""
    try:
        return read(wire)
    except Exception:
        return None


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(replies, st.data())
def test_mangled_replies_are_refused_or_read_as_dnspython_reads_them(reply, data):
    """Flipped, cut or inserted bytes: MalformedReply, or the same reading as dnspython's."""
    wire = mangled(data, reply)
    expected = reading(strict_oracle, wire)
    try:
        got = ours(wire)
    except MalformedReply:
        got = None
    if expected is not None:
        assert got == expected
    # Stricter than dnspython is allowed (records of types we do not read are only skipped,
    # so dnspython may refuse where we read): a refused reply is a dropped datagram.


def everything_read(wire):
    """All that ``parse_reply`` read from ``wire``, comparable; None when it refused it."""
    try:
        reply = parse_reply(wire)
    except MalformedReply:
        return None
    sets = [[(r.owner, r.rtype, r.rclass, r.ttl, list(r.values)) for r in section]
            for section in (reply.answer, reply.authority)]
    return (reply.id, reply.flags, reply.qname, reply.qtype, reply.qclass, sets,
            reply.extended_rcode)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(replies, st.data())
def test_an_owner_pointing_at_the_question_reads_as_the_general_path_reads_it(reply, data):
    """The shortcut for an owner name that is a pointer to the question (offset 12) reads
    what following the pointer reads, or refuses what it refuses, whole or mangled."""
    wire = mangled(data, reply) if data.draw(st.booleans()) else reply
    with mock.patch("policyd_ipv6.resolver.reply._TO_QUESTION", b"off"):  # never 2 bytes
        general = everything_read(wire)
    assert everything_read(wire) == general


@pytest.mark.skipif(not STRICT_DNSPYTHON, reason="needs dnspython 2.9.1's own decoding")
@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(replies, st.data())
def test_the_oracles_name_rule_is_dnspython_2_9_1s(reply, data):
    """``strict_name_from_wire`` reads every mangled reply as dnspython 2.9.1's own does."""
    wire = mangled(data, reply)
    assert reading(lambda w: strict_oracle(w, strict=False), wire) == reading(oracle, wire)


# Found by the mangled-reply test on dnspython 2.7: the question's name is a pointer (offset 12)
# to offset 1, the message id's low byte 0x0c, a label of 12 octets that runs over the pointer.
OVER_ITS_POINTER = bytes.fromhex("000c81000001000100000001c001076578616d706c650000010001"
                                 "c00c000c00010010b82e0002c00c0000292000000000000000")


def test_a_pointer_into_a_label_over_the_pointer_is_refused():
    """A pointer whose target label contains the pointer is refused by the parser and by the
    oracle's 2.9.1 rule; dnspython before 2.9.1 reads a question name past the pointer."""
    with pytest.raises(MalformedReply):
        parse_reply(OVER_ITS_POINTER)
    assert reading(lambda w: strict_oracle(w, strict=False), OVER_ITS_POINTER) is None
    native = reading(oracle, OVER_ITS_POINTER)
    assert native is None if STRICT_DNSPYTHON else native == ("nodata", (), None)


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


def test_ipv6_addresses_print_as_dnspython_prints_them():
    """AAAA text is dnspython's for every mix of 0, 1 and ffff groups (the cases where RFC
    5952's zero compression and the ::ffff:a.b.c.d form could differ)."""
    import itertools

    from dns.ipv6 import inet_ntoa

    words = [b"\x00\x00", b"\x00\x01", b"\xff\xff"]
    response = dns.message.make_response(dns.message.make_query("v6.test", "AAAA"))
    addresses = [b"".join(group) for group in itertools.product(words, repeat=8)]
    for start in range(0, len(addresses), 256):  # one reply per 256 records
        response.answer = [dns.rrset.from_text_list(
            "v6.test.", 60, "IN", "AAAA", [inet_ntoa(a) for a in addresses[start:start + 256]])]
        found = resolve(parse_reply(response.to_wire(max_size=65535)))
        assert sorted(found.values) == sorted(inet_ntoa(a) for a in addresses[start:start + 256])
