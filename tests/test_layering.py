"""Layering: the pure modules (codecs, decisions, state machines, tables) never load Twisted.

Each module is imported alone in a fresh interpreter, so a Twisted import anywhere in its
import graph shows up in ``sys.modules``. The list is explicit: every module that a package
docstring calls pure, sans-IO or free of Twisted.
"""

import subprocess
import sys
from pathlib import Path

import pytest

# Each case starts a fresh interpreter.
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent

PURE_MODULES = [
    "policyd_ipv6.names",
    "policyd_ipv6.text",
    "policyd_ipv6.cache",
    "policyd_ipv6.facts",
    "policyd_ipv6.vocabulary",
    "policyd_ipv6.live",
    "policyd_ipv6.timeouts",
    "policyd_ipv6.resolver.reply",
    "policyd_ipv6.policy.codec",
    "policyd_ipv6.policy.decision",
    "policyd_ipv6.policy.replies",
    "policyd_ipv6.milter.codec",
    "policyd_ipv6.milter.flags",
    "policyd_ipv6.milter.events",
    "policyd_ipv6.milter.session",
    "policyd_ipv6.milter.collect",
    "policyd_ipv6.milter.end_of_message",
    "policyd_ipv6.milter.registry",
    "policyd_ipv6.milter.authres",
    "policyd_ipv6.checks.spf_terms",
    "policyd_ipv6.checks.spf_eval",
    "policyd_ipv6.checks.dkim_verify",
    "policyd_ipv6.resolver.wire",
    "policyd_ipv6.report.lines",
    "policyd_ipv6.report.impact",
    "policyd_ipv6.optin.table",
    "policyd_ipv6.optin.rows",
    "policyd_ipv6.daemon.config",
    "policyd_ipv6.daemon.values",
    "policyd_ipv6.daemon.keydocs",
]

# Prints the Twisted modules that importing the module loaded, one per line.
PROBE = """
import sys
import {module}
print("\\n".join(sorted(m for m in sys.modules if m == "twisted" or m.startswith("twisted."))))
"""


def twisted_modules_loaded_by(module: str) -> list[str]:
    """Import ``module`` alone in a fresh interpreter; return the Twisted modules it loaded."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_does_not_load_twisted(module: str) -> None:
    """Importing a pure module alone loads no Twisted module at all."""
    assert twisted_modules_loaded_by(module) == []


def test_probe_sees_twisted_in_an_adapter() -> None:
    """The probe does detect Twisted: the policy adapter, a Twisted protocol, loads it."""
    assert "twisted.internet.protocol" in twisted_modules_loaded_by("policyd_ipv6.policy.server")
