"""``policyd-ipv6 check``: decide requests as the daemon would, and explain them.

Contract: ``check(config, args)`` builds the same service parts as ``serve`` (same lookups,
same decision table) and decides each RCPT-stage request in order: the one made from the
command-line options, or with ``args.requests`` (``--requests FILE``, ``-`` for standard
input) every request of a file of blank-line-separated policy requests exactly as Postfix sends
them. For each it prints ``action=<reply>``, then ``would: <reply>`` when a refusal was only
reported (report mode, ``report_only_rules``, ``unlisted_domains = "report"``, or the
milter's in report mode), then one indented line per step that was evaluated; with
``args.json`` instead one JSON object per request and line: ``reply`` (the action without
``action=``), ``rule``, ``outcome`` (``accept``, ``defer``, ``reject`` or ``report``, as in the
metrics), ``would`` (or null) and ``trace`` (the steps). With ``args.assume_opted_in`` the
recipients' domains are decided as if they were in the opt-in table. It returns the exit
status of the most severe reply (``exit_status``: 5 a permanent refusal, 4 a temporary one, 0
DUNNO), 2 for a request file that cannot be read or parsed, 1 for an internal failure, and
raises ``ConfigError`` like ``serve``. ``check_via(args)`` asks a running daemon instead
(``check_via``): only the reply and its outcome, no trace.

With ``args.message`` (a stored RFC 5322 message, ``--message FILE``) it decides as the policy
service and the built-in milter together would: the RCPT-stage request as if the milter were
on the connection, then the end-of-message rules (``end_of_message``) on that message, its
DKIM signatures verified with the configured nameservers. The first line is then the reply
the SMTP client would get, at RCPT or after DATA (``action=DUNNO`` when the message would be
taken), and the trace adds each signature's result and the Authentication-Results header.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any

from twisted.internet import defer

from policyd_ipv6.checks.dkim import check_dkim
from policyd_ipv6.daemon.check_via import ViaError, ask
from policyd_ipv6.daemon.config import ConfigError
from policyd_ipv6.daemon.wiring import PolicyService, authserv_id
from policyd_ipv6.milter.codec import ReplyCode
from policyd_ipv6.milter.collect import DEFAULT_MAX_HEADERS, DEFAULT_MAX_MESSAGE_BYTES
from policyd_ipv6.milter.end_of_message import decide_end, forged_deletions, needs_check
from policyd_ipv6.milter.events import Header
from policyd_ipv6.milter.registry import MessageRecord
from policyd_ipv6.names import domain_key, recipient_domain
from policyd_ipv6.optin.postgresql import PostgresOptin
from policyd_ipv6.optin.table import OptinEntry, OptinTable
from policyd_ipv6.policy.codec import PolicyDecoder, PolicyProtocolError
from policyd_ipv6.policy.decision import RULES
from policyd_ipv6.policy.engine import Outcome
from policyd_ipv6.report.lines import outcome as outcome_of

__all__ = ["check", "check_via", "trace_lines", "read_message", "read_requests",
           "exit_status"]

_STATUS = {"reject": 5, "defer": 4}  # every other outcome (accept, report) is 0


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


def read_requests(data: bytes) -> list[dict[str, str]]:
    """The policy requests of ``data`` (blank-line-separated, as Postfix sends them; the
    last one's empty line may be missing); raises ValueError for anything else."""
    decoder = PolicyDecoder()
    try:
        requests = decoder.feed(data)
        if decoder.pending:
            requests += decoder.feed(b"\n" if data.endswith(b"\n") else b"\n\n")
    except PolicyProtocolError as error:
        raise ValueError(str(error)) from None
    requests = [r for r in requests if r]  # extra blank lines between requests
    if not requests:
        raise ValueError("no policy request in it")
    return requests


def exit_status(replies: list[str]) -> int:
    """5 if any reply is a permanent refusal, else 4 if any is temporary, else 0."""
    return max((_STATUS.get(outcome_of(reply), 0) for reply in replies), default=0)


def _requests(args) -> list[dict[str, str]] | str:
    """The requests to decide, or the message saying why they cannot be read."""
    if not getattr(args, "requests", None):
        return [request_from_args(args)]
    name = args.requests
    try:
        if name == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(name, "rb") as handle:
                data = handle.read()
        return read_requests(data)
    except OSError as error:
        return f"cannot read --requests {name}: {error.strerror}"
    except ValueError as error:
        return f"--requests {name}: {error}"


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


def assume_opted_in(table: OptinTable, requests: list[dict[str, str]]) -> OptinTable:
    """``table`` with each request's recipient domain added (if not already matched)."""
    exact = dict(table.exact)
    for request in requests:
        # The domain as the engine takes it (Subject.recipient_domain): "<bob@x>", blanks.
        key = domain_key(recipient_domain(request.get("recipient", "")) or "")
        if key is not None and not table.matches(key):
            exact[key] = OptinEntry()
    return dataclasses.replace(table, exact=exact)


@defer.inlineCallbacks
def _decide_all(parts, requests, record, data, headers, opted_in: bool):
    yield parts.ready()  # the opt-in table (from PostgreSQL: its first load)
    if opted_in:
        table = assume_opted_in(parts.optin.table, requests)
        parts.engine.optin = lambda: table
    results = []
    for request in requests:
        result = yield _decide(parts, request, record, data, headers)
        results.append(result)
    return results


@defer.inlineCallbacks
def _decide(parts, request, record, data, headers):
    outcome = yield parts.engine.answer(request)
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

    requests = _requests(args)
    if isinstance(requests, str):
        print(f"policyd-ipv6: check: {requests}", file=sys.stderr)
        return 2
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
    record = MessageRecord(requests[0].get("sender", "")) if message else None
    if record is not None:
        parts.engine.sessions = _MilterOnConnection(record)
    done: list[Any] = []

    def run() -> None:
        d = _decide_all(parts, requests, record, data, headers,
                        getattr(args, "assume_opted_in", False))
        d.addBoth(done.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    parts.optin.stop()
    if not isinstance(done[0], list):
        if done[0].check(ConfigError) is None:  # a bug, not the configuration: exit 1
            print("policyd-ipv6: check: internal failure:\n" + done[0].getTraceback(),
                  file=sys.stderr)
            return 1
        done[0].raiseException()  # the opt-in table did not load: a configuration error
    replies = []
    for outcome, dkim, end in done[0]:
        action, would, lines = _explain(parts, config, outcome, dkim, end, record)
        replies.append(action)
        if getattr(args, "json", False):
            print(json.dumps({"reply": action, "rule": str(outcome.verdict.rule),
                              "end_of_message_rule": str(end.rule) if end is not None else None,
                              "outcome": outcome_of(action, would), "would": would or None,
                              "trace": lines}))
            continue
        print(f"action={action}")
        if would:  # a refusal only reported (report mode, report_only_rules, unlisted_domains)
            print(f"would: {would}")
        for line in lines:
            print("  " + line)
    return exit_status(replies)


def _explain(parts, config, outcome, dkim, end, record) -> tuple[str, str, list[str]]:
    """(the reply, the refusal only reported or "", the trace lines) of one decision."""
    action = outcome.verdict.action
    if end is not None and isinstance(end.response, ReplyCode):
        action = end.response.text  # refused after DATA
    would = outcome.verdict.would or (end.would if end is not None else "")
    optin_matches = parts.engine.optin().matches(outcome.subject.recipient_domain)
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
        # check runs outside systemd: it cannot see whether serve would get a milter socket.
        lines.append("note: milter_listen is empty in this configuration: the daemon itself "
                     "would decide on SPF alone, at RCPT, unless systemd passes it "
                     "policyd-ipv6-milter.socket (a socket named milter turns the milter on)")
    return action, would, lines


def check_via(args) -> int:
    """``check --via``: the running daemon's replies; the exit status as ``check``'s, 1 when
    the daemon does not answer."""
    requests = _requests(args)
    if isinstance(requests, str):
        print(f"policyd-ipv6: check: {requests}", file=sys.stderr)
        return 2
    try:
        replies = ask(args.via, requests)
    except ValueError as error:  # not an endpoint: a usage error
        print(f"policyd-ipv6: check: {error}", file=sys.stderr)
        return 2
    except ViaError as error:
        print(f"policyd-ipv6: check: {error}", file=sys.stderr)
        return 1
    for reply in replies:
        if getattr(args, "json", False):
            print(json.dumps({"reply": reply, "rule": None, "outcome": outcome_of(reply),
                              "would": None, "trace": [f"asked {args.via}"]}))
        else:
            print(f"action={reply}")
    return exit_status(replies)
