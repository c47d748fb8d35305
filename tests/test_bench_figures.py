"""The benchmark's figures: the request count that CPU per decision is divided by."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import loadgen  # noqa: E402


def test_first_recipients_are_not_counted_twice():
    """The "first" latencies are a subset of "normal": requests are normal plus slow only."""
    latencies = {"normal": [0.001] * 30, "slow": [0.002] * 5, "first": [0.001] * 10}
    assert loadgen.request_count(latencies) == 35


def test_summary_percentiles_are_nearest_rank():
    """summarize() gives nearest-rank percentiles in milliseconds of the latencies given."""
    summary = loadgen.summarize([0.001 * i for i in range(100, 0, -1)])
    assert summary["count"] == 100
    assert round(summary["p50_ms"], 6) == 50.0
    assert round(summary["p99_ms"], 6) == 99.0
    assert round(summary["max_ms"], 6) == 100.0
