"""The benchmark's figures and the targets table of issue 12, computed from one results file.

Contract: pure functions of the run dicts that bench/run writes (no I/O). ``cpu_ms_per_decision``
is the server's CPU seconds in the window over the requests answered (``loadgen.request_count``:
normal plus slow, first recipients not again), in milliseconds; ``rss_mb`` is the peak resident
size of the server's process tree in MB (10^6 bytes: the targets are in MB, the tables in MiB);
``hostile_cpu_ms_per_message`` charges a hostile run's CPU, less what its normal requests cost
at the cold run's rate (same round trip and connections), to its hostile messages.
``checks(results)`` yields ``(target, measured, met)`` for every target the results can answer:
ratios are only ever taken between runs of the same file. Whatever a target needs and the file
lacks (a cell not run, a server failed), it is left out, never guessed.
"""

MIB = 1024 * 1024


def cpu_ms_per_decision(run):
    """Server CPU per answered request, in ms (None without requests)."""
    requests = run.get("requests") or 0
    return run["server_cpu_s"] / requests * 1000 if requests else None


def rss_mb(run):
    """Peak resident memory of the server's process tree, in MB (10^6 bytes)."""
    return run["peak_rss_mib"] * MIB / 1e6


def latency(run, cls="normal"):
    return run.get("latency", {}).get(cls, {})


def hostile_cpu_ms_per_message(hostile, cold):
    """CPU of a hostile run beyond its normal requests (at the cold run's CPU per decision),
    per hostile message, in ms; None when either run lacks what it needs."""
    messages = hostile.get("messages_by_class", {}).get("slow", 0)
    normal = latency(hostile).get("count", 0)
    per_decision = cpu_ms_per_decision(cold)
    if not messages or per_decision is None:
        return None
    extra_s = hostile["server_cpu_s"] - normal * per_decision / 1000
    return max(0.0, extra_s) / messages * 1000


def find(results, server, scenario, delay, conns):
    for run in results["runs"]:
        if (run["server"], run["scenario"], run["delay_ms"], run["connections"]) == \
                (server, scenario, delay, conns) and "failed" not in run:
            return run
    return None


def _ratio(a, b):
    return a / b if b else float("inf")


def checks(results):
    """Yield (target, measured, met) for the targets of issue 12 (module docstring)."""
    deadline = results.get("options", {}).get("deadline", 5.0)

    def ours(scenario, delay, conns):
        return find(results, "policyd-ipv6", scenario, delay, conns)

    hostile, cold100 = ours("hostile", 20, 100), ours("cold", 20, 100)
    if hostile and cold100:
        ms = hostile_cpu_ms_per_message(hostile, cold100)
        if ms is not None:
            yield ("hostile, 20 ms, 100 conn: reactor CPU per hostile message ≤ 20 ms",
                   f"{ms:.1f} ms", ms <= 20)
        a, b = latency(hostile)["p99_ms"], latency(cold100)["p99_ms"]
        yield ("hostile, 20 ms, 100 conn: other requests' p99 ≤ 1.5× cold's",
               f"{_ratio(a, b):.2f}× ({a:.0f} vs {b:.0f} ms)", _ratio(a, b) <= 1.5)
    if hostile:
        mb = rss_mb(hostile)
        yield ("hostile, 20 ms, 100 conn: peak RSS ≤ 80 MB", f"{mb:.0f} MB", mb <= 80)
    warm, trivial = ours("warm", 0, 20), find(results, "trivial", "warm", 0, 20)
    if warm:
        ms = cpu_ms_per_decision(warm)
        yield ("warm, 0 ms, 20 conn: CPU per decision ≤ 0.04 ms", f"{ms:.3f} ms", ms <= 0.04)
        if trivial:
            a, b = latency(warm)["p99_ms"], latency(trivial)["p99_ms"]
            yield ("warm, 0 ms, 20 conn: p99 ≤ 3× the trivial server's",
                   f"{_ratio(a, b):.1f}× ({a:.2f} vs {b:.2f} ms)", _ratio(a, b) <= 3)
        top = latency(warm)["max_ms"]
        yield ("warm, 0 ms, 20 conn: max ≤ 25 ms", f"{top:.1f} ms", top <= 25)
    cold1 = ours("cold", 20, 1)
    if cold100:
        if cold1 and latency(cold1, "first") and latency(cold100, "first"):
            a, b = latency(cold100, "first")["p50_ms"], latency(cold1, "first")["p50_ms"]
            yield ("cold, 20 ms, 100 conn: first-recipient p50 ≤ 1.15× the same at 1 conn",
                   f"{_ratio(a, b):.2f}× ({a:.0f} vs {b:.0f} ms)", _ratio(a, b) <= 1.15)
        ms = cpu_ms_per_decision(cold100)
        yield ("cold, 20 ms, 100 conn: CPU per decision ≤ 0.15 ms", f"{ms:.3f} ms", ms <= 0.15)
        mb = rss_mb(cold100)
        yield ("cold, 20 ms, 100 conn: peak RSS ≤ 80 MB", f"{mb:.0f} MB", mb <= 80)
    cold20, spf20 = ours("cold", 20, 20), find(results, "policyd-spf", "cold", 20, 20)
    if cold20 and spf20 and latency(cold20, "first") and latency(spf20, "first"):
        a, b = latency(cold20, "first")["p50_ms"], latency(spf20, "first")["p50_ms"]
        yield ("cold, 20 ms, 20 conn: first-recipient p50 ≤ 0.5× policyd-spf",
               f"{_ratio(a, b):.2f}× ({a:.0f} vs {b:.0f} ms)", _ratio(a, b) <= 0.5)
    for conns in (20, 100):
        mix, cold = ours("slow-mix", 20, conns), ours("cold", 20, conns)
        where = f"slow-mix, 20 ms, {conns} conn"
        if mix and cold:
            a, b = latency(mix)["p99_ms"], latency(cold)["p99_ms"]
            yield (f"{where}: other 90 % p99 ≤ 1.5× cold p99",
                   f"{_ratio(a, b):.2f}× ({a:.0f} vs {b:.0f} ms)", _ratio(a, b) <= 1.5)
        if mix:
            # Recipients in a domain that has not opted in are refused at once (550 5.2.1),
            # without DNS; every other slow decision waits for the dead zone.
            slow = {k: n for k, n in mix.get("replies", {}).get("slow", {}).items()
                    if not k.startswith("action=550 5.2.1")}
            total = sum(slow.values())
            tempfail = sum(n for k, n in slow.items() if k.startswith("action=451 4.4.3"))
            late = latency(mix, "slow").get("max_ms", 0)
            ok = total > 0 and tempfail == total and late <= deadline * 1000 + 250
            yield (f"{where}: every slow decision 451 4.4.3 within the {deadline:g} s deadline",
                   f"{tempfail}/{total}, slowest {late / 1000:.2f} s", ok)
