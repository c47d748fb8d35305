#!/usr/bin/python3
"""Turn a bench/run results file into a markdown report and a latency chart.

Contract: `markdown(results)` returns the tables (one per scenario/round trip/connections cell,
one row per server), the soak's summary when the file holds one, and the issue 12 target
checks (bench/targets.py), each computed from the same results file (ratios within one run,
never across runs); a target the file cannot answer is listed as not measured. `chart(results,
path)` draws first-recipient p50 and all-request p99 latency (top) and requests/s (bottom)
against connections, one column per scenario and round trip, and returns False when it cannot;
`why_no_chart(results)` says why (matplotlib not importable by this interpreter, or no column
with two connection counts), None when it can.
`/usr/bin/python3 bench/report.py RESULTS.json [--chart OUT.png]` prints the report (Debian's
python3-matplotlib serves /usr/bin/python3, not another python3 first on PATH).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import targets  # noqa: E402

TARGETS_NOTE = "targets from issue 12; ratios use runs of this results file only"


def _lat(run, cls="normal"):
    return run.get("latency", {}).get(cls, {})


def _first(run):
    first = _lat(run, "first")
    return f"{first['p50_ms']:.1f} / {first['p99_ms']:.1f}" if first else "-"


def _errors(run):
    return sum(run.get("errors", {}).values())


def _replies(run, cls="normal"):
    counts = run.get("replies", {}).get(cls, {})
    total = sum(counts.values()) or 1
    short = {}
    for key, n in counts.items():
        word = key.removeprefix("action=").split(" ")
        label = " ".join(word[:2]) if word[0][:1].isdigit() else word[0]
        short[label] = short.get(label, 0) + n
    return ", ".join(f"{k} {n * 100 / total:.0f}%" for k, n in
                     sorted(short.items(), key=lambda kv: -kv[1]))


def one_line(run):
    if "failed" in run:
        return f"{run['server']:>13} {run['scenario']:>8} {run['delay_ms']:>3}ms " \
               f"{run['connections']:>4}c  FAILED: {run['failed']}"
    lat = _lat(run)
    return (f"{run['server']:>13} {run['scenario']:>8} {run['delay_ms']:>3}ms "
            f"{run['connections']:>4}c  {run['requests_per_s']:9.1f} req/s  "
            f"p50 {lat.get('p50_ms', 0):8.2f}  p99 {lat.get('p99_ms', 0):8.2f} ms  "
            f"cpu {run['cpu_s_per_1000'] or 0:.3f} s/1000  rss {run['peak_rss_mib']:.0f} MiB  "
            f"err {_errors(run)}  loadgen cpu {run['loadgen_cpu_s']:.1f}s"
            + ("  POOL USED UP" if run.get("pool_exhausted") else ""))


def _cells(results):
    cells = {}
    for run in results["runs"]:
        cells.setdefault((run["scenario"], run["delay_ms"], run["connections"]), []).append(run)
    return cells


def table(runs):
    head = ("| server | req/s | p50 ms | p90 ms | p99 ms | max ms | 1st rcpt p50 / p99 ms | "
            "CPU s / 1000 | peak RSS MiB (procs) | peak PSS MiB | errors | replies | "
            "load gen CPU s | machine busy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        if "failed" in run:
            why = run["failed"].splitlines()[0].replace("|", "\\|") if run["failed"] else ""
            lines.append(f"| {run['server']} | failed: {why} |" + " |" * 12)
            continue
        lat = _lat(run)
        # A cold pool used up ends the window early; the rate is then over the shorter window.
        used_up = " (pool used up)" if run.get("pool_exhausted") else ""
        lines.append(
            f"| {run['server']} | {run['requests_per_s']:,.0f}{used_up} | "
            f"{lat.get('p50_ms', 0):.2f} | {lat.get('p90_ms', 0):.2f} | "
            f"{lat.get('p99_ms', 0):.2f} | {lat.get('max_ms', 0):.1f} | "
            f"{_first(run)} | {run['cpu_s_per_1000'] or 0:.3f} | "
            f"{run['peak_rss_mib']:.0f} ({run['peak_processes']}) | "
            f"{run['peak_pss_mib']:.0f} | {_errors(run)} | {_replies(run)} | "
            f"{run['loadgen_cpu_s']:.1f} | {run.get('machine_busy', 0) * 100:.0f} % |")
        slow = _lat(run, "slow")
        if slow:
            lines.append(
                f"| ↳ {'hostile' if run['scenario'] == 'hostile' else 'slow'} 10 % | | "
                f"{slow['p50_ms']:.0f} | {slow['p90_ms']:.0f} | "
                f"{slow['p99_ms']:.0f} | "
                f"{slow['max_ms']:.0f} | | | | | | {_replies(run, 'slow')} | | |")
    return "\n".join(lines)


def checks(results):
    """Yield (target, measured, met) for every target; met None: not measured."""
    return targets.checks(results)


def soak_table(soak):
    """The soak's summary (bench/soak.py via bench/run --soak) as a one-row table."""
    head = "| requests | answered | seconds | requests/s | RSS start / once full / end / peak MiB |"
    if "failed" in soak:
        return f"{head}\n|---|---|---|---|---|\n| {soak.get('requests', '?')} | failed: " \
               f"{soak['failed'].splitlines()[0] if soak['failed'] else ''} | | | |"
    growth, *_ = targets.soak_figures(soak)
    peak = targets.soak_peak_kib(soak)
    mib = [soak[k] / 1024 for k in ("rss_start_kib", "rss_plateau_kib", "rss_end_kib")]
    return (f"{head}\n|---|---|---|---|---|\n| {soak.get('sent', 0):,} | "
            f"{soak.get('answered', 0):,} | {soak.get('seconds', 0):.0f} | "
            f"{soak.get('requests_per_second', 0):,} | "
            f"{mib[0]:.0f} / {mib[1]:.0f} / {mib[2]:.0f} / {peak / 1024:.0f} "
            f"({growth * 100:+.1f} % once full) |")


def _verdict(met):
    return "-" if met is None else "yes" if met else "**no**"


def markdown(results):
    m = results.get("machine", {})
    out = [f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory', '?')}, "
           f"{m.get('os', '?')}, kernel {m.get('kernel', '?')}; servers' Python: "
           f"{m.get('server_python', '?')}; {'; '.join(m.get('packages', []))}; "
           f"code {m.get('code', '?')}. "
           f"Run started {results.get('started', '?')}.", ""]
    for (scenario, delay, conns), runs in sorted(_cells(results).items()):
        out += [f"### {scenario}, DNS round trip {delay} ms, {conns} connections", "",
                table(runs), ""]
    if results.get("soak"):
        small = " (small caches)" if results["soak"].get("small_caches") else ""
        out += [f"### soak: policyd-ipv6, cold senders, Knot on loopback{small}", "",
                soak_table(results["soak"]), ""]
    found = list(checks(results))
    if found:
        out += [f"### Targets ({TARGETS_NOTE})", "", "| target | measured | met |", "|---|---|---|"]
        out += [f"| {t} | {v} | {_verdict(ok)} |" for t, v, ok in found]
    return "\n".join(out)


def _panels(results):
    panels = {}
    for run in results["runs"]:
        if "failed" not in run:
            panels.setdefault((run["scenario"], run["delay_ms"]), []).append(run)
    return {k: v for k, v in sorted(panels.items())
            if len({r["connections"] for r in v}) >= 2}


def why_no_chart(results=None):
    """Why chart() cannot draw (None when it can); without results, matplotlib alone."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (f"matplotlib cannot be imported by {sys.executable} "
                "(apt-get install python3-matplotlib, for /usr/bin/python3)")
    if results is not None and not _panels(results):
        return "no scenario and round trip was measured at two or more connection counts"
    return None


def chart(results, path):
    if why_no_chart(results):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
    panels = _panels(results)
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 8), squeeze=False)
    for col, ((scenario, delay), runs) in enumerate(panels.items()):
        top, bottom = axes[0][col], axes[1][col]
        for server in sorted({r["server"] for r in runs}):
            mine = sorted((r for r in runs if r["server"] == server),
                          key=lambda r: r["connections"])
            x = [r["connections"] for r in mine]
            # Solid: the first recipient of each message (it waits for the lookups); the
            # all-requests p50 jumps between cached and uncached requests, see README.
            line, = top.plot(x, [(_lat(r, "first") or _lat(r))["p50_ms"] for r in mine],
                             marker="o", label=f"{server} p50, 1st rcpt")
            top.plot(x, [_lat(r)["p99_ms"] for r in mine], marker="x", linestyle="--",
                     color=line.get_color(), label=f"{server} p99, all")
            bottom.plot(x, [r["requests_per_s"] for r in mine], marker="o",
                        color=line.get_color(), label=server)
        conns = sorted({r["connections"] for r in runs})
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(conns)
            ax.set_xticklabels([str(c) for c in conns])
            ax.xaxis.set_minor_locator(NullLocator())
            # 1-2-5 steps labelled as plain numbers: a panel spanning less than a decade
            # would otherwise have one labelled tick, or none.
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("concurrent connections")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        top.set_ylabel("latency per request (ms)")
        top.set_title(f"{scenario}, DNS round trip {delay} ms")
        bottom.set_ylabel("requests per second")
    fig.suptitle(f"Policy request latency vs connections ({results.get('started', '')})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results")
    parser.add_argument("--chart", help="also write the chart PNG here")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    print(markdown(results))
    if args.chart and not chart(results, args.chart):
        print(f"no chart: {why_no_chart(results)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
