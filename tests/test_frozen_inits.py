"""The hand-written ``__init__`` of the frozen dataclasses built on the cold path.

``spf_terms.Mechanism``, ``facts.Facts`` and ``engine.Outcome`` store their fields in the
instance's dict themselves (the generated ``__init__`` of a frozen dataclass sets each through
``object.__setattr__``, twice the cost). These tests hold each to what the dataclass would
generate: the same parameters in the order of the fields, with the same defaults; every field
set, nothing else; still frozen, equal and hashed by value.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from policyd_ipv6.checks.spf_terms import Mechanism
from policyd_ipv6.facts import Facts, RdnsFact, RdnsOutcome, SpfFact
from policyd_ipv6.policy.decision import Subject, Verdict
from policyd_ipv6.policy.engine import Outcome
from policyd_ipv6.vocabulary import PolicyRule, SpfResult

pytestmark = pytest.mark.unit

SUBJECT = Subject.from_request({"recipient": "a@contoso.com", "client_address": "2001:db8::1"})
EXAMPLES = {
    Mechanism: ("include:_spf.example", "include", "pass", "_spf.example", 128),
    Facts: (RdnsFact(RdnsOutcome.PASS, ("a.example",)), SpfFact(SpfResult.PASS), True),
    Outcome: (Verdict("DUNNO", PolicyRule.PASS), SUBJECT, Facts(), "new", 1.5),
}


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda cls: cls.__name__)
def test_the_parameters_are_the_fields_with_their_defaults(cls):
    fields = dataclasses.fields(cls)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in parameters] == [f.name for f in fields]
    assert [p.default for p in parameters] == [
        inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        for f in fields]
    assert all(f.default_factory is dataclasses.MISSING for f in fields)


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda cls: cls.__name__)
def test_every_field_is_set_and_the_instance_stays_frozen(cls):
    values = EXAMPLES[cls]
    made = cls(*values)
    names = [f.name for f in dataclasses.fields(cls)]
    assert vars(made) == dict(zip(names, values))
    assert made == cls(*values) and hash(made) == hash(cls(*values))
    assert made != cls(*values[:-1], "other")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(made, names[0], values[0])
    assert dataclasses.replace(made) == made


def test_defaults_are_those_of_the_fields():
    assert vars(Facts()) == {"rdns": None, "spf": None, "dkim_pending": False}
