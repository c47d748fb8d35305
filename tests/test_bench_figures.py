"""The benchmark's figures: the request count that CPU per decision is divided by."""

import importlib.util
import sys
import types
from importlib.machinery import SourceFileLoader
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


import targets  # noqa: E402
import zonegen  # noqa: E402


def run(server, scenario, delay, conns, **fields):
    base = {"server": server, "scenario": scenario, "delay_ms": delay, "connections": conns,
            "requests": 1000, "server_cpu_s": 0.1, "peak_rss_mib": 50.0,
            "latency": {"normal": {"count": 1000, "p50_ms": 1.0, "p99_ms": 10.0, "max_ms": 20.0},
                        "first": {"count": 500, "p50_ms": 40.0, "p99_ms": 100.0}}}
    base.update(fields)
    return base


def test_cpu_per_decision_divides_the_window_cpu_by_the_requests_answered():
    """0.09 s of server CPU over 1,000 requests is 0.09 ms per decision; none gives None."""
    assert round(targets.cpu_ms_per_decision(run("x", "warm", 0, 20, server_cpu_s=0.09)),
                 9) == 0.09
    assert targets.cpu_ms_per_decision(run("x", "warm", 0, 20, requests=0)) is None


def test_rss_is_reported_in_mb_of_a_million_bytes():
    """76.3 MiB of resident memory is 80.0 MB, the unit the targets use."""
    assert round(targets.rss_mb(run("x", "cold", 20, 100, peak_rss_mib=76.2939)), 1) == 80.0


def test_hostile_cpu_is_charged_beyond_the_normal_requests_cold_rate():
    """A hostile run's CPU less its 900 normal requests at the cold 0.3 ms, over 100 messages."""
    cold = run("policyd-ipv6", "cold", 20, 100, server_cpu_s=0.3)  # 0.3 ms per decision
    hostile = run("policyd-ipv6", "hostile", 20, 100, server_cpu_s=0.27 + 1.5,
                  messages_by_class={"normal": 450, "slow": 100},
                  latency={"normal": {"count": 900, "p99_ms": 10.0}})
    assert round(targets.hostile_cpu_ms_per_message(hostile, cold), 6) == 15.0


def test_targets_table_says_met_and_not_met_from_the_same_file_only():
    """Each issue 12 target gets its verdict from runs of this file; a cell not run is left out."""
    results = {"runs": [
        run("policyd-ipv6", "warm", 0, 20, server_cpu_s=0.05),           # 0.05 ms: not met
        run("trivial", "warm", 0, 20),
        run("policyd-ipv6", "cold", 20, 1),
        run("policyd-ipv6", "cold", 20, 100, server_cpu_s=0.1,            # 0.1 ms: met
            peak_rss_mib=90.0),                                           # 94 MB: not met
    ]}
    verdicts = {target: met for target, _measured, met in targets.checks(results)}
    assert verdicts["warm, 0 ms, 20 conn: CPU per decision ≤ 0.04 ms"] is False
    assert verdicts["warm, 0 ms, 20 conn: p99 ≤ 3× the trivial server's"] is True
    assert verdicts["warm, 0 ms, 20 conn: max ≤ 25 ms"] is True
    assert verdicts["cold, 20 ms, 100 conn: CPU per decision ≤ 0.15 ms"] is True
    assert verdicts["cold, 20 ms, 100 conn: peak RSS ≤ 80 MB"] is False
    assert verdicts["cold, 20 ms, 100 conn: first-recipient p50 ≤ 1.15× the same at 1 conn"]
    assert all(met is None for t, met in verdicts.items() if t.startswith(("hostile", "slow-mix")))


def rows(results):
    return {target: (measured, met) for target, measured, met in targets.checks(results)}


ISSUE_TARGETS = [
    "hostile, 20 ms, 100 conn: reactor CPU per hostile message ≤ 20 ms",
    "hostile, 20 ms, 100 conn: other requests' p99 ≤ 1.5× cold's",
    "hostile, 20 ms, 100 conn: peak RSS ≤ 80 MB",
    "warm, 0 ms, 20 conn: CPU per decision ≤ 0.04 ms",
    "warm, 0 ms, 20 conn: p99 ≤ 3× the trivial server's",
    "warm, 0 ms, 20 conn: max ≤ 25 ms",
    "cold, 20 ms, 100 conn: first-recipient p50 ≤ 1.15× the same at 1 conn",
    "cold, 20 ms, 100 conn: CPU per decision ≤ 0.15 ms",
    "cold, 20 ms, 100 conn: peak RSS ≤ 80 MB",
    "cold, 20 ms, 20 conn: first-recipient p50 ≤ 0.5× policyd-spf",
    "slow-mix, 20 ms, 20 conn: other 90 % p99 ≤ 1.5× cold p99",
    "slow-mix, 20 ms, 20 conn: every slow decision 451 4.4.3 within the 5 s deadline",
    targets.SOAK_TARGET,
]


def test_every_issue_target_has_a_row_even_in_an_empty_results_file():
    """An empty file lists every target of the issue, in its order, as not measured."""
    found = list(targets.checks({"runs": []}))
    assert [target for target, _, _ in found] == ISSUE_TARGETS
    assert all(met is None and measured.startswith("not ") for _, measured, met in found)


def test_a_failed_cell_is_reported_as_not_measured_with_its_reason():
    """The policyd-spf comparison of a failed cell says why, and gives no verdict."""
    results = {"runs": [run("policyd-ipv6", "cold", 20, 20),
                        {"server": "policyd-spf", "scenario": "cold", "delay_ms": 20,
                         "connections": 20, "failed": "load generator exited (1); priming"}]}
    measured, met = rows(results)["cold, 20 ms, 20 conn: first-recipient p50 ≤ 0.5× policyd-spf"]
    assert met is None
    assert "policyd-spf cold 20 ms × 20 conn failed (load generator exited (1)" in measured


def test_cold_20_connections_compares_first_recipient_p50_with_policyd_spf():
    """The ratio is of first-recipient p50s (40 vs 100 ms: 0.40×), not of all requests'."""
    spf = run("policyd-spf", "cold", 20, 20, latency={
        "normal": {"count": 900, "p50_ms": 1.0, "p99_ms": 300.0, "max_ms": 400.0},
        "first": {"count": 400, "p50_ms": 100.0, "p99_ms": 300.0}})
    results = {"runs": [run("policyd-ipv6", "cold", 20, 20), spf]}
    target = "cold, 20 ms, 20 conn: first-recipient p50 ≤ 0.5× policyd-spf"
    assert rows(results)[target] == ("0.40× (40 vs 100 ms)", True)
    spf["latency"]["first"]["p50_ms"] = 79.0                  # 40 / 79 > 0.5
    assert rows(results)[target][1] is False


def test_hostile_rows_read_the_hostile_and_cold_runs_of_100_connections():
    """Hostile p99 over the cold run's p99 and the hostile run's RSS in MB give the verdicts."""
    cold = run("policyd-ipv6", "cold", 20, 100, server_cpu_s=0.3)
    hostile = run("policyd-ipv6", "hostile", 20, 100, server_cpu_s=0.27 + 2.5,
                  peak_rss_mib=80.0, messages_by_class={"normal": 450, "slow": 100},
                  latency={"normal": {"count": 900, "p99_ms": 16.0}})
    found = rows({"runs": [cold, hostile]})
    assert found[ISSUE_TARGETS[0]] == ("25.0 ms", False)
    assert found[ISSUE_TARGETS[1]] == ("1.60× (16 vs 10 ms)", False)
    assert found[ISSUE_TARGETS[2]] == ("84 MB", False)  # 80 MiB is 83.9 MB


def test_warm_rows_compare_p99_with_the_trivial_server_and_bound_the_maximum():
    """Warm p99 over the trivial server's p99 (not p50), and the maximum against 25 ms."""
    trivial = run("trivial", "warm", 0, 20, latency={
        "normal": {"count": 1000, "p50_ms": 0.4, "p99_ms": 4.0, "max_ms": 9.0}})
    warm = run("policyd-ipv6", "warm", 0, 20, latency={
        "normal": {"count": 1000, "p50_ms": 1.0, "p99_ms": 12.5, "max_ms": 25.5}})
    found = rows({"runs": [warm, trivial]})
    assert found["warm, 0 ms, 20 conn: p99 ≤ 3× the trivial server's"] == (
        "3.12× (12 vs 4.00 ms)", False)
    assert found["warm, 0 ms, 20 conn: max ≤ 25 ms"] == ("25.5 ms", False)


def test_slow_mix_rows_compare_with_cold_and_need_every_slow_decision_tempfailed():
    """Other requests' p99 against cold's; one slow DUNNO among 451s is not met."""
    mix = run("policyd-ipv6", "slow-mix", 20, 20,
              latency={"normal": {"count": 900, "p99_ms": 14.0},
                       "slow": {"count": 10, "max_ms": 4100.0}},
              replies={"slow": {"action=451 4.4.3 Try again": 9,
                                "action=550 5.2.1 No such": 2, "action=DUNNO": 1}})
    found = rows({"runs": [mix, run("policyd-ipv6", "cold", 20, 20)]})
    assert found[ISSUE_TARGETS[10]] == ("1.40× (14 vs 10 ms)", True)
    assert found[ISSUE_TARGETS[11]] == ("9/10, slowest 4.10 s", False)
    del mix["replies"]["slow"]["action=DUNNO"]
    assert rows({"runs": [mix]})[ISSUE_TARGETS[11]] == ("9/9, slowest 4.10 s", True)


def soak(**fields):
    base = {"requests": 1_000_000, "small_caches": False, "sent": 1_000_000,
            "answered": 1_000_000, "rss_start_kib": 40_000, "rss_plateau_kib": 80_000,
            "rss_end_kib": 86_000, "growth_after_plateau": 0.0, "rss_samples_kib": [90_000]}
    base.update(fields)
    return base


def test_soak_growth_and_peak_come_from_the_resident_sizes_not_the_summary_field():
    """Growth 80,000 -> 86,000 KiB is +7.5 %, the peak the largest sample: met at 92 MB."""
    measured, met = targets.soak_check(soak())
    assert met is True
    assert measured.startswith("+7.5 % once full (82 → 88 MB), peak 92 MB;")
    assert targets.soak_check(soak(rss_end_kib=89_000))[1] is False       # +11.3 %
    assert targets.soak_check(soak(rss_samples_kib=[98_000]))[1] is False  # 100.4 MB
    assert targets.soak_check(soak(answered=999_999, sent=1_000_000))[1] is None


def test_a_soak_that_is_not_the_targets_gets_no_verdict():
    """A short soak, small caches, a failed soak or none at all: shown, with met None."""
    assert targets.soak_check(soak(sent=20_000, answered=20_000))[1] is None
    assert "20,000 requests, not 10^6" in targets.soak_check(soak(sent=20_000,
                                                                  answered=20_000))[0]
    assert targets.soak_check(soak(small_caches=True))[1] is None
    assert targets.soak_check({"failed": "soak.py exited (1)"}) == (
        "not measured: soak failed (soak.py exited (1))", None)
    assert targets.soak_check(None)[1] is None


def test_the_soak_row_of_the_table_reads_the_results_files_soak():
    """checks() takes the soak summary that bench/run stored in the results file."""
    assert rows({"runs": [], "soak": soak()})[targets.SOAK_TARGET][1] is True


def test_hostile_senders_have_ten_includes_of_a_62_kb_answer(tmp_path):
    """zonegen gives each hostile sender 10 unique includes under a ~62 KB TXT wildcard."""
    population = zonegen.generate(str(tmp_path), cold=50, warm=5, slow=5, hostile=3)
    zone = (tmp_path / "example.zone").read_text()
    domain = population["hostile"][0][4]
    record = next(line for line in zone.splitlines() if line.startswith(domain + ". TXT"))
    assert record.count("include:") == 10 and ".big.example" in record
    big = (tmp_path / "big.zone").read_text()
    wildcard = next(line for line in big.splitlines() if line.startswith("* TXT"))
    assert 58_000 < wildcard.count("x") + 3 * zonegen.BIG_STRINGS < 62_000


import report  # noqa: E402
import servers  # noqa: E402

_LOADER = SourceFileLoader("bench_run", str(Path(__file__).resolve().parent.parent
                                            / "bench" / "run"))
BENCH_RUN = importlib.util.module_from_spec(importlib.util.spec_from_loader("bench_run", _LOADER))
_LOADER.exec_module(BENCH_RUN)


def test_report_marks_a_target_without_a_figure_with_a_dash():
    """The markdown shows met None as '-' and escapes '|' in a failed cell's reason."""
    text = report.markdown({"runs": [{"server": "policyd-spf", "scenario": "cold",
                                      "delay_ms": 20, "connections": 1,
                                      "failed": "a | b"}]})
    assert "| policyd-spf | failed: a \\| b |" in text
    assert f"| {targets.SOAK_TARGET} | not run (bench/run --soak 1000000) | - |" in text


def test_report_says_why_no_chart_when_matplotlib_is_missing(monkeypatch, tmp_path):
    """Without matplotlib, chart() draws nothing and why_no_chart() names the package."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    results = {"runs": [run("trivial", "cold", 20, 1), run("trivial", "cold", 20, 20)]}
    assert report.chart(results, str(tmp_path / "c.png")) is False
    assert "apt-get install python3-matplotlib" in report.why_no_chart(results)


def test_report_says_why_no_chart_with_a_single_connection_count(monkeypatch):
    """With matplotlib importable, one connection count per column is the reason given."""
    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))
    assert report.why_no_chart() is None
    assert report.why_no_chart({"runs": [run("trivial", "cold", 20, 20),
                                         run("trivial", "warm", 0, 1)]}) == (
        "no scenario and round trip was measured at two or more connection counts")


def test_a_missing_policyd_spf_is_named_with_its_package(monkeypatch):
    """Without /usr/bin/policyd-spf the server is refused up front, naming the package."""
    monkeypatch.setattr(servers.shutil, "which",
                        lambda program: None if program == servers.POLICYD_SPF else program)
    assert servers.missing("policyd-spf") == (
        "/usr/bin/policyd-spf is not installed (apt-get install postfix-policyd-spf-python)")
    assert servers.missing("trivial") is None
    assert servers.missing("nope").startswith("unknown server 'nope'")


def test_a_failed_cell_says_what_the_load_generator_and_the_server_said(tmp_path):
    """why_failed() adds the load generator's last stderr lines and the server log's last line."""
    (tmp_path / "loadgen.err").write_text("Traceback\n\npriming failed: 20 of 20 lost\n")
    (tmp_path / "policyd-spf.log").write_text("E execvp(...): No such file or directory\n")
    why = BENCH_RUN.why_failed(RuntimeError("load generator exited (1)"), str(tmp_path),
                               "policyd-spf")
    assert why == ("load generator exited (1); load generator: Traceback / priming failed: "
                   "20 of 20 lost; server log: E execvp(...): No such file or directory")
    assert BENCH_RUN.why_failed(OSError("x"), str(tmp_path / "none"), "trivial") == "x"


def test_soak_output_gives_the_summary_and_every_resident_sample():
    """read_soak() takes soak.py's last JSON line and the VmRSS lines printed before it."""
    text = ("    50000 requests  VmRSS    61.5 MiB\n   100000 requests  VmRSS    70.0 MiB\n"
            '{"sent": 100000, "answered": 100000, "rss_end_kib": 70000}\n')
    assert BENCH_RUN.read_soak(text) == {"sent": 100000, "answered": 100000,
                                         "rss_end_kib": 70000,
                                         "rss_samples_kib": [62976, 71680]}
    assert BENCH_RUN.read_soak("the daemon did not start\n") is None
