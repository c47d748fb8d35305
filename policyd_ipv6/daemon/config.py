"""Configuration: the TOML file, each key defined once with its default, bounds and meaning.

Contract: ``load_config(path)`` reads and validates the file and returns a frozen ``Config``;
``parse_config(text, base_dir)`` does the same for text. Any problem raises ``ConfigError``
whose message names the file, the key and the bad value (an unknown key is an error, not a
warning: a typo must not silently leave a default in force). ``KEYS`` is the schema: the man
page policyd-ipv6.toml(5) and the README list exactly these keys (a test checks it).

What is checked here is what can be checked without side effects; the listen endpoints and
the opt-in file are checked when the service starts (``service``), which also reports them as
configuration errors naming the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from policyd_ipv6.policy.replies import Replies, validate_reply
from policyd_ipv6.resolver.wire import Nameserver

__all__ = ["Config", "ConfigError", "KEYS", "load_config", "parse_config", "DEFAULT_CONFIG_PATH"]

DEFAULT_CONFIG_PATH = "/etc/policyd-ipv6/policyd-ipv6.toml"
_AUTHSERV_ID = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")


class ConfigError(Exception):
    """A configuration problem; the message names the key and the value."""


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    parse: Callable[[str, Any], Any]  # (key, raw value) -> value, raises ValueError
    doc: str


def _bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{key} = {_show(value)}: {why}")


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else '"' + value + '"'
    return text if len(text) <= 120 else text[:117] + "..."


def _number(low: float, high: float, integer: bool = False):
    def parse(key: str, value: Any):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                integer and not isinstance(value, int)):
            raise _bad(key, value, "must be " + ("a whole number" if integer else "a number"))
        if not low <= value <= high:
            raise _bad(key, value, f"must be between {low} and {high}")
        return value
    return parse


def _string_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(key, value, "must be a list of strings")
    return tuple(value)


def _listen(key: str, value: Any) -> tuple[str, ...]:
    items = _string_list(key, value)
    if not items:
        raise _bad(key, value, "must name at least one endpoint")
    return items


def _authserv_id(key: str, value: Any) -> str:
    # RFC 8601 §2.5: a name the receiving domain controls, usually the host name; it goes
    # into a header unquoted, so only host-name characters are allowed.
    if not isinstance(value, str) or (value and not _AUTHSERV_ID.fullmatch(value)):
        raise _bad(key, value, 'must be a host name such as "mx.example.com" (or "" for this '
                   "host's name)")
    return value


def _path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(key, value, "must be a file path")
    return value


def _choice(*choices: str):
    def parse(key: str, value: Any) -> str:
        if value not in choices:
            raise _bad(key, value, "must be " + " or ".join(f'"{c}"' for c in choices))
        return value
    return parse


def _networks(key: str, value: Any) -> tuple:
    nets = []
    for item in _string_list(key, value):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise _bad(key, item, "is not an IP network (such as 192.0.2.0/24 or 2001:db8::/32)") from None
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


def _nameservers(key: str, value: Any) -> tuple[Nameserver, ...]:
    servers = []
    for item in _string_list(key, value):
        try:
            servers.append(parse_nameserver(item))
        except ValueError:
            raise _bad(key, item, 'is not "ADDRESS", "ADDRESS:PORT" or "[IPv6]:PORT"') from None
    return tuple(servers)


def _user(key: str, value: Any) -> str:
    if not isinstance(value, str) or (value and not value.replace("-", "").replace("_", "")
                                      .replace(".", "").isalnum()):
        raise _bad(key, value, "must be a user name")
    return value


def _replies(key: str, value: Any) -> Replies:
    if not isinstance(value, dict):
        raise _bad(key, value, "must be a table ([replies])")
    defaults = Replies()
    texts = {}
    for name, text in value.items():
        if not hasattr(defaults, name):
            raise _bad(f"{key}.{name}", text, "unknown reply; known: "
                       + ", ".join(Replies.__dataclass_fields__))
        texts[name] = validate_reply(f"{key}.{name}", text, temporary=(name == "temporary"))
    return Replies(**texts)


KEYS: tuple[Key, ...] = (
    Key("listen", ["tcp:10045:interface=127.0.0.1"], _listen,
        "Where Postfix reaches the policy service: Twisted server endpoint strings, such as "
        '"tcp:10045:interface=127.0.0.1" or "unix:/var/spool/postfix/private/policyd-ipv6:mode=660".'),
    Key("optin_file", "/etc/policyd-ipv6/optin-domains", _path,
        "The opt-in table: recipient domains that accept mail over IPv6, one per line "
        '("example.com" exactly, ".example.com" its subdomains). Relative to the config file.'),
    Key("rdns", "ptr", _choice("ptr", "fcrdns"),
        '"ptr": the client address must have a PTR record (EOP). "fcrdns": a PTR name must also '
        "resolve back to the client address (Gmail)."),
    Key("trusted_networks", ["127.0.0.0/8", "::1/128"], _networks,
        "Clients in these networks are not subject to the rules."),
    Key("nameservers", [], _nameservers,
        'DNS servers to ask ("ADDRESS", "ADDRESS:PORT", "[IPv6]:PORT"); empty: the nameserver '
        "lines of /etc/resolv.conf. The resolv.conf search list is never used."),
    Key("dns_timeout_seconds", 2.0, _number(0.05, 30),
        "How long to wait for one DNS answer before the next try."),
    Key("dns_attempts", 2, _number(1, 5, integer=True),
        "How many rounds of tries over the nameservers before a lookup fails temporarily."),
    Key("decision_deadline_seconds", 15.0, _number(0.1, 90),
        "Lookups unfinished by then give 451 4.4.3. Keep it well under Postfix's "
        "smtpd_policy_service_timeout (100s)."),
    Key("optin_reload_interval_seconds", 5.0, _number(0, 86400),
        "How often the opt-in file is checked for changes (0: only on SIGHUP)."),
    Key("dns_cache_size", 50_000, _number(1, 10_000_000, integer=True),
        "DNS answers kept (for their TTL, at most dns_max_ttl_seconds)."),
    Key("dns_max_ttl_seconds", 3600.0, _number(0, 86400),
        "The longest a DNS answer is kept, whatever its TTL (0: no DNS cache)."),
    Key("message_cache_size", 10_000, _number(1, 10_000_000, integer=True),
        "Messages whose rDNS and SPF facts are kept for their other recipients."),
    Key("message_cache_ttl_seconds", 600.0, _number(1, 86400),
        "How long a message's facts are kept."),
    Key("max_connections", 1000, _number(1, 1_000_000, integer=True),
        "Policy connections served at once; more are closed at once (Postfix retries)."),
    Key("idle_timeout_seconds", 600.0, _number(1, 86400),
        "A policy connection idle this long, or stuck in the middle of a request, is closed. "
        "Postfix closes idle ones itself after smtpd_policy_service_max_idle (300s)."),
    Key("user", "", _user,
        "The unprivileged account to run as. Started as root, the daemon binds its listeners "
        "and then becomes this user; as root with no user it refuses to start."),
    Key("milter_listen", [], _string_list,
        "Where Postfix reaches the built-in milter (smtpd_milters), as Twisted server endpoint "
        'strings such as "tcp:10046:interface=127.0.0.1"; empty: no milter. With the milter, '
        "a sender failing SPF may still pass with a valid DKIM signature, checked at end of "
        "message; without it SPF alone decides at RCPT."),
    Key("authserv_id", "", _authserv_id,
        "The authserv-id the milter writes in its Authentication-Results header (RFC 8601), "
        "and whose forged copies it removes from incoming mail; empty: this host's name."),
    Key("replies", {}, _replies,
        "A table overriding the reply texts: not_opted_in ({domain}), no_reverse_dns "
        "({address}), auth_failed ({address}), temporary ({address}, {check}; must be 4xx)."),
)


@dataclass(frozen=True)
class Config:
    """The validated configuration; ``defaults()`` gives the one with every key at its default."""

    listen: tuple[str, ...]
    optin_file: str
    rdns: str
    trusted_networks: tuple
    nameservers: tuple
    dns_timeout_seconds: float
    dns_attempts: int
    decision_deadline_seconds: float
    optin_reload_interval_seconds: float
    dns_cache_size: int
    dns_max_ttl_seconds: float
    message_cache_size: int
    message_cache_ttl_seconds: float
    max_connections: int
    idle_timeout_seconds: float
    user: str
    milter_listen: tuple[str, ...]
    authserv_id: str
    replies: Replies
    source: str = "<defaults>"

    @classmethod
    def defaults(cls) -> Config:
        return parse_config("", "/etc/policyd-ipv6", "<defaults>")


def parse_config(text: str, base_dir: str = ".", source: str = "<config>") -> Config:
    """Validate TOML text; relative paths are taken relative to ``base_dir``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None
    known = {key.name: key for key in KEYS}
    values: dict[str, Any] = {key.name: key.parse(key.name, key.default) for key in KEYS}
    for name, value in raw.items():
        key = known.get(name)
        if key is None:
            raise ConfigError(f"{source}: unknown key {name} = {_show(value)} "
                              f"(known keys: {', '.join(known)})")
        try:
            values[name] = key.parse(name, value)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from None
    values["optin_file"] = os.path.normpath(os.path.join(base_dir, values["optin_file"]))
    return Config(**values, source=source)


def load_config(path: str) -> Config:
    """Read and validate the configuration file at ``path``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(1024 * 1024)
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, os.path.dirname(os.path.abspath(path)), source=path)
