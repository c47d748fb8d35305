"""postfix-examples/grafana-dashboard.json: valid JSON whose queries name only metrics the
daemon exports (``metrics.NAMES``) or prometheus_client's process metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

from policyd_ipv6.daemon.metrics import NAMES

DASHBOARD = Path(__file__).resolve().parent.parent / "postfix-examples" / "grafana-dashboard.json"
LIBRARY = {"process_resident_memory_bytes", "process_cpu_seconds_total"}


def queries(node) -> list[str]:
    """Every "expr" (a PromQL query) anywhere in the dashboard."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [q for value in node.values() for q in queries(value)]
    if isinstance(node, list):
        return [q for value in node for q in queries(value)]
    return []


def named_metrics(expr: str) -> set[str]:
    """The metric names a query reads (a histogram's series by the histogram's name)."""
    names = set(re.findall(r"\b(?:policyd_ipv6|process)_[a-z0-9_]+", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", n) if "duration_seconds" in n else n
            for n in names}


def test_the_dashboard_parses_and_names_only_exported_metrics():
    """Each query of the dashboard reads at least one metric, and only ones that exist."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = queries(dashboard["panels"])
    assert exprs and all(named_metrics(e) for e in exprs)
    used = set().union(*(named_metrics(e) for e in exprs))
    assert used <= set(NAMES) | LIBRARY, used - set(NAMES) - LIBRARY


def test_the_dashboard_shows_every_contract_metric():
    """No metric of the contract is left off the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(named_metrics(e) for e in queries(dashboard["panels"])))
    assert set(NAMES) <= used, set(NAMES) - used


def test_a_made_up_metric_would_be_caught():
    """The name check reads the names out of a query (so a typo there fails the test above)."""
    assert named_metrics("rate(policyd_ipv6_decision_total[5m])") == {"policyd_ipv6_decision_total"}
    assert named_metrics("x{job=~\"$job\"}") == set()
