"""Tests of the bound on DKIM keys (policyd_ipv6.checks.dkim_verify.key_problem and the key
lookup of policyd_ipv6.checks.dkim): an RSA key over 4096 bits or with an unusual public
exponent is refused before dkimpy's unbounded RSA sees it, and so is an over-long key reply.
Hostile keys are built here as DER by hand (random moduli: no private key is needed to be
refused); the usable key is made by openssl."""

import base64
import secrets

import dkim
import pytest
from dkimkeys import DkimKey, message, require_openssl, sign
from fakes import FakeDnsClient
from lab.zones import txt_rdata
from twisted.internet import task

from policyd_ipv6.checks import dkim_verify
from policyd_ipv6.checks.dkim import MAX_SIGNATURES, check_dkim
from policyd_ipv6.checks.dkim_verify import MAX_KEY_P_BYTES, key_problem
from policyd_ipv6.facts import Facts, RdnsFact, RdnsOutcome, SpfFact
from policyd_ipv6.milter.end_of_message import auth_results
from policyd_ipv6.policy.decision import Subject
from policyd_ipv6.resolver.lookups import Lookups

# SubjectPublicKeyInfo's AlgorithmIdentifier for rsaEncryption (OID 1.2.840.113549.1.1.1).
RSA_ALGORITHM = bytes.fromhex("300d06092a864886f70d0101010500")


def der_length(n):
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def der(tag, content):
    return bytes([tag]) + der_length(len(content)) + content


def der_integer(value):
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def rsa_record(bits, exponent=65537, spki=True):
    """A key record with a random odd ``bits``-bit modulus: SubjectPublicKeyInfo (what
    openssl writes) or a bare PKCS#1 RSAPublicKey (which dkimpy accepts too)."""
    modulus = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    key = der(0x30, der_integer(modulus) + der_integer(exponent))
    if spki:
        key = der(0x30, RSA_ALGORITHM + der(0x03, b"\x00" + key))
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(key)


@pytest.fixture(scope="module")
def key():
    require_openssl()
    return DkimKey.generate(1024)


@pytest.fixture(scope="module")
def key_4096():
    require_openssl()
    return DkimKey.generate(4096)


def run(records, raw):
    result = []
    lookups = Lookups(FakeDnsClient(records), task.Clock())
    check_dkim(lookups, raw).addCallback(result.append)
    assert result, "check_dkim did not fire synchronously with an immediate DNS fake"
    return result[0]


def signed_many(key, count):
    """A small message with ``count`` signatures (correct bh=), selectors s0, s1..."""
    raw = message(body=b"Hi.\r\n")
    for i in range(count):
        raw = sign(raw, key, "sender.test", f"s{i}")
    return raw


def serving(record, count=1):
    return {(f"s{i}._domainkey.sender.test", "TXT"): [txt_rdata(record.decode())]
            for i in range(count)}


@pytest.fixture
def no_rsa(monkeypatch):
    """dkimpy's verification made to fail the test if anything reaches it."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a refused key reached dkimpy's verify")

    monkeypatch.setattr(dkim.DKIM, "verify", forbidden)


def test_a_4096_bit_key_verifies_as_before(key_4096):
    """RFC 8301 §3.2: a 4096-bit key (the largest verifiers must handle) passes."""
    assert key_problem(key_4096.record().encode()) is None
    raw = sign(message(), key_4096, "sender.test", "s0")
    fact = run(serving(key_4096.record().encode()), raw)
    assert (fact.result, fact.domain, fact.selector) == ("pass", "sender.test", "s0")


def test_an_8192_bit_key_is_refused_without_dkimpy_and_the_reason_says_so(key, no_rsa):
    """Five signatures on a small (inline) message whose key is 8192 bits: each is a permerror
    "key too large: 8192 bits", dkimpy's verify is never called, and the log reason and the
    Authentication-Results header say why."""
    fact = run(serving(rsa_record(8192), MAX_SIGNATURES), signed_many(key, MAX_SIGNATURES))
    assert fact.result == "fail" and "key too large: 8192 bits" in fact.reason
    assert [s.result for s in fact.signatures] == ["permerror"] * MAX_SIGNATURES
    assert all(s.reason.startswith("key too large: 8192 bits") for s in fact.signatures)
    subject = Subject.from_request({"protocol_state": "RCPT", "client_address": "2001:db8::1",
                                    "sender": "alice@sender.test", "helo_name": "mx.test",
                                    "recipient": "bob@example.com"})
    facts = Facts(RdnsFact(RdnsOutcome.PASS, ("mx.test",)), SpfFact("fail"))
    text = auth_results("mx", subject, facts, fact)
    assert 'dkim=permerror reason="key too large: 8192 bits' in text


def test_a_huge_public_exponent_is_refused_without_dkimpy(key, no_rsa):
    """A 2048-bit key whose exponent is as large as its modulus (seconds of pow() per
    signature) is a permerror naming the exponent, without calling dkimpy's verify."""
    record = rsa_record(2048, exponent=secrets.randbits(2048) | (1 << 2047) | 1)
    fact = run(serving(record), signed_many(key, 1))
    (sig,) = fact.signatures
    assert sig.result == "permerror" and sig.reason.startswith(
        "unusable key: public exponent of 2048 bits")


@pytest.mark.parametrize("bits, exponent, spki, why", [
    (1024, 65537, True, None),
    (4096, 65537, False, None),
    (4096, (1 << 32) - 1, True, None),
    (4097, 65537, True, "key too large: 4097 bits"),
    (16384, 3, False, "key too large: 16384 bits"),
    (2048, (1 << 32) + 1, False, "unusable key: public exponent of 33 bits"),
    (2048, 65536, True, "unusable key: public exponent 65536"),
    (2048, 1, True, "unusable key: public exponent 1 "),
])
def test_key_bounds_table(bits, exponent, spki, why):
    """key_problem accepts keys up to 4096 bits with an odd exponent of 3 to 2^32, in both
    encodings dkimpy reads, and names the reason for anything else."""
    found = key_problem(rsa_record(bits, exponent, spki))
    assert found == why if why is None else found.startswith(why)


@pytest.mark.parametrize("record", [
    b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
    b"v=DKIM1; k=rsa; p=",
    b"v=DKIM1; k=rsa; p=!!!!",
    b"v=DKIM1; k=rsa; p=" + base64.b64encode(b"\x30\x84\xff\xff\xff\xff"),
    b"no tags at all",
])
def test_records_dkimpy_refuses_by_itself_are_left_to_it(record):
    """ed25519 keys (fixed size) and records dkimpy cannot parse give no key problem: dkimpy
    refuses the latter itself, before any RSA work."""
    assert key_problem(record) is None


def test_an_over_long_key_is_refused_before_any_parse(monkeypatch):
    """A p= over MAX_KEY_P_BYTES is refused on its length: dkimpy's parser (quadratic in the
    integers' length) never sees it."""
    def forbidden(*args, **kwargs):
        raise AssertionError("parsed")

    monkeypatch.setattr(dkim, "evaluate_pk", forbidden)
    record = b"v=DKIM1; k=rsa; p=" + b"A" * (MAX_KEY_P_BYTES + 1)
    assert key_problem(record) == (f"key too large: p= of {MAX_KEY_P_BYTES + 1} bytes "
                                   "(RFC 8301: keys up to 4096 bits)")


def test_the_worker_refuses_the_key_too(key, no_rsa):
    """The verification a worker process runs (its request handler, in this process) refuses
    an 8192-bit key the same way: large messages get no other path to dkimpy."""
    raw = signed_many(key, 1)
    head_end, body_start = dkim_verify.split_message(raw)
    name = "s0._domainkey.sender.test."
    request = {"job": "verify", "head_end": head_end, "body_start": body_start,
               "jobs": [[0, name, rsa_record(8192).decode("latin-1")]]}
    ((idx, result, reason),) = dkim_verify._handle(
        [request, raw[:body_start], raw[body_start:]])
    assert (idx, result) == (0, "permerror") and reason.startswith("key too large: 8192 bits")


def test_a_key_reply_over_8_kib_is_not_read_and_is_permanent(key):
    """A key record whose DNS reply is over 8 KiB is refused unread (the fake fails it as the
    client would), and is a permerror, not a temperror the sender would retry for days."""
    record = b"v=DKIM1; k=rsa; n=" + b"x" * 9000 + b"; p=" + rsa_record(1024).split(b"p=")[1]
    fact = run(serving(record), signed_many(key, 1))
    (sig,) = fact.signatures
    assert fact.result == "fail" and sig.result == "permerror"
    assert sig.reason.startswith("key record too large")
