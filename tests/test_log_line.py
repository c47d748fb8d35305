"""The decision log line's fast path (every value plain and within its bound) writes exactly
what the general, escaping path writes, and hands everything else to that path."""

from hypothesis import given, settings
from hypothesis import strategies as st
from test_decision import subject

from policyd_ipv6.facts import Facts, RdnsFact, RdnsOutcome, SpfFact
from policyd_ipv6.policy.decision import DUNNO, Verdict
from policyd_ipv6.policy.engine import Outcome
from policyd_ipv6.vocabulary import PolicyRule, SpfResult

FACTS = (Facts(), Facts(RdnsFact(RdnsOutcome.MISSING)),
         Facts(RdnsFact(RdnsOutcome.PASS, ("mx.example",), "mx.example", "ok"),
               SpfFact(SpfResult.PASS, "", "a@example")))
VERDICTS = (Verdict(DUNNO, PolicyRule.PASS),
            Verdict(DUNNO, PolicyRule.NO_RDNS, "450 4.7.25 x"),
            Verdict("550 5.2.1 Service unavailable, [x.example] does not accept email over IPv6.",
                    PolicyRule.NOT_OPTED_IN))
# Values at their bounds and one past, plain and with what must be escaped.
TEXT = st.one_of(st.sampled_from(["", "a" * 20, "a" * 21, "a" * 40, "a" * 41, "b" * 64,
                                  "b" * 65, "c" * 100, "c" * 101, "d" * 200, "d" * 201,
                                  'q"uote', "back\\slash", "t\tab", "é", "\x00", "a b"]),
                 st.text(max_size=220))
# Mostly plain values within every bound, so that many examples take the fast path.
PLAIN = st.text(alphabet=[chr(c) for c in range(0x21, 0x7f) if chr(c) not in '"\\'],
                min_size=1, max_size=20)
FIELD = st.one_of(PLAIN, PLAIN, PLAIN, TEXT)


@settings(max_examples=400, deadline=None)
@given(client=FIELD, helo=FIELD, sender=FIELD, recipient=FIELD, instance=FIELD, tls=FIELD,
       queue_id=FIELD, facts=st.sampled_from(FACTS), verdict=st.sampled_from(VERDICTS))
def test_fast_path_writes_what_the_escaping_path_writes(client, helo, sender, recipient,
                                                       instance, tls, queue_id, facts,
                                                       verdict):
    """For any values, log_line() equals the general escaping path's line."""
    s = subject(client_address=client, helo_name=helo, sender=sender, recipient=recipient,
                instance=instance, encryption_protocol=tls, queue_id=queue_id)
    outcome = Outcome(verdict, s, facts, "new", 1.25)
    assert outcome.log_line() == outcome._log_line_escaped()


def test_plain_values_take_the_fast_path_and_others_do_not(monkeypatch):
    """A request of plain values never calls the escaping path; a value past its bound or
    with a quote does (so the equality above is not the escaping path against itself)."""
    calls = []
    original = Outcome._log_line_escaped

    def spy(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(Outcome, "_log_line_escaped", spy)
    plain = Outcome(VERDICTS[1], subject(instance="3e8.1.2.3", queue_id="4ABC",
                                         encryption_protocol="TLSv1.3"), FACTS[2], "new", 2.0)
    line = plain.log_line()
    assert line == original(plain)
    assert calls == [] and 'would="450 4.7.25 x"' in line and "queue_id=4ABC" in line
    for hostile in ({"sender": 'a"b@example'}, {"helo_name": "h" * 101},
                    {"instance": ""}):
        Outcome(VERDICTS[0], subject(**hostile), FACTS[0], "none", 0.0).log_line()
    assert len(calls) == 3
