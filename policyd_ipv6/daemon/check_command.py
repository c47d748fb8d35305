"""``policyd-ipv6 check``: decide one request as the daemon would, and explain it.

Contract: ``check(config, args)`` builds the same service parts as ``serve`` (same lookups,
same decision table), decides one RCPT-stage request made from the command-line options,
prints ``action=<reply>`` as the first line of standard output, then ``would: <reply>`` when
a refusal was only reported (report mode, ``report_only_rules``, ``unlisted_domains =
"report"``, or the milter's in report mode), then one line per step that was evaluated, and
returns 0. It raises ``ConfigError`` like ``serve``.

With ``args.message`` (a stored RFC 5322 message, ``--message FILE``) it decides as the policy
service and the built-in milter together would: the RCPT-stage request as if the milter were
on the connection, then the end-of-message rules (``end_of_message``) on that message, its
DKIM signatures verified with the configured nameservers. The first line is then the reply
the SMTP client would get, at RCPT or after DATA (``action=DUNNO`` when the message would be
taken), and the trace adds each signature's result and the Authentication-Results header.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from twisted.internet import defer

from policyd_ipv6.checks.dkim import check_dkim
from policyd_ipv6.daemon.wiring import PolicyService, authserv_id
from policyd_ipv6.milter.codec import ReplyCode
from policyd_ipv6.milter.end_of_message import decide_end, forged_deletions, needs_check
from policyd_ipv6.milter.events import Header
from policyd_ipv6.milter.registry import MessageRecord
from policyd_ipv6.milter.session import DEFAULT_MAX_HEADERS, DEFAULT_MAX_MESSAGE_BYTES
from policyd_ipv6.optin.postgresql import PostgresOptin
from policyd_ipv6.policy.decision import RULES
from policyd_ipv6.policy.engine import Outcome

__all__ = ["check", "trace_lines", "read_message"]


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


class _MilterOnConnection:
    """The ``sessions`` registry as the engine sees it when the milter is on the connection."""

    def __init__(self, record: MessageRecord) -> None:
        self.record = record

    def message_for(self, attributes) -> MessageRecord:
        return self.record


def read_message(path: str) -> tuple[bytes, tuple[Header, ...]]:
    """A stored message as Postfix passes it to a milter: CRLF line ends (an mbox "From "
    line dropped), and its headers (unfolded with bare LF, counted per name)."""
    with open(path, "rb") as handle:
        data = handle.read(DEFAULT_MAX_MESSAGE_BYTES + 1)
    if data.startswith(b"From "):
        data = data.partition(b"\n")[2]
    data = re.sub(rb"\r?\n", b"\r\n", data)
    head = data.split(b"\r\n\r\n", 1)[0]
    headers: list[Header] = []
    counts: dict[bytes, int] = {}
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and headers:
            last = headers[-1]
            headers[-1] = Header(last.name, last.value + b"\n" + line, last.index)
        elif b":" in line:
            name, _, value = line.partition(b":")
            counts[name.lower()] = counts.get(name.lower(), 0) + 1
            headers.append(Header(name.rstrip(), value, counts[name.lower()]))
    return data, tuple(headers)


def dkim_lines(dkim) -> list[str]:
    if not dkim.signatures:
        return ["DKIM: none (the message is not signed)"]
    lines = [f"DKIM: {dkim.describe()}"]
    for sig in dkim.signatures:
        lines.append(f"DKIM signature d={sig.domain or '?'} s={sig.selector or '?'}: "
                     f"{sig.result}" + (f" ({sig.reason})" if sig.reason else ""))
    return lines


@defer.inlineCallbacks
def _decide(parts, args, record, data, headers):
    yield parts.ready()  # the opt-in table (from PostgreSQL: its first load)
    outcome = yield parts.engine.answer(request_from_args(args))
    if record is None:
        return outcome, None, None
    dkim = yield check_dkim(parts.lookups, data)
    too_large = len(data) > DEFAULT_MAX_MESSAGE_BYTES or len(headers) > DEFAULT_MAX_HEADERS
    if outcome.verdict.action != "DUNNO":
        return outcome, dkim, None  # refused at RCPT: no end of message
    end = decide_end(record, too_large, dkim if needs_check(record, too_large) else None,
                     parts.engine.policy.replies, authserv_id(parts.config),
                     forged_deletions(headers, authserv_id(parts.config)))
    return outcome, dkim, end


def check(config, args) -> int:
    from twisted.internet import reactor as global_reactor

    # Twisted types it with zope interfaces, whose methods mypy cannot call (no self).
    reactor: Any = global_reactor

    message = getattr(args, "message", None)
    data: bytes = b""
    headers: tuple[Header, ...] = ()
    if message:
        try:
            data, headers = read_message(message)
        except OSError as error:
            print(f"policyd-ipv6: cannot read --message {message}: {error.strerror}",
                  file=sys.stderr)
            return 1
    parts = PolicyService(config, reactor, keep_state=False)
    record = MessageRecord(args.sender) if message else None
    if record is not None:
        parts.engine.sessions = _MilterOnConnection(record)
    done: list[Any] = []

    def run() -> None:
        d = _decide(parts, args, record, data, headers)
        d.addBoth(done.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    parts.optin.stop()
    if not isinstance(done[0], tuple):
        done[0].raiseException()
    outcome, dkim, end = done[0]
    action = outcome.verdict.action
    if end is not None and isinstance(end.response, ReplyCode):
        action = end.response.text  # refused after DATA
    print(f"action={action}")
    would = outcome.verdict.would or (end.would if end is not None else "")
    if would:  # a refusal only reported (report mode, report_only_rules, unlisted_domains)
        print(f"would: {would}")
    optin_matches = parts.optin.table.matches(outcome.subject.recipient_domain)
    lines = trace_lines(outcome, optin_matches)
    if isinstance(parts.optin, PostgresOptin):  # describe() shows a password as ***
        lines.insert(1, f"opt-in table: {parts.optin.describe()} ({parts.optin.origin}, "
                     f"{len(parts.optin.table)} entries)")
    if dkim is not None:
        lines += dkim_lines(dkim)
    if end is not None:
        said = (end.response.text if isinstance(end.response, ReplyCode)
                else end.response.name.lower())
        lines.append(f"end of message: {end.rule}: {said}")
        if end.auth_results:
            lines.append("Authentication-Results:" + end.auth_results.replace("\n\t", " "))
    elif record is not None:
        lines.append("end of message: not reached (refused at RCPT)")
    if record is not None and not config.milter_listen:
        lines.append("note: milter_listen is empty in this configuration: the daemon itself "
                     "would decide on SPF alone, at RCPT")
    for line in lines:
        print("  " + line)
    return 0
