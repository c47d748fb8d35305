"""Aggregate parsed log entries into the impact report, as text tables or one JSON object.

Contract: ``Impact`` takes entries in log order (``add(entry)``; ``skip()`` for a line that
was not one) and ``result()`` returns a plain dictionary, the ``--json`` object: ``rules``
(rule name -> count), ``outcomes`` (``accept``/``defer``/``reject``/``report`` -> count, as
in the metrics), ``rule_outcomes`` (rule -> outcome -> count), ``unparsed_lines``, ``entries``,
``refusals_by_recipient_domain`` (domain -> ``{"refused": n, "would": n}``), the top ``limit``
``sender_domains``, ``client_prefixes`` (IPv6 /64) and ``ptr_less_clients`` among refusals and
would-be refusals, and ``deferred``: for each sender and recipient deferred (4xx, at RCPT or
after DATA), how often, and whether the same sender later reached that recipient (``reached``,
``via`` "retry" or "ipv4"). ``render_text(result)`` formats it as text tables.

A milter line names no recipient: its recipients are those of the decisions its message got at
RCPT (rules ``pass``, ``spf-failed-dkim-pending`` and ``no-rdns-dkim-pending``, or a refusal only
reported: those let the message on to end of message). A message is Postfix's ``instance`` for
one client and sender; its queue id is the ``queue_id`` any of its decisions carries (Postfix
sends one from the first accepted recipient on). The milter line's message is the one with its
``queue_id``; when the line has none, or no decision carried it, the last message of the same
client and sender before it, among those whose queue id is not known to differ. A decision of
``spf-failed-dkim-pending`` or ``no-rdns-dkim-pending`` is not yet a delivery: the milter line
that follows says whether the message got in. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict

from policyd_ipv6.milter.registry import DKIM_PENDING_RULE, PASS_RULE, RDNS_PENDING_RULE
from policyd_ipv6.report.lines import OUTCOMES, Entry, sender_key

__all__ = ["Impact", "render_text"]

# DUNNO at RCPT that only the milter's verdict makes a delivery (or a refusal).
_PROVISIONAL = (DKIM_PENDING_RULE, RDNS_PENDING_RULE)
_TO_MILTER = (PASS_RULE, *_PROVISIONAL)  # decisions the milter's verdict completes
MAX_OPEN = 100_000  # messages awaiting their milter line: bounded, oldest forgotten first
MAX_OPEN_PER_SENDER = 64  # of one client and sender (concurrent ones), oldest forgotten first


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else "(none)"


def _prefix(client: str) -> str:
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client or "-"
    bits = 64 if ip.version == 6 else 32
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def _is_ipv4(client: str) -> bool:
    try:
        return ipaddress.ip_address(client).version == 4
    except ValueError:
        return False


class _Message:
    """A message awaiting its milter line: its queue id once a decision named it, and the
    recipients the milter's verdict completes."""

    __slots__ = ("queue_id", "recipients")

    def __init__(self) -> None:
        self.queue_id = ""
        self.recipients: list[str] = []


class Impact:
    def __init__(self, limit: int = 10) -> None:
        self.limit = limit
        self.entries = 0
        self.unparsed = 0
        self.rules: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter({name: 0 for name in OUTCOMES})
        self.rule_outcomes: dict[str, Counter[str]] = defaultdict(Counter)
        self.by_domain: dict[str, Counter[str]] = defaultdict(Counter)
        self.senders: Counter[str] = Counter()
        self.prefixes: Counter[str] = Counter()
        self.ptr_less: Counter[str] = Counter()
        # (client, sender, instance) -> the message the milter has yet to judge, oldest first
        self.open: dict[tuple[str, str, str], _Message] = {}
        self.queued: dict[str, tuple[str, str, str]] = {}  # queue id -> its open message
        self.latest: dict[tuple[str, str], list[str]] = {}  # (client, sender) -> instances
        # (sender, recipient) -> {"deferrals", "rules", "reached", "via"}
        self.deferred: dict[tuple[str, str], dict] = {}

    def skip(self) -> None:
        self.unparsed += 1

    def add(self, entry: Entry) -> None:
        self.entries += 1
        rule, result = entry.rule, entry.outcome
        self.rules[rule] += 1
        self.outcomes[result] += 1
        self.rule_outcomes[rule][result] += 1
        client, sender = entry.get("client"), sender_key(entry.get("sender"))
        if entry.kind == "decision":
            recipients = [entry.get("recipient").lower()]
            message = (client, sender, entry.get("instance"))
            if result in ("accept", "report") and (rule in _TO_MILTER or entry.get("would")):
                self._hold(message, recipients[0])
            if entry.get("queue_id") and message in self.open:
                self._queue(message, entry.get("queue_id"))
        else:
            queue_id = entry.get("queue_id")  # "-": Postfix sent none
            recipients = self._judged(client, sender, "" if queue_id == "-" else queue_id)
        refused = result in ("defer", "reject")
        if refused or entry.get("would"):
            self._hurt(entry, recipients, refused, sender)
        for recipient in recipients:
            key = (sender, recipient)
            if result == "defer":
                seen = self.deferred.setdefault(
                    key, {"deferrals": 0, "rules": Counter(), "reached": False, "via": None})
                seen["deferrals"] += 1
                seen["rules"][rule] += 1
            elif (result in ("accept", "report") and key in self.deferred
                  and not (entry.kind == "decision" and rule in _PROVISIONAL)):
                seen = self.deferred[key]
                if not seen["reached"]:
                    seen["reached"] = True
                    seen["via"] = "ipv4" if _is_ipv4(client) else "retry"

    def _hold(self, key: tuple[str, str, str], recipient: str) -> None:
        message = self.open.get(key)
        if message is None:
            if len(self.open) >= MAX_OPEN:
                self._forget(next(iter(self.open)))
            instances = self.latest.setdefault(key[:2], [])
            if len(instances) >= MAX_OPEN_PER_SENDER:
                self._forget((*key[:2], instances[0]))
            message = self.open[key] = _Message()
            instances.append(key[2])
        message.recipients.append(recipient)

    def _queue(self, key: tuple[str, str, str], queue_id: str) -> None:
        message = self.open[key]
        if message.queue_id != queue_id:
            if self.queued.get(message.queue_id) == key:
                del self.queued[message.queue_id]
            message.queue_id = queue_id
            self.queued[queue_id] = key

    def _forget(self, key: tuple[str, str, str]) -> list[str]:
        """Close the open message ``key``: its recipients."""
        message = self.open.pop(key)
        if self.queued.get(message.queue_id) == key:
            del self.queued[message.queue_id]
        instances = self.latest[key[:2]]
        instances.remove(key[2])
        if not instances:
            del self.latest[key[:2]]
        return message.recipients

    def _judged(self, client: str, sender: str, queue_id: str) -> list[str]:
        """The recipients of the message a milter line judged (module docstring), now closed."""
        key = self.queued.get(queue_id) if queue_id else None
        if key is None:
            for instance in reversed(self.latest.get((client, sender), ())):
                message = self.open[(client, sender, instance)]
                if not (queue_id and message.queue_id):  # both known, not equal: another one
                    key = (client, sender, instance)
                    break
        return self._forget(key) if key is not None else []

    def _hurt(self, entry: Entry, recipients: list[str], refused: bool, sender: str) -> None:
        column = "refused" if refused else "would"
        for recipient in recipients or ["(unknown)"]:
            self.by_domain[_domain(recipient) if recipient != "(unknown)" else recipient][
                column] += 1
        self.senders[_domain(sender) if sender != "<>" else "<>"] += 1
        client = entry.get("client")
        self.prefixes[_prefix(client)] += 1
        if entry.get("rdns").startswith("missing") or entry.rule == "no-rdns":
            self.ptr_less[client] += 1

    def result(self) -> dict:
        def top(counter: Counter[str], name: str) -> list[dict]:
            return [{name: key, "count": n} for key, n in counter.most_common(self.limit)]

        deferred = [
            {"sender": sender, "recipient": recipient, "deferrals": seen["deferrals"],
             "rules": dict(seen["rules"]), "reached": seen["reached"], "via": seen["via"]}
            for (sender, recipient), seen in self.deferred.items()]
        return {
            "entries": self.entries,
            "unparsed_lines": self.unparsed,
            "rules": dict(self.rules.most_common()),
            "outcomes": dict(self.outcomes),
            "rule_outcomes": {rule: dict(c) for rule, c in sorted(self.rule_outcomes.items())},
            "refusals_by_recipient_domain": {
                domain: {"refused": c["refused"], "would": c["would"]}
                for domain, c in sorted(self.by_domain.items(),
                                        key=lambda item: -sum(item[1].values()))},
            "sender_domains": top(self.senders, "domain"),
            "client_prefixes": top(self.prefixes, "prefix"),
            "ptr_less_clients": top(self.ptr_less, "client"),
            "deferred": deferred,
            "deferred_reached": sum(1 for d in deferred if d["reached"]),
        }


def _table(title: str, header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["", title]
    if not rows:
        return lines + ["  (none)"]
    cells = [tuple(str(c) for c in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return lines


def render_text(r: dict) -> str:
    """The report as text tables (the default output)."""
    out = [f"decisions: {r['entries']}  skipped lines: {r['unparsed_lines']}  "
           + "  ".join(f"{name}: {n}" for name, n in r["outcomes"].items())]
    out += _table("by rule and outcome", ("rule", "total", *OUTCOMES),
                  [(rule, r["rules"][rule], *(c.get(o, 0) for o in OUTCOMES))
                   for rule, c in sorted(r["rule_outcomes"].items(),
                                         key=lambda item: -r["rules"][item[0]])])
    out += _table("refusals by recipient domain", ("domain", "refused", "would be"),
                  [(d, c["refused"], c["would"])
                   for d, c in r["refusals_by_recipient_domain"].items()])
    out += _table("sender domains refused or would be", ("domain", "count"),
                  [(e["domain"], e["count"]) for e in r["sender_domains"]])
    out += _table("client prefixes refused or would be", ("prefix", "count"),
                  [(e["prefix"], e["count"]) for e in r["client_prefixes"]])
    out += _table("clients without PTR refused or would be", ("client", "count"),
                  [(e["client"], e["count"]) for e in r["ptr_less_clients"]])
    out += _table(f"deferred sender and recipient ({r['deferred_reached']} of "
                  f"{len(r['deferred'])} reached later)",
                  ("sender", "recipient", "deferrals", "later", "rules"),
                  [(d["sender"], d["recipient"], d["deferrals"],
                    (f"reached ({d['via']})" if d["reached"] else "not reached"),
                    ",".join(d["rules"])) for d in r["deferred"]])
    return "\n".join(out) + "\n"
