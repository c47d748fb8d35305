"""The policy engine: one request in, one verdict out, with the decision's log line.

Contract: ``PolicyEngine.answer(attributes)`` returns a Deferred that fires (never fails) with
an ``Outcome``: the ``Verdict`` and what the log line reports. ``answer_now(attributes)`` is the
same decision without the Deferred when it can be made at once: it returns the ``Outcome``
itself when no fact is needed or every needed fact is already known (from the caches or
another recipient of the message), else a Deferred as ``answer`` does; it may raise where
``answer`` would fail. ``answer_with(attributes, deliver, failed)`` is ``answer_now`` without
the Deferred: the ``Outcome`` when it is known at once, else None, and later one call of
``deliver(outcome)`` or, on a bug, of ``failed(failure)``. It asks ``decide`` first with no
facts; only when the table needs one does it start (or join) the message's lookups, and it
decides again each time a needed fact arrives. It holds no socket and writes no reply: the
Twisted adapter (``policy.server``) does that, through ``answer_with``; the ``check`` command
uses ``answer``.

With a ``sessions`` registry (the built-in milter is configured), a request about a message
the milter is collecting may be answered DUNNO although SPF failed (the milter checks DKIM at
end of message), and every verdict reached while that message is open is recorded on it
(``sessions.MessageRecord``). Without one, or for a connection the milter is not on, SPF alone
decides at RCPT.

Log format (one line per decision, ``key=value``, untrusted values quoted and escaped):
``decision client=... helo="..." sender="..." recipient="..." instance=... rdns=... spf=...
rule=... [would="..."] reply="..." [tls=...] [queue_id=...] facts=new|shared|none ms=...``:
``would`` is a refusal only reported (report mode, ``report_only_rules``, ``unlisted_domains =
"report"``), ``tls`` the session's TLS protocol (absent for a plaintext session), ``queue_id``
Postfix's queue id when it sent one. ``log_decisions`` ("all", "ipv6" or "refusals", the key of
the same name) chooses which decisions are logged; ``policyd_ipv6.report`` reads these lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from policyd_ipv6.facts import Facts
from policyd_ipv6.live import Live, Setting
from policyd_ipv6.policy.decision import Need, Policy, Subject, Verdict, decide, entry_rdns
from policyd_ipv6.text import printable
from policyd_ipv6.vocabulary import Clock, PolicyRule

__all__ = ["PolicyEngine", "Outcome", "logged"]

_log = Logger(namespace="policyd-ipv6")
_NO_FACTS = Facts()


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    subject: Subject
    facts: Facts
    facts_source: str  # "none" (no lookups needed), "new" or "shared" (another recipient's)
    elapsed_ms: float

    def log_line(self) -> str:
        s, f, v = self.subject, self.facts, self.verdict
        rdns = f.rdns.describe() if f.rdns else "-"
        spf = f.spf.describe() if f.spf else "-"
        # The common case at C speed: every untrusted value already printable ASCII without
        # a quote or backslash, and within its bound, so printable() would return it as it is
        # (``_log_line_escaped`` is the general case, and the reference a test holds this to).
        values = (s.client_address + s.helo_name + s.sender + s.recipient + s.instance + rdns
                  + v.action + v.would + s.encryption_protocol + s.queue_id)
        if not (values.isascii() and values.isprintable() and '"' not in values
                and "\\" not in values and len(s.client_address) <= 64
                and len(s.helo_name) <= 100 and len(s.sender) <= 200
                and len(s.recipient) <= 200 and 0 < len(s.instance) <= 40
                and len(rdns) <= 100 and len(v.action) <= 300 and len(v.would) <= 300
                and len(s.encryption_protocol) <= 20 and len(s.queue_id) <= 20):
            return self._log_line_escaped()
        return "".join((
            f'decision client={s.client_address} helo="{s.helo_name}" sender="{s.sender}" '
            f'recipient="{s.recipient}" instance={s.instance} rdns={rdns} spf={spf} '
            f"rule={v.rule}",
            f' would="{v.would}"' if v.would else "",
            f' reply="{v.action}"',
            f" tls={s.encryption_protocol}" if s.encryption_protocol else "",
            f" queue_id={s.queue_id}" if s.queue_id else "",
            f" facts={self.facts_source} ms={self.elapsed_ms:.1f}"))

    def _log_line_escaped(self) -> str:
        s, f = self.subject, self.facts
        fields = [
            "decision",
            f"client={printable(s.client_address, 64)}",
            f'helo="{printable(s.helo_name, 100)}"',
            f'sender="{printable(s.sender, 200)}"',
            f'recipient="{printable(s.recipient, 200)}"',
            f"instance={printable(s.instance, 40) or '-'}",
            f"rdns={printable(f.rdns.describe(), 100) if f.rdns else '-'}",
            f"spf={f.spf.describe() if f.spf else '-'}",
            f"rule={self.verdict.rule}",
        ]
        if self.verdict.would:
            fields.append(f'would="{printable(self.verdict.would, 300)}"')
        fields.append(f'reply="{printable(self.verdict.action, 300)}"')
        if s.encryption_protocol:
            fields.append(f"tls={printable(s.encryption_protocol, 20)}")
        if s.queue_id:
            fields.append(f"queue_id={printable(s.queue_id, 20)}")
        fields += [f"facts={self.facts_source}", f"ms={self.elapsed_ms:.1f}"]
        return " ".join(fields)


class PolicyEngine:
    """See the module docstring. ``optin`` is a zero-argument callable giving the live table."""

    # Reloadable: read from the configuration in force once the wiring sets ``live``.
    policy = Setting("policy", derived=True)
    log_decisions = Setting("log_decisions")  # "all", "ipv6" or "refusals"
    live: Live | None = None

    def __init__(self, policy: Policy, optin, finder, clock: Clock, sessions=None) -> None:
        self.policy = policy
        self.optin = optin
        self.finder = finder
        self.clock = clock
        # Which SMTP sessions have the built-in milter in their path (None: no milter); the
        # engine records its verdicts there for the milter's end-of-message decision.
        self.sessions = sessions
        self.log_decisions = "all"  # the key log_decisions: "all", "ipv6" or "refusals"

    def answer(self, attributes: dict[str, str]) -> defer.Deferred[Outcome]:
        try:
            outcome = self.answer_now(attributes)
        except Exception:
            return defer.fail()
        return outcome if isinstance(outcome, defer.Deferred) else defer.succeed(outcome)

    def answer_now(self, attributes: dict[str, str]) -> Outcome | defer.Deferred[Outcome]:
        result: defer.Deferred[Outcome] = defer.Deferred()
        outcome = self.answer_with(attributes, result.callback, result.errback)
        return result if outcome is None else outcome

    def answer_with(self, attributes: dict[str, str], deliver: Callable[[Outcome], object],
                    failed: Callable[[Failure], object]) -> Outcome | None:
        start = self.clock.seconds()
        subject = Subject.from_request(attributes)
        optin = self.optin()
        policy = self.policy
        entry = optin.entry(subject.recipient_domain)  # looked up once for the walks
        first = decide(subject, _NO_FACTS, policy, optin, 0, entry)
        if isinstance(first, Verdict):
            return self._done(first, subject, _NO_FACTS, "none", start)
        if first is not Need.RDNS and first is not Need.SPF:  # pragma: no cover
            raise AssertionError(first)
        message, shared = self.finder.for_message(subject, entry_rdns(entry))
        walk = _Walk(self, subject, message, policy, optin, entry,
                     self._milter_message(attributes), "shared" if shared else "new", start)
        known = message.facts.rdns if first is Need.RDNS else message.facts.spf
        if known is None:
            # Still unknown, so a walk from resume_at would stop at the same fact (the rules
            # before it need none): wait for it without walking again.
            walk.deliver, walk.failed = deliver, failed
            message.wait(first, walk)
            return None
        outcome = walk.step()  # every fact needed already known: decided now
        if outcome is None:
            walk.deliver, walk.failed = deliver, failed
        return outcome

    def _milter_message(self, attributes: dict[str, str]):
        """The built-in milter's record of this request's message (``sessions``), or None."""
        return None if self.sessions is None else self.sessions.message_for(attributes)

    def _done(self, verdict: Verdict, subject: Subject, facts: Facts, source: str,
              start: float) -> Outcome:
        outcome = Outcome(verdict, subject, facts, source, (self.clock.seconds() - start) * 1000)
        if verdict.rule == PolicyRule.WRONG_STAGE:
            _log.warn("policy request at protocol_state={state}: policyd-ipv6 belongs in "
                      "smtpd_recipient_restrictions (answering DUNNO)",
                      state=printable(subject.protocol_state, 20))
        if logged(self.log_decisions, subject, verdict):
            _log_decision(outcome.log_line())
        return outcome


class _Walk:
    """The rest of a request's decision once it waits for a fact: each call (the fact came)
    walks the table again from ``resume_at``; the verdict goes to ``deliver``, a bug to
    ``failed`` (a plain object, not a closure naming itself: no reference cycle per request)."""

    __slots__ = ("engine", "subject", "message", "policy", "optin", "entry", "milter", "source",
                 "start", "deliver", "failed")

    def __init__(self, engine: PolicyEngine, subject: Subject, message: Any, policy: Policy,
                 optin: Any, entry: Any, milter: Any, source: str, start: float) -> None:
        self.engine, self.subject, self.message = engine, subject, message
        self.policy, self.optin, self.entry = policy, optin, entry
        self.milter, self.source, self.start = milter, source, start
        self.deliver: Callable[[Outcome], object] | None = None
        self.failed: Callable[[Failure], object] | None = None

    def __call__(self, _facts: Facts) -> None:
        try:
            outcome = self.step()
        except Exception:
            failed, self.failed, self.deliver = self.failed, None, None
            if failed is not None:
                failed(Failure())
            return
        if outcome is not None:
            deliver, self.deliver, self.failed = self.deliver, None, None
            if deliver is not None:
                deliver(outcome)

    def step(self) -> Outcome | None:
        """The Outcome, or None when it waits for the next fact (this is called again)."""
        # Asked again at each step: if the milter's message ended while the lookups ran
        # (connection lost), nobody will check DKIM, so SPF alone decides.
        milter = self.milter
        pending = milter is not None and milter.open
        facts = self.message.facts
        if facts.dkim_pending != pending:
            facts = Facts(facts.rdns, facts.spf, pending)
        verdict = decide(self.subject, facts, self.policy, self.optin, self.policy.resume_at,
                         self.entry)
        if isinstance(verdict, Need):
            self.message.wait(verdict, self)
            return None
        if pending:
            milter.record(self.subject, verdict, facts)  # read back at end of message
        return self.engine._done(verdict, self.subject, facts, self.source, self.start)


def _log_decision(line: str) -> None:
    """``_log.info("{line}", line=line)`` without Logger.emit's check of the level against
    every LogLevel constant, which costs more than the line itself on the warm path."""
    publish: Any = _log.observer  # a zope interface to mypy, a plain callable in fact
    publish({"line": line, "log_logger": _log, "log_level": LogLevel.info,
             "log_namespace": _log.namespace, "log_source": None, "log_format": "{line}",
             "log_time": time.time()})


def logged(which: str, subject: Subject, verdict: Verdict) -> bool:
    """Whether ``log_decisions = which`` logs this decision: "ipv6" only IPv6 clients',
    "refusals" only refusals (4xx, 5xx) and refusals only reported (would=)."""
    if which == "ipv6":
        return subject.ip is not None and subject.ip.version == 6
    if which == "refusals":
        return bool(verdict.would) or verdict.action[:1] in ("4", "5")
    return True
