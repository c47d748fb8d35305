"""Tests of the rollout keys in the decision: report mode, report-only rules, unlisted domains,
per-entry options, exempt recipients, pinned client certificates and PTR-exempt senders."""

import ipaddress

import pytest
from test_decision import subject  # the same request, built one way

from policyd_ipv6.daemon.config import ConfigError, parse_config
from policyd_ipv6.daemon.wiring import policy_of
from policyd_ipv6.facts import Facts, RdnsFact, RdnsOutcome, SpfFact
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.decision import DUNNO, Need, Policy, Subject, Verdict, decide, rdns_mode
from policyd_ipv6.policy.engine import Outcome

OPTIN = parse_optin("contoso.com\n.example.org\nreport.example mode=report\n"
                    "enforce.example mode=enforce rdns=fcrdns\n")
ADDR = "2001:db8::25"
NOT_OPTED = "550 5.2.1 Service unavailable, [fabrikam.com] does not accept email over IPv6."
NO_PTR = (f"450 4.7.25 Service unavailable, sending IPv6 address [{ADDR}] must have reverse DNS"
          " record.")
NO_AUTH = (f"450 4.7.26 Service unavailable, message sent over IPv6 [{ADDR}] must pass either SPF"
           " or DKIM validation.")
RDNS_TEMP = (f"451 4.4.3 Service unavailable, temporary DNS failure while checking reverse DNS "
             f"for IPv6 address [{ADDR}], please try again later.")
SPF_TEMP = (f"451 4.4.3 Service unavailable, temporary DNS failure while checking SPF for IPv6 "
            f"address [{ADDR}], please try again later.")
PASS = RdnsFact(RdnsOutcome.PASS, ("mx.example.net",))
MISSING = RdnsFact(RdnsOutcome.MISSING)
TEMPFAIL = RdnsFact(RdnsOutcome.TEMPFAIL)
FP = "AB:" * 31 + "CD"  # as Postfix sends ccert_fingerprint (sha256 digest)
FP_PLAIN = FP.replace(":", "").lower()


def policy(text: str = "") -> Policy:
    """The decision's policy of a configuration text, as the daemon builds it."""
    return policy_of(parse_config(text))


def walk(p: Policy, s: Subject | None = None, rdns=None, spf=None, dkim_pending=False):
    return decide(s or subject(), Facts(rdns, spf, dkim_pending), p, OPTIN)


REFUSALS = [  # (recipient, rdns, spf, rule, reply): each refusal rule that applies
    ("bob@fabrikam.com", None, None, "not-opted-in", NOT_OPTED),
    ("bob@contoso.com", TEMPFAIL, None, "rdns-temporary", RDNS_TEMP),
    ("bob@contoso.com", MISSING, None, "no-rdns", NO_PTR),
    ("bob@contoso.com", PASS, SpfFact("temperror"), "spf-temporary", SPF_TEMP),
    ("bob@contoso.com", PASS, SpfFact("fail"), "spf-failed", NO_AUTH),
]


@pytest.mark.parametrize("recipient, rdns, spf, rule, reply", REFUSALS)
def test_report_mode_answers_dunno_and_carries_the_refusal(recipient, rdns, spf, rule, reply):
    """In report mode each refusal becomes DUNNO, rule= the refusing rule, would= its reply."""
    result = walk(policy('mode = "report"'), subject(recipient=recipient), rdns, spf)
    assert (result.action, result.rule, result.would) == (DUNNO, rule, reply)
    enforced = walk(policy(), subject(recipient=recipient), rdns, spf)
    assert (enforced.action, enforced.rule, enforced.would) == (reply, rule, "")


@pytest.mark.parametrize("recipient, rdns, spf, rule, reply", REFUSALS)
def test_a_report_only_rule_alone_is_only_reported(recipient, rdns, spf, rule, reply):
    """A report-only rule's refusal is logged as would= and the walk ends in DUNNO when no
    later rule refuses (opted-in facts that pass everything after it)."""
    p = policy(f'report_only_rules = ["{rule}"]\nunlisted_domains = "refuse"')
    if rule == "not-opted-in":
        assert walk(p, subject(recipient=recipient)) is Need.RDNS  # the walk goes on
        rdns, spf = PASS, SpfFact("pass")
    elif rule in ("rdns-temporary", "no-rdns"):
        assert walk(p, subject(recipient=recipient), rdns) is Need.SPF
        spf = SpfFact("pass")
    result = walk(p, subject(recipient=recipient), rdns, spf)
    # A temporary failure only reported is not turned into "no PTR" or "SPF failed" either.
    assert (result.action, result.rule, result.would) == (DUNNO, "pass", reply)


def test_report_only_rule_then_an_enforced_refusal_carries_both():
    """Only observing PTR while enforcing SPF: a missing PTR is noted, the SPF failure refuses."""
    p = policy('report_only_rules = ["no-rdns"]')
    result = walk(p, rdns=MISSING, spf=SpfFact("fail"))
    assert result == Verdict(NO_AUTH, "spf-failed", NO_PTR, frozenset({"no-rdns"}))
    assert walk(p, rdns=TEMPFAIL, spf=SpfFact("fail")).action.startswith("451 4.4.3")



def test_report_only_unlisted_domain_goes_on_to_the_other_rules():
    """not-opted-in report-only: the PTR and SPF rules still apply to the unlisted domain, and
    a walk resumed at policy.resume_at keeps the note."""
    p = policy('report_only_rules = ["not-opted-in"]')
    s = subject(recipient="bob@fabrikam.com")
    assert p.resume_at == 0
    result = walk(p, s, MISSING)
    assert (result.action, result.rule, result.would) == (NO_PTR, "no-rdns", NOT_OPTED)
    assert decide(s, Facts(MISSING), p, OPTIN, p.resume_at) == result
    assert policy().resume_at > 0


def test_report_mode_takes_precedence_over_report_only_rules():
    """In report mode the first refusal stops the walk, whatever report_only_rules says."""
    p = policy('mode = "report"\nreport_only_rules = ["no-rdns"]')
    result = walk(p, rdns=MISSING, spf=SpfFact("fail"))
    assert (result.action, result.rule, result.would) == (DUNNO, "no-rdns", NO_PTR)


def test_milter_pending_verdict_says_which_refusals_are_reported():
    """The DKIM-pending DUNNO tells the milter whether its 4.7.26 is only reported."""
    pending = walk(policy('mode = "report"'), rdns=PASS, spf=SpfFact("fail"), dkim_pending=True)
    assert pending.rule == "spf-failed-dkim-pending" and "spf-failed" in pending.reported
    enforce = walk(policy(), rdns=PASS, spf=SpfFact("fail"), dkim_pending=True)
    assert enforce.reported == frozenset()
    only = walk(policy('report_only_rules = ["spf-failed"]'), rdns=PASS, spf=SpfFact("fail"),
                dkim_pending=True)
    assert only.reported == frozenset({"spf-failed"}) and only.action == DUNNO


@pytest.mark.parametrize("value, first, rule, action, would", [
    ("refuse", "verdict", "not-opted-in", NOT_OPTED, ""),
    ("report", "verdict", "not-opted-in", DUNNO, NOT_OPTED),
    ("ignore", "verdict", "unlisted-ignored", DUNNO, ""),
    ("enforce", Need.RDNS, "no-rdns", NO_PTR, ""),
])
def test_unlisted_domains(value, first, rule, action, would):
    """Each unlisted_domains value: 550, DUNNO with would= the 550, DUNNO without lookups, or
    the PTR and SPF rules applied to a domain that is not listed."""
    p = policy(f'unlisted_domains = "{value}"')
    s = subject(recipient="bob@fabrikam.com")
    if first == "verdict":
        result = walk(p, s)  # decided with no facts: no lookups
    else:
        assert walk(p, s) is first
        result = walk(p, s, MISSING)
    assert (result.action, result.rule, result.would) == (action, rule, would)
    assert walk(p, s, PASS, SpfFact("pass")).action == (DUNNO if value != "refuse"
                                                        else NOT_OPTED)


def test_entry_mode_overrides_the_global_mode_both_ways():
    """mode=report on an entry reports under a global enforce; mode=enforce enforces under a
    global report."""
    reported = walk(policy(), subject(recipient="bob@report.example"), MISSING)
    assert (reported.action, reported.rule, reported.would) == (DUNNO, "no-rdns", NO_PTR)
    enforced = walk(policy('mode = "report"'), subject(recipient="bob@enforce.example"),
                    MISSING)
    assert (enforced.action, enforced.rule) == (NO_PTR, "no-rdns")
    plain = walk(policy('mode = "report"'), subject(recipient="bob@contoso.com"), MISSING)
    assert plain.action == DUNNO


# Postfix's internal form of RCPT TO:<"\"x\\"@DOMAIN> (smtpd.c extract_addr): the quotes
# are gone and the domain is what follows the last "@".
@pytest.mark.parametrize("config, domain", [
    ("", "contoso.com"),                             # taken as no domain: 550 5.2.1
    ('unlisted_domains = "ignore"', "contoso.com"),  # taken as no domain: DUNNO unchecked
    ('mode = "report"', "enforce.example"),          # taken as no domain: only reported
])
def test_internal_form_recipient_reaches_its_domains_entry(config, domain):
    """A recipient whose unquoted local part starts with a quote and ends in a backslash is
    judged by its domain's opt-in entry, like any other address at that domain."""
    s = subject(recipient=f'"x\\@{domain}')
    assert s.recipient_domain == domain
    assert walk(policy(config), s) is Need.RDNS
    result = walk(policy(config), s, MISSING)
    assert (result.action, result.rule, result.would) == (NO_PTR, "no-rdns", "")


def test_entry_rdns_option_chooses_the_reverse_dns_mode():
    """rdns=fcrdns on an entry is the mode the facts are gathered in; others use the key."""
    assert rdns_mode(subject(recipient="a@enforce.example"), OPTIN) == "fcrdns"
    assert rdns_mode(subject(recipient="a@contoso.com"), OPTIN) is None
    assert rdns_mode(subject(recipient="a@fabrikam.com"), OPTIN) is None


@pytest.mark.parametrize("recipient", ["postmaster@contoso.com", "<Abuse@Contoso.com>",
                                       "POSTMASTER@a.example.org"])
def test_exempt_recipients_by_default(recipient):
    """postmaster@ and abuse@ at an opted-in domain get DUNNO before any lookup, any case."""
    assert walk(policy(), subject(recipient=recipient)) == Verdict(DUNNO, "exempt-recipient")


def test_exempt_recipients_apply_where_the_rules_apply():
    """At an unlisted domain postmaster@ still gets the 550 (refuse), and is exempt when
    unlisted_domains = "enforce" makes the rules apply there."""
    s = subject(recipient="postmaster@fabrikam.com")
    assert walk(policy(), s).rule == "not-opted-in"
    assert walk(policy('unlisted_domains = "enforce"'), s).rule == "exempt-recipient"


def test_setting_exempt_recipients_replaces_the_default_but_not_bare_postmaster():
    """A configured list replaces postmaster/abuse; the bare Postmaster is always exempt."""
    p = policy('exempt_recipients = ["Hostmaster"]')
    assert walk(p, subject(recipient="hostmaster@contoso.com")).rule == "exempt-recipient"
    assert walk(p, subject(recipient="abuse@contoso.com")) is Need.RDNS
    none = policy("exempt_recipients = []")
    assert walk(none, subject(recipient="postmaster@contoso.com")) is Need.RDNS
    assert walk(none, subject(recipient="Postmaster")).rule == "postmaster"


@pytest.mark.parametrize("configured", [FP, FP_PLAIN, FP_PLAIN.upper()])
@pytest.mark.parametrize("attribute", ["ccert_fingerprint", "ccert_pubkey_fingerprint"])
def test_pinned_certificate_is_a_tls_connector(configured, attribute):
    """A fingerprint configured with or without colons, in any case, matched against either
    attribute exempts the client at any domain (before the opt-in rule)."""
    p = policy(f'exempt_client_certificates = ["{configured}"]')
    for recipient in ("bob@contoso.com", "bob@fabrikam.com"):
        s = subject(recipient=recipient, **{attribute: FP, "encryption_protocol": "TLSv1.3"})
        assert walk(p, s) == Verdict(DUNNO, "tls-connector")


def test_other_certificates_and_plaintext_are_not_exempt():
    """Another fingerprint, or none, leaves the rules in force."""
    p = policy(f'exempt_client_certificates = ["{FP}"]')
    other = "EF:" * 31 + "01"
    assert walk(p, subject(ccert_fingerprint=other)) is Need.RDNS
    assert walk(p, subject()) is Need.RDNS
    assert walk(policy(), subject(ccert_fingerprint=FP)) is Need.RDNS


@pytest.mark.parametrize("sender, spf, rule, action", [
    ("a@partner.example", SpfFact("pass"), "pass", DUNNO),
    ("a@partner.example", SpfFact("fail"), "no-rdns-unauthenticated", NO_PTR),
    ("a@out.sub.example", SpfFact("pass"), "pass", DUNNO),
    ("a@sub.example", SpfFact("pass"), "no-rdns", NO_PTR),  # .sub.example: subdomains only
    ("a@example.net", SpfFact("pass"), "no-rdns", NO_PTR),
    # Postfix's internal (unquoted) form of MAIL FROM:<"\"a\\"@partner.example>
    ('"a\\@partner.example', SpfFact("pass"), "pass", DUNNO),
    ('"a\\@partner.example', SpfFact("fail"), "no-rdns-unauthenticated", NO_PTR),
])
def test_rdns_exempt_sender_domains_need_spf_to_pass(sender, spf, rule, action):
    """A listed sender without PTR goes on only when SPF passes; entries match like opt-in
    entries."""
    p = policy('rdns_exempt_sender_domains = ["partner.example", ".sub.example"]')
    result = walk(p, subject(sender=sender), MISSING, spf)
    assert (result.rule, result.action) == (rule, action)
    if rule == "no-rdns-unauthenticated":  # a listed sender needs SPF before the PTR rule
        assert walk(p, subject(sender=sender), MISSING) is Need.SPF


def test_rdns_exempt_sender_failing_spf_is_reported_as_no_rdns():
    """report_only_rules no-rdns covers the PTR-exempt sender's refusal too."""
    p = policy('rdns_exempt_sender_domains = ["partner.example"]\n'
               'report_only_rules = ["no-rdns"]')
    result = walk(p, subject(sender="a@partner.example"), MISSING, SpfFact("fail"))
    assert (result.action, result.would) == (NO_AUTH, NO_PTR)


@pytest.mark.parametrize("text, named", [
    ('mode = "dry-run"', 'mode = "dry-run"'),
    ('report_only_rules = ["pass"]', 'report_only_rules = "pass"'),
    ('report_only_rules = ["spf-failed-dkim-pending"]', "spf-failed-dkim-pending"),
    ('report_only_rules = "no-rdns"', "report_only_rules"),
    ('unlisted_domains = "accept"', 'unlisted_domains = "accept"'),
    ('exempt_recipients = ["postmaster@example.com"]', "exempt_recipients"),
    ('exempt_recipients = [""]', "exempt_recipients"),
    ('exempt_client_certificates = ["AB:CD"]', "exempt_client_certificates"),
    ('exempt_client_certificates = ["' + "x" * 64 + '"]', "exempt_client_certificates"),
    ('rdns_exempt_sender_domains = ["not a domain"]', "rdns_exempt_sender_domains"),
    ("spf_void_limit = 1", "spf_void_limit = 1"),
    ("spf_void_limit = 21", "spf_void_limit = 21"),
])
def test_bad_rollout_values_stop_the_daemon_naming_the_key(text, named):
    """An unknown rule name or a value out of range is a configuration error naming it."""
    with pytest.raises(ConfigError) as error:
        parse_config(text)
    assert named in str(error.value)


def test_rollout_keys_have_the_documented_defaults():
    """EOP's behaviour is the default: enforce, nothing report-only, unlisted refused."""
    p = policy()
    assert (p.mode, p.report_only_rules, p.unlisted_domains) == ("enforce", frozenset(),
                                                                 "refuse")
    assert p.exempt_recipients == ("postmaster", "abuse")
    assert p.exempt_client_certificates == () and p.rdns_exempt_sender_domains == ()
    assert parse_config("").spf_void_limit == 2


def _line(verdict: Verdict, **attrs) -> str:
    return Outcome(verdict, subject(**attrs), Facts(MISSING), "new", 1.0).log_line()


def test_log_line_carries_would_beside_rule_and_tls_only_for_tls_sessions():
    """would="..." follows rule=; tls= names the protocol of a TLS session, absent otherwise."""
    line = _line(Verdict(DUNNO, "no-rdns", NO_PTR), encryption_protocol="TLSv1.3")
    assert f'rule=no-rdns would="{NO_PTR}" reply="DUNNO" tls=TLSv1.3 ' in line
    plain = _line(Verdict(NO_PTR, "no-rdns"))
    assert "would=" not in plain and "tls=" not in plain


def test_trusted_network_still_comes_first_in_report_mode():
    """Report mode changes refusals only: trusted clients are DUNNO with no would=."""
    p = Policy(trusted_networks=(ipaddress.ip_network("2001:db8::/32"),), mode="report")
    assert walk(p) == Verdict(DUNNO, "trusted-network",
                              reported=frozenset(p.report_only_rules) | _all_kinds())


def _all_kinds():
    from policyd_ipv6.vocabulary import REPORTABLE_RULES
    return frozenset(REPORTABLE_RULES)


def test_rdns_exempt_sender_with_the_milter_waits_for_its_dkim():
    """With the milter on the connection, a listed sender without PTR failing SPF is let
    through RCPT for the milter to look for its domain's DKIM signature; one that passes SPF
    needs nothing more."""
    p = policy('rdns_exempt_sender_domains = ["partner.example"]')
    s = subject(sender="a@partner.example")
    pending = walk(p, s, MISSING, SpfFact("fail"), dkim_pending=True)
    assert (pending.action, pending.rule) == (DUNNO, "no-rdns-dkim-pending")
    assert walk(p, s, MISSING, SpfFact("pass"), dkim_pending=True).rule == "pass"
    assert walk(p, subject(), MISSING, dkim_pending=True).rule == "no-rdns"
