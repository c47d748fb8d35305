"""The shared vocabulary: enum members read exactly as the plain strings they replaced."""

import pytest
from twisted.logger import formatEvent

from policyd_ipv6 import vocabulary
from policyd_ipv6.policy.decision import RULES
from policyd_ipv6.vocabulary import DkimResult, DnsStatus, EndRule, PolicyRule, SpfResult

MEMBERS = [member for enum in (DnsStatus, SpfResult, DkimResult, PolicyRule, EndRule)
           for member in enum]


@pytest.mark.parametrize("member", MEMBERS, ids=str)
def test_member_formats_as_its_value_everywhere_a_log_line_is_built(member) -> None:
    """str(), f-strings, %-formatting and Twisted's log formatting all give the bare value."""
    value = member.value
    assert member == value and hash(member) == hash(value)
    assert str(member) == f"{member}" == "%s" % member == format(member) == value
    assert formatEvent({"log_format": "rule={rule}", "rule": member}) == f"rule={value}"


def test_decision_table_names_are_the_policy_rules() -> None:
    """Each line of the decision table has its own PolicyRule, and each PolicyRule a line."""
    names = [rule.name for rule in RULES]
    assert all(isinstance(name, PolicyRule) for name in names)
    assert sorted(names) == sorted(PolicyRule)


def test_spf_results_are_rfc_7208_section_2_6() -> None:
    """The SPF results are exactly RFC 7208's seven."""
    assert {r.value for r in SpfResult} == {"pass", "fail", "softfail", "neutral", "none",
                                            "permerror", "temperror"}


def test_collaborator_protocols_are_runtime_free() -> None:
    """The collaborator protocols are plain typing.Protocols (nothing to instantiate)."""
    for name in ("Clock", "DelayedCall", "DnsClient", "Lookups"):
        with pytest.raises(TypeError):
            getattr(vocabulary, name)()
