"""Tests of the decision table (policyd_ipv6.decision): every row, with literal facts."""

import ipaddress

import pytest

from policyd_ipv6.facts import Facts, RdnsFact, RdnsOutcome, SpfFact
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.decision import DUNNO, RULES, Need, Policy, Subject, Verdict, decide
from policyd_ipv6.policy.replies import Replies

OPTIN = parse_optin("contoso.com\n.example.org\n")
POLICY = Policy(trusted_networks=(ipaddress.ip_network("2001:db8:ffff::/48"),))
ADDR = "2001:db8::25"

NO_PTR = (f"450 4.7.25 Service unavailable, sending IPv6 address [{ADDR}] must have reverse DNS"
          " record.")
NO_AUTH = (f"450 4.7.26 Service unavailable, message sent over IPv6 [{ADDR}] must pass either SPF"
           " or DKIM validation.")

PASS = RdnsFact(RdnsOutcome.PASS, ("mx.example.net",))
MISSING = RdnsFact(RdnsOutcome.MISSING)
UNCONFIRMED = RdnsFact(RdnsOutcome.UNCONFIRMED, ("mx.example.net",))
RDNS_TEMP = RdnsFact(RdnsOutcome.TEMPFAIL, detail="timeout")


def subject(**overrides) -> Subject:
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
             "client_address": ADDR, "helo_name": "mx.example.net",
             "sender": "alice@example.net", "recipient": "bob@contoso.com",
             "instance": "1.2.3.4", "sasl_username": ""}
    attrs.update(overrides)
    return Subject.from_request(attrs)


def verdict(s=None, rdns=None, spf=None, dkim_pending=False):
    return decide(s or subject(), Facts(rdns, spf, dkim_pending), POLICY, OPTIN)


@pytest.mark.parametrize("overrides, rule", [
    ({"protocol_state": "MAIL"}, "wrong-stage"),
    ({"protocol_state": "END-OF-MESSAGE"}, "wrong-stage"),
    ({"client_address": "unknown"}, "not-an-address"),
    ({"client_address": "192.0.2.10"}, "ipv4"),
    ({"client_address": "::ffff:192.0.2.10"}, "ipv4"),
    ({"sasl_username": "alice"}, "authenticated"),
    ({"client_address": "2001:db8:ffff::1"}, "trusted-network"),
    ({"recipient": "postmaster"}, "postmaster"),
    ({"recipient": "<PostMaster>"}, "postmaster"),
])
def test_not_applicable_requests_get_dunno_without_lookups(overrides, rule):
    """Requests outside the rules' scope are answered DUNNO before any fact is needed."""
    assert verdict(subject(**overrides)) == Verdict(DUNNO, rule)


def test_not_opted_in_gives_550_with_the_domain_as_written_lowercased():
    """A recipient domain not in the table gets 550 5.2.1 naming it, lower-case, no dot."""
    result = verdict(subject(recipient="Bob@Fabrikam.COM."))
    assert result == Verdict("550 5.2.1 Service unavailable, [fabrikam.com] does not accept "
                             "email over IPv6.", "not-opted-in")


def test_recipient_without_domain_other_than_postmaster_is_not_opted_in():
    """Only Postmaster is exempt (RFC 5321 §4.5.1); a bare "bob" is not in any opt-in table."""
    result = verdict(subject(recipient="bob"))
    assert result.rule == "not-opted-in" and "[bob]" in result.action
    assert verdict(subject(recipient='"bob@x"')).rule == "not-opted-in"


def test_not_opted_in_is_decided_before_any_lookup():
    """Rule 2 needs no DNS: the 550 comes even while rDNS and SPF are unknown."""
    assert verdict(subject(recipient="x@example.org")).rule == "not-opted-in"  # parent itself
    assert verdict(subject(recipient="x@a.example.org")) is Need.RDNS  # subdomain opted in


def test_opted_in_needs_rdns_first_then_spf():
    """For an opted-in domain the table asks for rDNS, then (once rDNS passes) for SPF."""
    assert verdict() is Need.RDNS
    assert verdict(rdns=PASS) is Need.SPF


@pytest.mark.parametrize("rdns, spf, expected, rule", [
    (RDNS_TEMP, None, "451 4.4.3", "rdns-temporary"),
    (RDNS_TEMP, SpfFact("fail"), "451 4.4.3", "rdns-temporary"),   # temp rDNS beats SPF fail
    (MISSING, None, NO_PTR, "no-rdns"),
    (MISSING, SpfFact("temperror"), NO_PTR, "no-rdns"),             # missing PTR beats SPF temp
    (UNCONFIRMED, SpfFact("pass"), NO_PTR, "no-rdns"),
    (PASS, SpfFact("temperror"), "451 4.4.3", "spf-temporary"),
    (PASS, SpfFact("fail"), NO_AUTH, "spf-failed"),
    (PASS, SpfFact("softfail"), NO_AUTH, "spf-failed"),
    (PASS, SpfFact("neutral"), NO_AUTH, "spf-failed"),
    (PASS, SpfFact("none"), NO_AUTH, "spf-failed"),
    (PASS, SpfFact("permerror"), NO_AUTH, "spf-failed"),
    (PASS, SpfFact("pass"), DUNNO, "pass"),
])
def test_fact_rows(rdns, spf, expected, rule):
    """Each combination of facts gives the reply of the first rule that applies."""
    result = verdict(rdns=rdns, spf=spf)
    assert isinstance(result, Verdict)
    assert result.rule == rule
    if expected == "451 4.4.3":
        assert result.action.startswith(expected)
    else:
        assert result.action == expected


def test_temporary_reply_names_the_check_and_is_4xx():
    """The 451 text names what failed and the address; it is never 5xx."""
    rdns = verdict(rdns=RDNS_TEMP).action
    spf = verdict(rdns=PASS, spf=SpfFact("temperror")).action
    assert "reverse DNS" in rdns and f"[{ADDR}]" in rdns
    assert "SPF" in spf
    assert rdns.startswith("451 4.4.3 ") and spf.startswith("451 4.4.3 ")


def test_spf_failure_waits_for_dkim_when_the_milter_is_in_the_path():
    """With the milter in the session's path SPF failure is DUNNO (DKIM decides at end of data)."""
    assert verdict(rdns=PASS, spf=SpfFact("fail"), dkim_pending=True) == Verdict(
        DUNNO, "spf-failed-dkim-pending")
    # but temporary SPF failures and missing PTRs are still refused at RCPT
    assert verdict(rdns=PASS, spf=SpfFact("temperror"), dkim_pending=True).rule == "spf-temporary"
    assert verdict(rdns=MISSING, dkim_pending=True).rule == "no-rdns"


def test_address_in_replies_is_rfc5952():
    """The client address in a reply is compressed and lower-case (RFC 5952)."""
    s = subject(client_address="2001:DB8:0:0:0:0:0:25")
    assert "[2001:db8::25]" in decide(s, Facts(MISSING), POLICY, OPTIN).action


def test_non_ascii_domain_in_reply_is_shown_as_a_labels():
    """A U-label recipient domain appears as its A-label form, keeping the reply ASCII."""
    result = verdict(subject(recipient="bob@bücher.example"))
    assert "[xn--bcher-kva.example]" in result.action
    assert result.action.isascii()


@pytest.mark.parametrize("domain", ["é" * 300, "\u4e2d" * 300, '"' * 300, "d" * 300,
                                    "\\" * 300 + ".example"])
def test_a_hostile_domain_keeps_the_refusal_within_400_characters(domain):
    """A recipient domain whose escaped form is longer than the domain (non-ASCII that has no
    A-labels, quotes, backslashes) is cut after escaping: the reply stays within the 400
    characters every template was checked for, ending in "...", ASCII only."""
    result = verdict(subject(recipient="bob@" + domain))
    assert result.rule == "not-opted-in"
    assert len(result.action) <= 400 and result.action.isascii()
    assert "...]" in result.action


def test_custom_reply_texts_are_used():
    """Replies from the configuration replace the defaults, with placeholders filled in."""
    policy = Policy(replies=Replies(not_opted_in="450 4.2.1 [{domain}] not over IPv6, use IPv4"))
    result = decide(subject(recipient="x@fabrikam.com"), Facts(), policy, OPTIN)
    assert result.action == "450 4.2.1 [fabrikam.com] not over IPv6, use IPv4"


def test_every_rule_is_reachable():
    """The table has no dead rows: each rule name is produced by some test case above."""
    assert [r.name for r in RULES] == [
        "wrong-stage", "not-an-address", "ipv4", "authenticated", "trusted-network",
        "postmaster", "tls-connector", "not-opted-in", "unlisted-ignored", "exempt-recipient",
        "rdns-temporary", "no-rdns", "spf-temporary", "no-rdns-dkim-pending",
        "no-rdns-unauthenticated",
        "spf-failed-dkim-pending", "spf-failed", "pass"]


def test_walk_resumed_at_fact_rules_gives_the_same_verdict():
    """Resuming at FACT_RULES after a Need gives what a walk from the start gives."""
    from policyd_ipv6.policy.decision import FACT_RULES

    assert all(not rule.needs for rule in RULES[:FACT_RULES]) and RULES[FACT_RULES].needs
    for rdns, spf in [(PASS, SpfFact("pass")), (MISSING, None), (PASS, SpfFact("fail")),
                      (RDNS_TEMP, None)]:
        facts = Facts(rdns, spf)
        assert decide(subject(), facts, POLICY, OPTIN, FACT_RULES) == decide(
            subject(), facts, POLICY, OPTIN)


def test_from_request_sets_every_field_as_the_constructor_does():
    """Subject.from_request (which fills the instance dict directly, for speed) gives a Subject
    equal to the dataclass constructor's, every field set, and still frozen."""
    import dataclasses

    attrs = {"protocol_state": "rcpt", "client_address": ADDR, "helo_name": "h.example",
             "sender": "a@b.example", "recipient": "c@Contoso.com.", "sasl_username": "u",
             "instance": "i", "reverse_client_name": "", "client_name": "mx.example",
             "ccert_fingerprint": "AB", "ccert_pubkey_fingerprint": "CD",
             "encryption_protocol": "TLSv1.3", "queue_id": "Q1"}
    built = Subject.from_request(attrs)
    expected = Subject(protocol_state="RCPT", client_address=ADDR,
                       ip=ipaddress.ip_address(ADDR), helo_name="h.example",
                       sender="a@b.example", recipient="c@Contoso.com.",
                       recipient_domain="contoso.com", sasl_username="u", instance="i",
                       reverse_client_name="unknown", client_name="mx.example",
                       ccert_fingerprint="AB", ccert_pubkey_fingerprint="CD",
                       encryption_protocol="TLSv1.3", queue_id="Q1")
    assert built == expected
    assert set(vars(built)) == {f.name for f in dataclasses.fields(Subject)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.sender = "x"  # type: ignore[misc]


def test_a_policys_walk_leaves_out_only_rules_that_cannot_apply():
    """Each policy walks only the rules whose option is on (decision.walk); for every policy
    in a grid of options on and off, and every request and facts below, the verdict (or Need)
    is the one the walk over every rule gives (and the same with the opt-in entry passed in),
    and with every option off the walk is shorter."""
    import itertools

    from policyd_ipv6.policy.decision import _STEPS, FACT_RULES, walk
    from policyd_ipv6.vocabulary import PolicyRule

    options = {
        "trusted_networks": ((), (ipaddress.ip_network("2001:db8::/64"),)),
        "exempt_client_certificates": ((), ("abcd",)),
        "unlisted_domains": ("refuse", "report", "ignore"),
        "exempt_recipients": ((), ("postmaster",)),
        "rdns_exempt_sender_domains": ((), ("example.net",)),
        "report_only_rules": (frozenset(), frozenset({PolicyRule.NOT_OPTED_IN}),
                              frozenset({PolicyRule.NO_RDNS})),
    }
    subjects = [subject(), subject(recipient="postmaster@contoso.com"),
                subject(recipient="x@fabrikam.com"), subject(ccert_fingerprint="AB:CD"),
                subject(client_address="192.0.2.1"), subject(sender="")]
    facts = [Facts(), Facts(MISSING), Facts(PASS), Facts(RDNS_TEMP),
             Facts(MISSING, SpfFact("pass")), Facts(MISSING, SpfFact("fail"), True),
             Facts(PASS, SpfFact("fail")), Facts(PASS, SpfFact("temperror")),
             Facts(UNCONFIRMED, SpfFact("softfail"))]
    for values in itertools.product(*options.values()):
        policy = Policy(**dict(zip(options, values)))
        every_rule = Policy(**dict(zip(options, values)))
        object.__setattr__(every_rule, "_walks", {0: _STEPS, FACT_RULES: _STEPS[FACT_RULES:]})
        for s, f in itertools.product(subjects, facts):
            for start in (0, policy.resume_at):
                verdict = decide(s, f, policy, OPTIN, start)
                assert verdict == decide(s, f, every_rule, OPTIN, start), (values, s, f, start)
                # the engine's call: the opt-in entry looked up once, passed in
                entry = OPTIN.entry(s.recipient_domain)
                assert decide(s, f, policy, OPTIN, start, entry) == verdict
    assert len(walk(Policy(exempt_recipients=()))) < len(RULES)


def test_a_resumed_walk_stops_at_the_first_need_while_that_fact_is_unknown():
    """The engine waits for the fact of the first walk's Need without walking again while that
    fact is unknown: for every policy of a grid, request and facts in which it is unknown,
    the walk resumed at ``resume_at`` gives that same Need."""
    import itertools

    from policyd_ipv6.vocabulary import PolicyRule

    options = {
        "unlisted_domains": ("refuse", "report", "ignore"),
        "exempt_recipients": ((), ("postmaster",)),
        "rdns_exempt_sender_domains": ((), ("example.net",)),
        "report_only_rules": (frozenset(), frozenset({PolicyRule.NO_RDNS}),
                              frozenset({PolicyRule.RDNS_TEMPORARY, PolicyRule.SPF_FAILED})),
    }
    subjects = [subject(), subject(recipient="postmaster@contoso.com"),
                subject(recipient="x@fabrikam.com"), subject(sender="")]
    facts = [Facts(), Facts(MISSING), Facts(PASS), Facts(RDNS_TEMP), Facts(None, SpfFact("pass")),
             Facts(None, SpfFact("fail"), True), Facts(None, SpfFact("temperror"))]
    waited = 0
    for values in itertools.product(*options.values()):
        policy = Policy(**dict(zip(options, values)))
        for s in subjects:
            first = decide(s, Facts(), policy, OPTIN)
            if not isinstance(first, Need):
                continue
            for f in facts:
                if (f.rdns if first is Need.RDNS else f.spf) is None:
                    waited += 1
                    assert decide(s, f, policy, OPTIN, policy.resume_at) is first, (values, s, f)
    assert waited > 100


def test_a_subject_from_a_request_has_every_field_and_defaults():
    """from_request fills every field of Subject: the copied attributes, the derived ip and
    recipient domain; missing attributes are empty ("unknown" for the client's names)."""
    import dataclasses

    from policyd_ipv6.policy.decision import _COPIED

    names = {f.name for f in dataclasses.fields(Subject)}
    assert names == set(_COPIED) | {"ip", "recipient_domain"}
    bare = Subject.from_request({"request": "smtpd_access_policy"})
    assert vars(bare).keys() == names
    assert (bare.protocol_state, bare.ip, bare.recipient_domain, bare.client_name,
            bare.reverse_client_name, bare.queue_id) == ("", None, None, "unknown", "unknown", "")
    full = Subject.from_request({"protocol_state": "rcpt", "client_address": "2001:db8::1",
                                 "recipient": "a@Contoso.com", "client_name": "",
                                 "reverse_client_name": "mx.example", "extra": "ignored"})
    assert (full.protocol_state, str(full.ip), full.recipient_domain, full.client_name,
            full.reverse_client_name) == ("RCPT", "2001:db8::1", "contoso.com", "unknown",
                                          "mx.example")
    assert full == Subject.from_request(dict(reversed(list({
        "protocol_state": "rcpt", "client_address": "2001:db8::1", "recipient": "a@Contoso.com",
        "client_name": "", "reverse_client_name": "mx.example"}.items()))))
