"""The value parsers of the configuration keys (``config.Config``'s fields).

Contract: each parser takes ``(key, raw TOML value)`` and returns the checked value or raises
``ValueError`` whose message names the key and the bad value (``bad()``); a parser with bounds
has ``describe()``, the sentence the documentation shows ("Between 1 and 5."). Pure: no I/O,
no Twisted. The rollout keys' parsers (``report_rules``, ``local_parts``, ``fingerprints``,
``domain_entries``) normalise as the decision compares: local parts case-folded, fingerprints
as lower-case hex without colons, domains as opt-in keys.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from policyd_ipv6.names import domain_key
from policyd_ipv6.policy.replies import Replies, validate_reply
from policyd_ipv6.resolver.wire import Nameserver
from policyd_ipv6.vocabulary import REPORTABLE_RULES, PolicyRule

__all__ = ["bad", "show", "Number", "number", "string_list", "endpoints", "authserv_id", "path",
           "choice", "networks", "parse_nameserver", "nameservers", "user", "users",
           "replies", "report_rules", "local_parts", "fingerprints", "domain_entries",
           "sql_query", "channel"]

_AUTHSERV_ID = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{key} = {show(value)}: {why}")


def show(value: Any) -> str:
    if isinstance(value, str):
        if not value.isprintable():  # a control character is shown, not sent to the terminal
            value = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode()
                            for ch in value)
        text = '"' + value + '"'
    else:
        text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class Number:
    """A number between ``low`` and ``high`` (a whole number when ``integer``)."""

    def __init__(self, low: float, high: float, integer: bool = False) -> None:
        self.low, self.high, self.integer = low, high, integer

    def __call__(self, key: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                self.integer and not isinstance(value, int)):
            raise bad(key, value, "must be " + ("a whole number" if self.integer else "a number"))
        if not self.low <= value <= self.high:
            raise bad(key, value, f"must be between {self.low} and {self.high}")
        return value

    def describe(self) -> str:
        return f"Between {plain(self.low)} and {plain(self.high)}."


def plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def number(low: float, high: float, integer: bool = False) -> Number:
    return Number(low, high, integer)


def string_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(key, value, "must be a list of strings")
    return tuple(value)


def endpoints(key: str, value: Any) -> tuple[str, ...]:
    items = string_list(key, value)
    if not items:
        raise bad(key, value, "must name at least one endpoint")
    return items


def authserv_id(key: str, value: Any) -> str:
    # RFC 8601 §2.5: a name the receiving domain controls, usually the host name; it goes
    # into a header unquoted, so only host-name characters are allowed.
    if not isinstance(value, str) or (value and not _AUTHSERV_ID.fullmatch(value)):
        raise bad(key, value, 'must be a host name such as "mx.example.com" (or "" for this '
                   "host's name)")
    return value


def path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise bad(key, value, "must be a file path")
    if "\0" in value:  # no file name holds one: open() would raise ValueError, not OSError
        raise bad(key, value, "must be a file path (it contains a NUL character)")
    return value


def choice(*choices: str):
    def parse(key: str, value: Any) -> str:
        if value not in choices:
            raise bad(key, value, "must be " + " or ".join(f'"{c}"' for c in choices))
        return value
    return parse


def networks(key: str, value: Any) -> tuple:
    nets = []
    for item in string_list(key, value):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise bad(key, item, "is not an IP network (such as 192.0.2.0/24 or "
                       "2001:db8::/32)") from None
    return tuple(nets)


def parse_nameserver(text: str) -> Nameserver:
    """ "192.0.2.53", "192.0.2.53:5353", "2001:db8::53" or "[2001:db8::53]:5353"."""
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(text)
        if rest:
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = int(port_text)
    address = ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(text)
    return Nameserver(str(address), port)


def nameservers(key: str, value: Any) -> tuple[Nameserver, ...]:
    servers = []
    for item in string_list(key, value):
        try:
            servers.append(parse_nameserver(item))
        except ValueError:
            raise bad(key, item, 'is not "ADDRESS", "ADDRESS:PORT" or "[IPv6]:PORT"') from None
    return tuple(servers)


def user(key: str, value: Any) -> str:
    if not isinstance(value, str) or (value and not value.replace("-", "").replace("_", "")
                                      .replace(".", "").isalnum()):
        raise bad(key, value, "must be a user name")
    return value


def users(key: str, value: Any) -> tuple[str, ...]:
    names = string_list(key, value)
    if not names:
        raise bad(key, value, "must name at least one user")
    for name in names:
        if not name:
            raise bad(key, name, "must be a user name")
        user(key, name)
    return names


def replies(key: str, value: Any) -> Replies:
    if not isinstance(value, dict):
        raise bad(key, value, "must be a table ([replies])")
    defaults = Replies()
    texts = {}
    for name, text in value.items():
        if not hasattr(defaults, name):
            raise bad(f"{key}.{name}", text, "unknown reply; known: "
                       + ", ".join(Replies.__dataclass_fields__))
        texts[name] = validate_reply(f"{key}.{name}", text, temporary=(name == "temporary"))
    return Replies(**texts)


def report_rules(key: str, value: Any) -> frozenset[PolicyRule]:
    known = ", ".join(REPORTABLE_RULES)
    rules = set()
    for item in string_list(key, value):
        if item not in REPORTABLE_RULES:
            raise bad(key, item, f"is not a rule that refuses (rules: {known})")
        rules.add(PolicyRule(item))
    return frozenset(rules)


def local_parts(key: str, value: Any) -> tuple[str, ...]:
    parts = []
    for item in string_list(key, value):
        if not item or "@" in item or any(c.isspace() for c in item) or not item.isprintable():
            raise bad(key, item, 'must be a local part without "@" (such as "postmaster")')
        parts.append(item.casefold())
    return tuple(dict.fromkeys(parts))


def fingerprints(key: str, value: Any) -> tuple[str, ...]:
    # Postfix sends ccert_fingerprint as colon-separated upper-case hex pairs
    # (smtpd_tls_fingerprint_digest = sha256): compared without colons, in lower case.
    found = []
    for item in string_list(key, value):
        text = item.replace(":", "").lower()
        if not _FINGERPRINT.fullmatch(text):
            raise bad(key, item, "is not a SHA-256 fingerprint (64 hex digits, colons "
                      "optional)")
        found.append(text)
    return tuple(dict.fromkeys(found))


def domain_entries(key: str, value: Any) -> tuple[str, ...]:
    """Opt-in style entries: "example.com" exactly, ".example.com" its subdomains."""
    entries = []
    for item in string_list(key, value):
        parent = item.startswith(".")
        name = domain_key(item[1:] if parent else item)
        if name is None:
            raise bad(key, item, 'is not "example.com" or ".example.com"')
        entries.append(("." if parent else "") + name)
    return tuple(dict.fromkeys(entries))


def sql_query(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise bad(key, value, "must be an SQL query returning domain and options")
    return value


def channel(key: str, value: Any) -> str:
    # A PostgreSQL identifier: at most 63 bytes (NAMEDATALEN - 1), compared exactly as
    # pg_notify() and a quoted LISTEN name it.
    if (not isinstance(value, str) or not value or "\0" in value
            or len(value.encode("utf-8")) > 63):
        raise bad(key, value, "must be a channel name of 1 to 63 bytes")
    return value
