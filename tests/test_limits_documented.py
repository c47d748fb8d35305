"""The limits in the code are the ones the README and the man page tell administrators."""

import os

import pytest

from policyd_ipv6.checks import spf as spf_check
from policyd_ipv6.daemon.config import KEYS
from policyd_ipv6.milter import collect as milter_collect
from policyd_ipv6.optin import table as optin
from policyd_ipv6.policy import codec as policy_codec
from policyd_ipv6.policy import server as policy_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = {"README.md": os.path.join(ROOT, "README.md"),
        "policyd-ipv6(8)": os.path.join(ROOT, "policyd_ipv6", "man", "policyd-ipv6.8")}


def mentions(text: str, number: int) -> bool:
    return any(form in text for form in (str(number), f"{number:,}"))


@pytest.mark.parametrize("doc", list(DOCS))
@pytest.mark.parametrize("name, value", [
    ("line length", policy_codec.MAX_LINE_BYTES),
    ("attributes", policy_codec.MAX_ATTRIBUTES),
    ("request size", policy_codec.MAX_REQUEST_BYTES),
    ("requests ahead", policy_server.MAX_QUEUED),
    ("SPF DNS questions", spf_check.MAX_QUESTIONS),
    ("milter macros", milter_collect.DEFAULT_MAX_MACROS),
])
def test_protocol_limits_are_documented(doc, name, value):
    """Each hard limit of the code appears, with its value, in the README and the man page."""
    assert mentions(open(DOCS[doc]).read(), value), f"{name} = {value} not in {doc}"


@pytest.mark.parametrize("doc", list(DOCS))
@pytest.mark.parametrize("key", ["max_connections", "idle_timeout_seconds",
                                 "decision_deadline_seconds", "dns_cache_size",
                                 "message_cache_size", "message_cache_ttl_seconds"])
def test_limit_defaults_are_documented(doc, key):
    """The defaults of the limit keys appear next to their names in the README and man page."""
    default = next(k.default for k in KEYS if k.name == key)
    text = open(DOCS[doc]).read()
    assert key.replace("_", "\\_") in text or key in text
    number = int(default) if float(default).is_integer() else default
    assert mentions(text, number) or str(default) in text, f"{key} default {default} in {doc}"


def test_optin_size_limit_is_documented():
    """The opt-in file's size bound (16 MiB) is stated."""
    assert optin.MAX_OPTIN_BYTES == 16 * 1024 * 1024
    for path in DOCS.values():
        assert "16 MiB" in open(path).read()


def test_milter_macro_bytes_are_documented():
    """The milter's macro bound in bytes (64 KiB) is stated."""
    assert milter_collect.DEFAULT_MAX_MACRO_BYTES == 64 * 1024
    for path in DOCS.values():
        assert "64 KiB" in open(path).read()
