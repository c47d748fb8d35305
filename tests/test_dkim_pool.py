"""Tests of the bounded DKIM work (policyd_ipv6.checks.dkim_verify, dkim_pool, dkim): the
RFC 8301 / RFC 6376 acceptance rules, the signature and body caps, the linear relaxed
canonicalisation, the memory of one verification, and the worker processes (killed, hung,
queue full)."""

import os
import signal
import subprocess
import sys
import tracemalloc

import dkim
import pytest
from dkimkeys import DkimKey, message, require_openssl
from test_dkim_check import lookups_with, published, run
from twisted.internet import defer

from policyd_ipv6.checks import dkim_verify
from policyd_ipv6.checks.dkim import MAX_BODY_BYTES, check_dkim
from policyd_ipv6.checks.dkim_pool import DkimPool, WorkerLost


@pytest.fixture(scope="module")
def key():
    require_openssl()
    return DkimKey.generate(1024)


def signed(raw, key, domain="sender.test", selector="lab", **options):
    options.setdefault("canonicalize", (b"relaxed", b"relaxed"))
    options.setdefault("include_headers", [b"from", b"to", b"subject"])
    return dkim.sign(raw, selector.encode(), domain.encode(), key.private_pem,
                     **options) + raw


def job(key, raw, idx=0, selector="lab", domain="sender.test", record=None):
    head_end, body_start = dkim_verify.split_message(raw)
    name = f"{selector}._domainkey.{domain}.".encode()
    record = (record or key.record()).encode()
    return dkim_verify.verify_all(raw[:head_end], raw[body_start:], [(idx, name, record)])[idx]


# -- RFC 8301 and RFC 6376 acceptance rules ---------------------------------------------------

def test_rsa_sha1_is_not_a_pass_and_costs_no_lookup(key):
    """A valid a=rsa-sha1 signature is "policy" (RFC 8301), and its key is never fetched."""
    lookups, fake = lookups_with(published(key))
    raw = signed(message(), key, signature_algorithm=b"rsa-sha1")
    assert job(key, raw) == ("pass", "")  # dkimpy alone would accept it
    fact = run(lookups, raw)
    assert fact.result == "fail" and fact.signatures[0].result == "policy"
    assert "RFC 8301" in fact.signatures[0].reason and fake.queries == []


def test_a_key_in_testing_mode_counts_as_unsigned(key):
    """A valid signature whose key has t=y is not a pass: the message counts as unsigned."""
    record = "v=DKIM1; k=rsa; t=y; p=" + key.public_b64
    lookups, _ = lookups_with({("lab._domainkey.sender.test", "TXT"): [f'"{record}"']})
    fact = run(lookups, signed(message(), key))
    assert fact.result == "none" and fact.signatures[0].result == "policy"
    assert "t=y" in fact.signatures[0].reason


def test_l_shorter_than_the_body_is_not_a_pass_and_l_equal_to_it_is(key):
    """l= covering less than the canonical body is "policy"; l= covering all of it passes."""
    raw = message(body=b"Signed part.\r\n")
    whole = signed(raw, key, length=True)
    assert job(key, whole) == ("pass", "")
    appended = whole + b"Appended by someone else.\r\n"
    result, reason = job(key, appended)
    assert result == "policy" and "l=14" in reason
    lookups, _ = lookups_with(published(key))
    assert run(lookups, appended).result == "fail"


# -- caps --------------------------------------------------------------------------------------

def test_a_body_over_the_cap_is_not_verified_and_not_a_pass(key):
    """A body over MAX_BODY_BYTES is not handed to dkimpy: "policy", never pass or temperror."""
    body = (b"y" * 78 + b"\r\n") * (MAX_BODY_BYTES // 80 + 10)
    raw = signed(message(body=body), key)
    assert job(key, raw) == ("pass", "")  # it would verify
    lookups, fake = lookups_with(published(key))
    fact = run(lookups, raw)
    assert fact.result == "fail" and fact.signatures[0].result == "policy"
    assert "MiB" in fact.signatures[0].reason and fake.queries == []


def test_relaxed_pre_collapse_keeps_results_and_is_linear(key, monkeypatch):
    """Whitespace-heavy and normal signed mail verify the same with the pre-collapse, for
    relaxed and simple bodies, and 1 MB of 990-space lines verifies in well under a second."""
    import time

    heavy = (b" " * 990 + b"x\r\n" + b"\t \t" * 300 + b"\r\n") * 40
    for body in (b"Hello.\r\n", b"a  b\t\tc \r\n\r\n\r\n", heavy):
        for canon in ((b"relaxed", b"relaxed"), (b"simple", b"simple"), (b"simple", b"relaxed")):
            raw = signed(message(body=body), key, canonicalize=canon)
            assert job(key, raw) == ("pass", ""), (canon, body[:20])
            altered = raw.replace(b"x\r\n", b"y\r\n", 1) if body is heavy else raw + b"z\r\n"
            assert job(key, altered)[0] == "fail"
    for body in (b"a  b \r\nc\t\r\n", heavy):
        relaxed = dkim.canonicalization.Relaxed.canonicalize_body
        assert relaxed(dkim_verify.collapse_wsp(body)) == relaxed(body)
    with monkeypatch.context() as patched:  # dkimpy would sign 1 MB of this for seconds
        patched.setattr(dkim.canonicalization.Relaxed, "canonicalize_body",
                        staticmethod(dkim_verify.relaxed_body))
        raw = signed(message(body=heavy * 20), key)
    start = time.process_time()
    assert job(key, raw) == ("pass", "")
    assert time.process_time() - start < 0.5


def test_the_linear_relaxed_canonicalisation_is_dkimpys_byte_for_byte():
    """relaxed_body equals dkimpy's Relaxed.canonicalize_body on tricky bodies, including
    pieces cut inside long whitespace runs, bare CRs and trailing empty lines."""
    import random

    original = dkim.canonicalization.Relaxed.canonicalize_body
    rng = random.Random(8301)
    alphabet = [b" ", b"\t", b"\r\n", b"\r", b"a", b"  \t ", b"\r\n\r\n"]
    bodies = [b"", b"\r\n", b" \r\n", b"x", b"a \t b\t\r\n\r\n\r\n", b" " * 5_000,
              (b"w " * 40_000 + b"\t" * 3_000 + b"\r\n") * 3]
    bodies += [b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 400)))
               for _ in range(300)]
    bodies += [b"".join(rng.choice(alphabet) * rng.randrange(1, 900) for _ in range(40))
               for _ in range(10)]
    for body in bodies:
        assert dkim_verify.relaxed_body(body) == original(body), body[:40]


def test_one_verification_holds_at_most_four_times_the_message(key, monkeypatch):
    """Peak memory allocated by one worker job (linear relaxed canonicalisation installed)
    on a 2 MB message with three signatures, relaxed and simple, stays under four times the
    message size."""
    monkeypatch.setattr(dkim.canonicalization.Relaxed, "canonicalize_body",
                        staticmethod(dkim_verify.relaxed_body))
    body = (b"word " * 15 + b" " * 200 + b"\r\n") * 7000
    raw = signed(message(body=body), key)
    raw = signed(raw, key, selector="two", canonicalize=(b"simple", b"simple"))
    raw = signed(raw, key, selector="three")
    head_end, body_start = dkim_verify.split_message(raw)
    request = {"job": "verify", "head_end": head_end, "body_start": body_start,
               "jobs": [[i, f"{s}._domainkey.sender.test.", key.record()]
                        for i, s in enumerate(("three", "two", "lab"))]}
    received = [request, raw[:body_start], raw[body_start:]]
    size = len(raw)
    del raw, body
    tracemalloc.start()
    try:
        answer = dkim_verify._handle(received)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [result for _, result, _ in answer] == ["pass", "pass", "pass"]
    assert peak <= 4 * size, f"peak {peak} for a {size}-byte message"


@pytest.mark.process
def test_the_worker_module_loads_no_twisted():
    """dkim_verify, which the workers run, imports neither Twisted nor the rest of the daemon."""
    probe = ("import sys; import policyd_ipv6.checks.dkim_verify; "
             "print(sorted(m for m in sys.modules if m.startswith(('twisted', 'policyd_ipv6.'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    assert out.strip() == "['policyd_ipv6.checks', 'policyd_ipv6.checks.dkim_verify']"


# -- the worker pool (real processes, the real reactor) ----------------------------------------

def big_signed(key, megabytes=3, signatures=5):
    raw = message(body=(b"z" * 78 + b"\r\n") * (megabytes * 13000))
    for n in range(signatures):
        raw = signed(raw, key, selector=f"s{n}")
    return raw


def pool_records(key, count=5):
    records = {}
    for n in range(count):
        records.update(published(key, f"s{n}"))
    return records


def waited(deferred, timeout=30.0):
    from realtime import wait

    return wait(deferred, timeout)


@pytest.mark.process
def test_a_worker_killed_mid_job_gives_temperror_and_the_pool_recovers(key):
    """SIGKILL of the worker during a job: the message's DKIM is temperror (451 4.4.3, never
    accept), a new worker is started and the next message verifies."""
    from twisted.internet import reactor

    pool = DkimPool(reactor, workers=1, queue_limit=4, deadline_seconds=30)
    pool.start()
    try:
        lookups, _ = lookups_with(pool_records(key))
        raw = big_signed(key)
        doomed = check_dkim(lookups, raw, pool)
        pid = pool.workers[0].transport.pid
        os.kill(pid, signal.SIGKILL)
        fact = waited(doomed)
        assert fact.result == "temperror" and "DKIM verification failed" in fact.reason
        assert pool.restarts == 1
        assert waited(check_dkim(lookups, raw, pool)).result == "pass"
        assert pool.workers[0].transport.pid != pid
    finally:
        pool.stop()


@pytest.mark.process
def test_a_hung_job_is_killed_at_the_deadline(key):
    """A job over the deadline fails with WorkerLost and its worker is replaced."""
    from twisted.internet import reactor

    pool = DkimPool(reactor, workers=1, queue_limit=1, deadline_seconds=0.05)
    pool.start()
    try:
        raw = big_signed(key)
        head_end, body_start = dkim_verify.split_message(raw)
        request = {"job": "verify", "head_end": head_end, "body_start": body_start,
                   "jobs": [[n, f"s{4 - n}._domainkey.sender.test.", key.record()]
                            for n in range(5)]}
        with pytest.raises(WorkerLost, match="no answer within"):
            waited(pool.submit(request, raw))
        pool.deadline_seconds = 30
        waited(defer.Deferred().addTimeout(1.5, reactor).addErrback(lambda _: None))
        assert pool.restarts == 1 and len(pool.workers) == 1
        assert [r for _, r, _ in waited(pool.submit(request, raw))] == ["pass"] * 5
    finally:
        pool.stop()


@pytest.mark.process
def test_a_full_queue_is_a_temporary_result(key):
    """With every worker busy and the queue full, the next message's DKIM is temperror at
    once ("queue full"); the queued ones still verify."""
    from twisted.internet import reactor

    pool = DkimPool(reactor, workers=1, queue_limit=1, deadline_seconds=30)
    pool.start()
    try:
        lookups, _ = lookups_with(pool_records(key, 1))
        raw = big_signed(key, megabytes=2, signatures=1)
        first, second = check_dkim(lookups, raw, pool), check_dkim(lookups, raw, pool)
        third = run(lookups, raw, pool=pool)  # fires at once
        assert third.result == "temperror" and third.reason == "DKIM verification queue full"
        assert [f.result for f in waited(defer.gatherResults([first, second]))] == ["pass"] * 2
    finally:
        pool.stop()
