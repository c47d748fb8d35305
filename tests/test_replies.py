"""Tests of the reply templates' validation (policyd_ipv6.policy.replies): what an override
may contain, the 400-character bound on the rendered reply, and the shipped templates."""

import os
import re
import string
import tomllib
from dataclasses import fields

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from policyd_ipv6.daemon.config import parse_config
from policyd_ipv6.facts import Facts, RdnsFact, RdnsOutcome
from policyd_ipv6.optin.table import parse_optin
from policyd_ipv6.policy.decision import Policy, Subject, Verdict, decide
from policyd_ipv6.policy.replies import (
    CHECKS,
    LONGEST,
    MAX_TEMPLATE,
    PLACEHOLDERS,
    Replies,
    validate_reply,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = ("policyd_ipv6/sample/policyd-ipv6.toml", "postfix-examples/policyd-ipv6.toml")


@pytest.mark.parametrize("key, template, words", [
    ("no_reverse_dns", "450 4.7.25 no PTR for [{address:d}].", ["{address:d}", "bare name"]),
    ("not_opted_in", "550 5.2.1 [{domain:{address}}] no IPv6.", ["{domain:{address}}"]),
    ("not_opted_in", "550 5.2.1 [{domain:>3000}] no IPv6.", ["{domain:>3000}", "format spec"]),
    ("auth_failed", "450 4.7.26 [{address!r}] failed.", ["{address!r}", "conversion"]),
    ("temporary", "451 4.4.3 {check!s:^20} for [{address}].", ["{check!s:^20}"]),
    ("not_opted_in", "550 5.2.1 [{domain[0]}] no IPv6.", ["{domain[0]}", "index"]),
    ("not_opted_in", "550 5.2.1 [{domain.upper}] no IPv6.", ["{domain.upper}", "attribute"]),
    ("not_opted_in", "550 5.2.1 [{domain] no IPv6.", ["placeholder syntax", "{{"]),
    ("not_opted_in", "550 5.2.1 [domain}] no IPv6.", ["placeholder syntax", "}}"]),
    ("not_opted_in", "550 5.2.1 [{domain!}] no IPv6.", ["placeholder syntax"]),
    ("not_opted_in", "550 5.2.1 [{}] no IPv6.", ["unknown placeholder {}"]),
    ("not_opted_in", "550 5.2.1 [{0}] no IPv6.", ["unknown placeholder {0}"]),
    ("not_opted_in", "550 5.2.1 [{address}] no IPv6.", ["unknown placeholder {address}"]),
])
def test_placeholder_other_than_a_bare_allowed_name_is_refused(key, template, words):
    """A format spec, conversion, index, attribute, stray brace or foreign name is refused
    with a message naming the key and the template."""
    with pytest.raises(ValueError) as info:
        validate_reply(f"replies.{key}", template, temporary=(key == "temporary"))
    message = str(info.value)
    assert message.startswith(f"replies.{key} = {template!r}: ")
    for word in words:
        assert word in message


def test_literal_braces_written_doubled_are_accepted():
    """{{ and }} are a literal brace, which renders without error."""
    template = "550 5.2.1 {{IPv6}} refused for [{domain}]."
    assert validate_reply("not_opted_in", template) == template
    assert template.format(domain="contoso.com") == "550 5.2.1 {IPv6} refused for [contoso.com]."


@pytest.mark.parametrize("key, template", [
    ("not_opted_in", "550 5.2.1 [{domain}] and again [{domain}] do not accept IPv6."),
    ("temporary", "451 4.4.3 " + "x" * 310 + " [{address}] {check}"),
    ("auth_failed", "450 4.7.26 " + "y" * 325 + " [{address}]"),
])
def test_template_under_400_that_renders_over_400_is_refused(key, template):
    """The bound applies to the reply rendered with the longest values the daemon fills in,
    not only to the template."""
    assert len(template) <= MAX_TEMPLATE
    with pytest.raises(ValueError) as info:
        validate_reply(f"replies.{key}", template, temporary=(key == "temporary"))
    assert f"replies.{key} = " in str(info.value)
    assert "renders to" in str(info.value) and f"at most {MAX_TEMPLATE}" in str(info.value)


def test_template_that_renders_to_exactly_400_is_accepted():
    """A reply that fills the bound exactly with the longest domain is accepted; one more
    character is refused."""
    head, tail = "550 5.2.1 [", "] no IPv6."
    room = MAX_TEMPLATE - len(head) - len(tail) - len(LONGEST["domain"])
    template = head + "z" * room + "{domain}" + tail
    assert len(template.format(domain=LONGEST["domain"])) == MAX_TEMPLATE
    assert validate_reply("not_opted_in", template) == template
    with pytest.raises(ValueError, match="renders to 401"):
        validate_reply("not_opted_in", head + "z" * (room + 1) + "{domain}" + tail)


_PIECES = st.one_of(
    st.text(alphabet=string.ascii_letters + " .[]:!>0123456789", max_size=12),
    st.sampled_from(["{domain}", "{address}", "{check}", "{domain:>300}", "{address!r}",
                     "{check:d}", "{domain[0]}", "{address.upper}", "{{", "}}", "{", "}",
                     "{domain:{address}}", "{address:{check}}", "{domain!s:^200}"]),
)


@given(key=st.sampled_from(sorted(PLACEHOLDERS)), pieces=st.lists(_PIECES, max_size=12))
@example(key="not_opted_in", pieces=["{domain:{address}}"])
@example(key="not_opted_in", pieces=["{domain:>300}", "{domain:>300}"])
@example(key="no_reverse_dns", pieces=["[{address:d}]"])
def test_every_accepted_template_renders_within_the_bound(key, pieces):
    """Whatever template validate_reply accepts renders without error and within 400
    characters for any values no longer than the longest the daemon fills in."""
    template = ("451 4.4.3 " if key == "temporary" else "550 5.2.1 ") + "".join(pieces)
    try:
        validate_reply(key, template, temporary=(key == "temporary"))
    except ValueError:
        return
    for values in ({name: LONGEST[name] for name in PLACEHOLDERS[key]},
                   {name: "" for name in PLACEHOLDERS[key]}):
        assert len(template.format(**values)) <= MAX_TEMPLATE


def test_shipped_default_templates_pass():
    """Each default reply text passes the validation an override must pass."""
    for field in fields(Replies):
        validate_reply(f"replies.{field.name}", field.default,
                       temporary=(field.name == "temporary"))


@pytest.mark.parametrize("path", SAMPLES)
def test_sample_configurations_reply_templates_load(path):
    """The commented [replies] block of each shipped configuration, uncommented, loads."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    block = text[text.index("#[replies]"):]
    uncommented = "".join(line[1:] + "\n" for line in block.splitlines()
                          if line.startswith("#") and not line.startswith("# "))
    assert "[replies]" in uncommented and uncommented.count(" = ") == len(fields(Replies))
    assert parse_config(uncommented, "/etc").replies == Replies()


def test_man_page_example_reply_loads():
    """The [replies] of policyd-ipv6.toml(5)'s EXAMPLE section loads."""
    with open(os.path.join(ROOT, "policyd_ipv6/man/policyd-ipv6.toml.5"), encoding="utf-8") as f:
        man = f.read()
    example = man[man.index(".SH EXAMPLE"):man.index(".SH FILES")]
    table = example[example.index("[replies]"):example.index(".RE")].replace("\\-", "-")
    assert tomllib.loads(table)["replies"]  # the block is TOML once roff escapes are undone
    parse_config(table, "/etc")


def test_every_check_value_rendered_is_one_validation_tries():
    """The {check} texts the decision and the milter fill in are the ones in CHECKS, so the
    longest is what the bound is checked with."""
    package = os.path.join(ROOT, "policyd_ipv6")
    seen = set()
    for folder, _, names in os.walk(package):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    seen.update(re.findall(r'\bcheck="([^"]*)"', f.read()))
    assert seen and seen <= set(CHECKS)
    assert len(LONGEST["check"]) == max(len(c) for c in CHECKS)


def test_the_decisions_longest_domain_and_address_fit_the_longest_values():
    """The recipient domain and client address a refusal renders are no longer than the
    values the validation renders with."""
    replies = Replies(not_opted_in="550 5.2.1 {domain}", no_reverse_dns="450 4.7.25 {address}")
    policy = Policy(replies=replies)
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
             "client_address": "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
             "helo_name": "mx.example.net", "sender": "a@example.net",
             "recipient": "bob@" + "a" * 2000 + ".example", "instance": "1", "sasl_username": ""}
    optin = parse_optin("contoso.com\n")
    result = decide(Subject.from_request(attrs), Facts(None, None, False), policy, optin)
    assert isinstance(result, Verdict) and result.rule == "not-opted-in"
    assert len(result.action) == len("550 5.2.1 ") + len(LONGEST["domain"])
    attrs["recipient"] = "bob@contoso.com"
    result = decide(Subject.from_request(attrs), Facts(RdnsFact(RdnsOutcome.MISSING), None,
                                                       False), policy, optin)
    assert isinstance(result, Verdict) and result.rule == "no-rdns"
    assert len("450 4.7.25 ") + 39 == len(result.action) <= len("450 4.7.25 ") + len(
        LONGEST["address"])


def test_man_page_states_the_longest_values():
    """policyd-ipv6.toml(5) gives the lengths the bound is checked with."""
    with open(os.path.join(ROOT, "policyd_ipv6/man/policyd-ipv6.toml.5"), encoding="utf-8") as f:
        man = " ".join(f.read().split())
    for name, value in LONGEST.items():
        assert re.search(rf"\.B {{{name}}} of {len(value)}\b", man), name
