"""``policyd-ipv6 report [--json] [--top N] [FILE ...]``: the impact report of a log.

Contract: ``report(args, stdin, stdout)`` reads each FILE in turn (``-``, or no FILE at all,
is standard input: ``journalctl -u policyd-ipv6 -o cat | policyd-ipv6 report -``), feeds every
line to ``report.lines.parse_line`` and ``report.impact.Impact``, and prints the text tables,
or with ``--json`` one JSON object (``report.impact``). It returns 0, or 1 naming a file that
cannot be read (printed to standard error, nothing on standard output). Undecodable bytes are
kept escaped; a line it cannot parse is counted in ``unparsed_lines`` and skipped, never
fatal. It needs no configuration and asks no DNS.
"""

from __future__ import annotations

import io
import json
import sys

from policyd_ipv6.report.impact import Impact, render_text
from policyd_ipv6.report.lines import parse_line

__all__ = ["report", "add_parser"]


def add_parser(commands) -> None:
    """The ``report`` subcommand's options."""
    sub = commands.add_parser(
        "report", help="summarise decision and milter log lines: whom the rules refuse, "
                       "or would refuse")
    sub.add_argument("files", nargs="*", metavar="FILE",
                     help='log files ("-" or none: standard input), e.g. the output of '
                          "journalctl -u policyd-ipv6 -o cat or -o short-iso")
    sub.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_argument("--top", type=int, default=10, metavar="N",
                     help="rows in the top sender, prefix and client tables (default: 10)")


def _feed(impact: Impact, stream) -> None:
    for line in stream:
        entry = parse_line(line)
        if entry is None:
            if line.strip():
                impact.skip()
        else:
            impact.add(entry)


def report(args, stdin=None, stdout=None) -> int:
    stdout = stdout if stdout is not None else sys.stdout
    impact = Impact(max(1, args.top))
    for name in args.files or ["-"]:
        if name == "-":
            # Wrapped only when read: a wrapper closes the buffer under it when collected,
            # which a caller's replacement of sys.stdin (pytest's) may refuse.
            if stdin is None:
                stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8",
                                         errors="backslashreplace")
            _feed(impact, stdin)
            continue
        try:
            with open(name, encoding="utf-8", errors="backslashreplace") as handle:
                _feed(impact, handle)
        except OSError as error:
            print(f"policyd-ipv6: report: cannot read {name}: {error.strerror}",
                  file=sys.stderr)
            return 1
    result = impact.result()
    if args.json:
        stdout.write(json.dumps(result, sort_keys=False) + "\n")
    else:
        stdout.write(render_text(result))
    return 0
