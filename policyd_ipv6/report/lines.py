"""Parse the daemon's decision and milter log lines (``policy.engine``, ``milter.server``).

Contract: ``parse_line(text)`` returns an ``Entry`` for a decision line (``decision
client=... rule=... reply="..."``) or a milter verdict line (``milter client=... rule=...
reply="..."``), else None; it never raises on any string. A line may carry, in front: a
journalctl ``short-iso`` (or ``short-iso-precise``) prefix ``TIME HOST NAME[PID]: ``, an
sd-daemon priority ``<N>``, and the level word (``info``) the daemon writes; what ``-o cat``
prints and what the daemon writes to standard output are both accepted. Values stay as the
daemon escaped them (``text.printable``), quotes removed; the milter line's ``dkim=`` of
earlier versions, unquoted ``pass(d=... s=...)`` with the sender's spaces and "=" in it, is
read as one value too. ``outcome(reply, would)`` names an outcome as the metrics do:
``accept``, ``defer`` (4xx or TEMPFAIL), ``reject`` (5xx or REJECT) or ``report`` (accepted,
a refusal only reported). Pure: no I/O, no Twisted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Entry", "parse_line", "outcome", "OUTCOMES", "sender_key"]

OUTCOMES = ("accept", "defer", "reject", "report")

# journalctl -o short-iso: "2026-05-01T10:00:00+0000 mx policyd-ipv6[812]: " (-precise adds
# microseconds); the host and the identifier are single words.
_JOURNAL = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?) "
    r"\S+ [^\s:]+(?:\[\d+\])?: ")
_PRIORITY = re.compile(r"<[0-7]>")
_LEVELS = ("debug ", "info ", "warn ", "error ", "critical ")
# key=value or key="value with \" and \\ escaped" (text.printable escapes both).
_FIELD = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"]\S*|)')
# A milter line before dkim= was quoted: dkim=pass(d=... s=...), d= and s= escaped but with
# their spaces and "=". The value ends at the first ")" followed by the daemon's own rule=
# and a quoted would= or reply=: escaped text cannot hold that, each of its " follows a \.
_OLD_DKIM = re.compile(r'pass\((?:[^"\\]|\\.)*?\)(?= rule=[a-z0-9-]+ (?:would|reply)=")')
MAX_LINE = 8192  # a decision line is under 2 KB; anything longer is not one of ours


@dataclass(frozen=True)
class Entry:
    """One decision (``kind`` "decision", at RCPT) or milter verdict (``kind`` "milter", at
    end of message)."""

    kind: str
    fields: dict[str, str] = field(hash=False)
    time: str = ""  # the journal's timestamp, when the line had one

    def get(self, key: str) -> str:
        return self.fields.get(key, "")

    @property
    def rule(self) -> str:
        return self.fields["rule"]

    @property
    def outcome(self) -> str:
        return outcome(self.fields["reply"], self.get("would"))


def outcome(reply: str, would: str = "") -> str:
    """The outcome of a reply (``DUNNO``, ``450 4.7.25 ...``, ``TEMPFAIL``, ``CONTINUE``)."""
    first = reply[:1]
    if first == "4" or reply == "TEMPFAIL":
        return "defer"
    if first == "5" or reply == "REJECT":
        return "reject"
    return "report" if would else "accept"


def sender_key(sender: str) -> str:
    """A sender as both line kinds can match it: the milter's ``<a@b>`` and the policy
    request's ``a@b`` are the same sender; the null sender is ``<>``."""
    bare = sender.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1]
    return bare.lower() or "<>"


def parse_line(text: str) -> Entry | None:
    """The entry a log line records, or None when it is not a decision or milter line."""
    if len(text) > MAX_LINE:
        return None
    line = text.rstrip("\r\n")
    time = ""
    match = _JOURNAL.match(line)
    if match:
        time = match.group("time")
        line = line[match.end():]
    if _PRIORITY.match(line):
        line = line[3:]
    for level in _LEVELS:
        if line.startswith(level):
            line = line[len(level):]
            break
    kind, _, rest = line.partition(" ")
    if kind not in ("decision", "milter"):
        return None
    fields: dict[str, str] = {}
    position = 0
    while (found := _FIELD.search(rest, position)) is not None:
        if rest[position:found.start()].strip():
            return None  # text between fields: not a line the daemon wrote
        value, position = found.group(2), found.end()
        if value.startswith('"'):
            value = value[1:-1]
        elif (kind == "milter" and found.group(1) == "dkim" and value.startswith("pass(")
              and "dkim" not in fields):  # the first one only: one scan to its end at most
            old = _OLD_DKIM.match(rest, found.start(2))
            if old:
                value, position = old.group(), old.end()
        fields.setdefault(found.group(1), value)
    if rest[position:].strip() or "rule" not in fields or "reply" not in fields:
        return None
    if not fields["rule"] or "client" not in fields:
        return None
    return Entry(kind, fields, time)
