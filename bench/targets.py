"""The benchmark's figures and the targets table of issue 12, computed from one results file.

Contract: pure functions of the dicts that bench/run writes (no I/O). ``cpu_ms_per_decision``
is the server's CPU seconds in the window over the requests answered (``loadgen.request_count``:
normal plus slow, first recipients not again), in milliseconds; ``rss_mb`` is the peak resident
size of the server's process tree in MB (10^6 bytes: the targets are in MB, the tables in MiB);
``hostile_cpu_ms_per_message`` charges a hostile run's CPU, less what its normal requests cost
at the cold run's rate (same round trip and connections), to its hostile messages;
``soak_figures`` reads the soak's summary (bench/soak.py, taken in by ``bench/run --soak``).
``checks(results)`` yields ``(target, measured, met)`` for every target of issue 12, in the
issue's order: ratios are only ever taken between runs of the same file. A target whose run is
missing from the file (not run, failed, or a soak shorter than the target's) still has its row,
with ``met`` None and ``measured`` saying what is missing: never guessed, never left out.
"""

MIB = 1024 * 1024
# The soak target: flat means at most this growth from the first sample taken once the caches
# are full to the last one (bench/soak.py's own --max-growth default), over this many requests.
SOAK_MAX_GROWTH = 0.10
SOAK_REQUESTS = 1_000_000


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


def soak_figures(soak):
    """(growth after the plateau as a fraction, plateau MB, end MB, peak MB) of a soak summary.

    The growth is recomputed from the resident sizes, not read from the summary's rounded
    field; the peak is the largest sample the soak printed, or of its start, plateau and end."""
    plateau, end = soak["rss_plateau_kib"], soak["rss_end_kib"]
    to_mb = 1024 / 1e6
    return (end - plateau) / plateau, plateau * to_mb, end * to_mb, soak_peak_kib(soak) * to_mb


def soak_peak_kib(soak):
    """The largest resident size the soak recorded, in KiB."""
    return max([soak["rss_start_kib"], soak["rss_plateau_kib"], soak["rss_end_kib"]]
               + list(soak.get("rss_samples_kib", [])))


def find(results, server, scenario, delay, conns):
    """The run of that server in that cell, if the file has one that did not fail."""
    for run in results["runs"]:
        if _key(run) == (server, scenario, delay, conns) and "failed" not in run:
            return run
    return None


def _key(run):
    return run["server"], run["scenario"], run["delay_ms"], run["connections"]


def _why_missing(results, server, scenario, delay, conns):
    where = f"{server} {scenario} {delay} ms × {conns} conn"
    for run in results["runs"]:
        if _key(run) == (server, scenario, delay, conns):
            return f"not measured: {where} failed ({_short(run['failed'])})"
    return f"not measured: {where} not run"


def _short(reason, width=120):
    """The first line of a failure, cut to `width` characters (the cell's row has all of it)."""
    first = (reason.splitlines() or [""])[0]
    return first if len(first) <= width else first[:width - 1].rstrip("; ") + "…"


def _ratio(a, b):
    return a / b if b else float("inf")


def _ms(value):
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _ratio_row(cls, key, limit):
    """A row comparing one figure of two runs: the first run's over the second's <= limit."""
    def row(mine, other):
        a, b = latency(mine, cls).get(key), latency(other, cls).get(key)
        if a is None or b is None:
            return f"not measured: no {cls} latencies", None
        return f"{_ratio(a, b):.2f}× ({_ms(a)} vs {_ms(b)} ms)", _ratio(a, b) <= limit
    return row


def _cpu_row(limit_ms):
    def row(run):
        ms = cpu_ms_per_decision(run)
        if ms is None:
            return "not measured: no requests answered", None
        return f"{ms:.3f} ms", ms <= limit_ms
    return row


def _rss_row(limit_mb):
    def row(run):
        mb = rss_mb(run)
        return f"{mb:.0f} MB", mb <= limit_mb
    return row


def _max_row(limit_ms):
    def row(run):
        top = latency(run).get("max_ms")
        if top is None:
            return "not measured: no latencies", None
        return f"{top:.1f} ms", top <= limit_ms
    return row


def _hostile_cpu_row(hostile, cold):
    ms = hostile_cpu_ms_per_message(hostile, cold)
    if ms is None:
        return "not measured: no hostile messages, or no cold requests", None
    return f"{ms:.1f} ms", ms <= 20


def _slow_row(deadline):
    def row(mix):
        # Recipients in a domain that has not opted in are refused at once (550 5.2.1),
        # without DNS; every other slow decision waits for the dead zone.
        slow = {k: n for k, n in mix.get("replies", {}).get("slow", {}).items()
                if not k.startswith("action=550 5.2.1")}
        total = sum(slow.values())
        tempfail = sum(n for k, n in slow.items() if k.startswith("action=451 4.4.3"))
        late = latency(mix, "slow").get("max_ms", 0)
        ok = total > 0 and tempfail == total and late <= deadline * 1000 + 250
        return f"{tempfail}/{total}, slowest {late / 1000:.2f} s", ok
    return row


def _ours(scenario, delay, conns):
    return ("policyd-ipv6", scenario, delay, conns)


def _slow_mix(conns, deadline):
    mix, cold = _ours("slow-mix", 20, conns), _ours("cold", 20, conns)
    where = f"slow-mix, 20 ms, {conns} conn"
    return [(f"{where}: other 90 % p99 ≤ 1.5× cold p99", [mix, cold],
             _ratio_row("normal", "p99_ms", 1.5)),
            (f"{where}: every slow decision 451 4.4.3 within the {deadline:g} s deadline",
             [mix], _slow_row(deadline))]


def _cell_targets(deadline):
    """(target, the runs it reads, row function of those runs), in the issue's order."""
    hostile, warm = _ours("hostile", 20, 100), _ours("warm", 0, 20)
    cold1, cold20, cold100 = _ours("cold", 20, 1), _ours("cold", 20, 20), _ours("cold", 20, 100)
    return [
        ("hostile, 20 ms, 100 conn: reactor CPU per hostile message ≤ 20 ms",
         [hostile, cold100], _hostile_cpu_row),
        ("hostile, 20 ms, 100 conn: other requests' p99 ≤ 1.5× cold's",
         [hostile, cold100], _ratio_row("normal", "p99_ms", 1.5)),
        ("hostile, 20 ms, 100 conn: peak RSS ≤ 80 MB", [hostile], _rss_row(80)),
        ("warm, 0 ms, 20 conn: CPU per decision ≤ 0.04 ms", [warm], _cpu_row(0.04)),
        ("warm, 0 ms, 20 conn: p99 ≤ 3× the trivial server's",
         [warm, ("trivial", "warm", 0, 20)], _ratio_row("normal", "p99_ms", 3)),
        ("warm, 0 ms, 20 conn: max ≤ 25 ms", [warm], _max_row(25)),
        ("cold, 20 ms, 100 conn: first-recipient p50 ≤ 1.15× the same at 1 conn",
         [cold100, cold1], _ratio_row("first", "p50_ms", 1.15)),
        ("cold, 20 ms, 100 conn: CPU per decision ≤ 0.15 ms", [cold100], _cpu_row(0.15)),
        ("cold, 20 ms, 100 conn: peak RSS ≤ 80 MB", [cold100], _rss_row(80)),
        ("cold, 20 ms, 20 conn: first-recipient p50 ≤ 0.5× policyd-spf",
         [cold20, ("policyd-spf", "cold", 20, 20)], _ratio_row("first", "p50_ms", 0.5)),
    ] + _slow_mix(20, deadline)


SOAK_TARGET = (f"soak, 10^6 requests, cold senders: resident memory flat (≤ "
               f"{SOAK_MAX_GROWTH * 100:.0f} % growth once the caches are full) and ≤ 100 MB")


def soak_check(soak):
    """(measured, met) of the soak target; met is None unless the soak is the target's."""
    if soak is None:
        return "not run (bench/run --soak 1000000)", None
    if "failed" in soak:
        return f"not measured: soak failed ({_short(soak['failed'])})", None
    growth, plateau, end, peak = soak_figures(soak)
    answered, sent = soak.get("answered", 0), soak.get("sent", 0)
    measured = (f"{growth * 100:+.1f} % once full ({plateau:.0f} → {end:.0f} MB), peak "
                f"{peak:.0f} MB; {answered:,} of {sent:,} answered")
    met = growth <= SOAK_MAX_GROWTH and peak <= 100 and answered == sent
    if soak.get("small_caches"):
        return f"not the target's run (small caches): {measured}", None
    if answered < SOAK_REQUESTS:
        return f"not the target's run ({answered:,} requests, not 10^6): {measured}", None
    return measured, met


def checks(results):
    """Yield (target, measured, met) for the targets of issue 12 (module docstring): met is
    True or False, or None when the file lacks what the target needs (measured says what)."""
    deadline = results.get("options", {}).get("deadline", 5.0)
    for target, cells, row in _cell_targets(deadline):
        runs = [find(results, *cell) for cell in cells]
        missing = next((cell for cell, run in zip(cells, runs) if run is None), None)
        if missing is not None:
            yield target, _why_missing(results, *missing), None
        else:
            yield (target, *row(*runs))
    # Issue 7 also had slow-mix at 100 connections: shown when the file has it.
    if find(results, *_ours("slow-mix", 20, 100)):
        for target, cells, row in _slow_mix(100, deadline):
            runs = [find(results, *cell) for cell in cells]
            if None not in runs:
                yield (target, *row(*runs))
    yield (SOAK_TARGET, *soak_check(results.get("soak")))
