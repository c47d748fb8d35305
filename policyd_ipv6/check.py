"""``policyd-ipv6 check``: decide one request as the daemon would, and explain it.

Contract: ``check(config, args)`` builds the same service parts as ``serve`` (same lookups,
same decision table), decides one RCPT-stage request made from the command-line options,
prints ``action=<reply>`` as the first line of standard output, then one line per step that
was evaluated, and returns 0. It raises ``ConfigError`` like ``serve``.
"""

from __future__ import annotations

from .decision import RULES
from .engine import Outcome
from .service import PolicyService

__all__ = ["check", "trace_lines"]


def request_from_args(args) -> dict[str, str]:
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": args.client_address,
        "client_name": "unknown",
        "reverse_client_name": "unknown",
        "helo_name": args.helo,
        "sender": args.sender,
        "recipient": args.recipient,
        "sasl_username": args.sasl_username,
        "instance": "",
    }


def trace_lines(outcome: Outcome, optin_matches: bool) -> list[str]:
    """The human-readable steps behind an outcome."""
    s, f = outcome.subject, outcome.facts
    lines = [f"client address: {s.client_address}"
             + (f" (IPv{s.ip.version})" if s.ip is not None else " (not an IP address)")]
    lines.append(f"recipient domain: {s.recipient_domain or '(none)'}: "
                 + ("opted in" if optin_matches else "not in the opt-in table"))
    if f.rdns is not None:
        names = ", ".join(f.rdns.names) or "none"
        lines.append(f"reverse DNS: {f.rdns.outcome.value}; PTR names: {names}; {f.rdns.detail}")
        if f.rdns.confirmed:
            lines.append(f"forward-confirmed name: {f.rdns.confirmed}")
    else:
        lines.append("reverse DNS: not needed for this decision")
    if f.spf is not None:
        lines.append(f"SPF: {f.spf.result} for {f.spf.identity}"
                     + (f" ({f.spf.explanation})" if f.spf.explanation else ""))
    else:
        lines.append("SPF: not needed for this decision")
    order = [rule.name for rule in RULES]
    lines.append(f"rule: {outcome.verdict.rule} (rule {order.index(outcome.verdict.rule) + 1}"
                 f" of {len(order)})")
    lines.append(f"time: {outcome.elapsed_ms:.1f} ms")
    return lines


def check(config, args) -> int:
    from twisted.internet import reactor

    parts = PolicyService(config, reactor)
    done: list[Outcome] = []

    def run() -> None:
        d = parts.engine.answer(request_from_args(args))
        d.addCallback(done.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    outcome = done[0]
    print(f"action={outcome.verdict.action}")
    optin_matches = parts.optin.table.matches(outcome.subject.recipient_domain)
    for line in trace_lines(outcome, optin_matches):
        print("  " + line)
    return 0
