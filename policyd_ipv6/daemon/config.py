"""Configuration: the TOML file, each key defined once as a field of ``Config``.

Contract: ``load_config(path)`` reads and validates the file and returns a frozen ``Config``;
``parse_config(text, base_dir)`` does the same for text. Any problem raises ``ConfigError``
whose message names the file, the key and the bad value (an unknown key is an error, not a
warning: a typo must not silently leave a default in force). The configuration file must be a
regular file: reading a FIFO or a device could block start-up or a reload for ever.

The schema is the ``Config`` dataclass itself: each field is made by ``setting()`` and carries
its default (as written in TOML), its parser and bounds, its documentation and whether a change
needs a restart. ``KEYS`` and ``RESTART_KEYS`` are derived from the fields, and so are the README's
key table, the KEYS section of policyd-ipv6.toml(5) and the comments of the sample files
(``keydocs``; a test fails when one of them is stale). ``keep_restart_keys(old, new)`` is what a
reload applies: the new configuration with the restart-only keys of the running one.

What is checked here is what can be checked without side effects; the listen endpoints and
the opt-in file are checked when the service starts (``wiring``), which also reports them as
configuration errors naming the key. Nothing here imports Twisted.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from policyd_ipv6.policy.replies import Replies, validate_reply
from policyd_ipv6.resolver.wire import Nameserver

__all__ = ["Config", "ConfigError", "KEYS", "RESTART_KEYS", "Key", "load_config",
           "parse_config", "keep_restart_keys", "DEFAULT_CONFIG_PATH"]

DEFAULT_CONFIG_PATH = "/etc/policyd-ipv6/policyd-ipv6.toml"
_AUTHSERV_ID = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_MAX_FILE_BYTES = 1024 * 1024


class ConfigError(Exception):
    """A configuration problem; the message names the key and the value."""


@dataclass(frozen=True)
class Key:
    """One key of the schema, read from a ``Config`` field made by ``setting()``."""

    name: str
    default: Any  # as written in TOML
    parse: Callable[[str, Any], Any]  # (key, raw value) -> value, raises ValueError
    doc: str
    restart: bool  # a change takes effect at the next restart, not on SIGHUP

    def bounds(self) -> str:
        """The allowed range as a sentence ("Between 1 and 5."), or "" for a non-number."""
        describe = getattr(self.parse, "describe", None)
        return describe() if describe is not None else ""


def setting(default: Any, parse: Callable[[str, Any], Any], doc: str, *,
            restart: bool = False) -> Any:
    """A ``Config`` field: its value defaults to ``parse(default)``; the schema rides along."""
    return field(default=parse("default", default),
                 metadata={"default": default, "parse": parse, "doc": doc, "restart": restart})


def _bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{key} = {_show(value)}: {why}")


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else '"' + value + '"'
    return text if len(text) <= 120 else text[:117] + "..."


class _Number:
    """A number between ``low`` and ``high`` (a whole number when ``integer``)."""

    def __init__(self, low: float, high: float, integer: bool = False) -> None:
        self.low, self.high, self.integer = low, high, integer

    def __call__(self, key: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                self.integer and not isinstance(value, int)):
            raise _bad(key, value, "must be " + ("a whole number" if self.integer else "a number"))
        if not self.low <= value <= self.high:
            raise _bad(key, value, f"must be between {self.low} and {self.high}")
        return value

    def describe(self) -> str:
        return f"Between {_plain(self.low)} and {_plain(self.high)}."


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _number(low: float, high: float, integer: bool = False) -> _Number:
    return _Number(low, high, integer)


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
            raise _bad(key, item, "is not an IP network (such as 192.0.2.0/24 or "
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


def _users(key: str, value: Any) -> tuple[str, ...]:
    names = _string_list(key, value)
    if not names:
        raise _bad(key, value, "must name at least one user")
    for name in names:
        if not name:
            raise _bad(key, name, "must be a user name")
        _user(key, name)
    return names


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


@dataclass(frozen=True)
class Config:
    """The validated configuration; ``defaults()`` gives the one with every key at its default.

    Each field is one key of the file, in the order the documentation lists them."""

    listen: tuple[str, ...] = setting(
        ["tcp:10045:interface=127.0.0.1"], _listen,
        "Where Postfix reaches the policy service: Twisted server endpoint strings, at least "
        'one. "tcp:10045:interface=127.0.0.1" is TCP port 10045 on IPv4 loopback; '
        '"tcp6:10045:interface=\\\\:\\\\:1" the same on IPv6 loopback (a colon in an address is '
        'escaped with a backslash, doubled in a TOML string); '
        '"unix:/var/spool/postfix/policyd-ipv6/policy:mode=660" a Unix socket, in a directory '
        "made with install -d -o root -g postfix -m 2750 /var/spool/postfix/policyd-ipv6 (see "
        "main.cf.fragment; Postfix's own private/ is not writable for the daemon). An endpoint "
        "that cannot be parsed or bound stops the daemon at start-up.", restart=True)
    optin_file: str = setting(
        "/etc/policyd-ipv6/optin-domains", _path,
        "The opt-in table: the recipient domains that accept mail over IPv6, one per line "
        '("example.com" exactly, ".example.com" its subdomains). A relative path is taken '
        "relative to the configuration file. A missing or invalid file stops the daemon at "
        "start-up; later, a file that becomes unreadable or invalid leaves the previous table "
        "in force.")
    rdns: str = setting(
        "ptr", _choice("ptr", "fcrdns"),
        'The reverse DNS rule. "ptr": the client address must have a PTR record (what Exchange '
        'Online Protection documents). "fcrdns": a PTR name must also resolve (AAAA) back to '
        "the client address (what Gmail asks).")
    trusted_networks: tuple = setting(
        ["127.0.0.0/8", "::1/128"], _networks,
        "Clients in these networks (IPv4 or IPv6, in CIDR notation) are not subject to the "
        "rules and get DUNNO, as do SASL-authenticated clients.")
    nameservers: tuple = setting(
        [], _nameservers,
        'The DNS servers to ask, each as "ADDRESS", "ADDRESS:PORT" or "[IPv6]:PORT", tried in '
        "order. Empty: the nameserver lines of /etc/resolv.conf (127.0.0.1 if it has none). "
        "The resolv.conf search list is never used. A recursive resolver on the mail server "
        "itself (such as unbound) keeps lookups fast.")
    dns_timeout_seconds: float = setting(
        2.0, _number(0.05, 30),
        "How long to wait for one DNS answer before the next try (the next server, or the "
        "same one again).")
    dns_attempts: int = setting(
        2, _number(1, 5, integer=True),
        "How many rounds of tries over the nameservers before a lookup fails temporarily.")
    decision_deadline_seconds: float = setting(
        15.0, _number(0.1, 90),
        "A decision whose lookups have not finished by then answers 451 4.4.3 (temporary). "
        "Keep it well under Postfix's smtpd_policy_service_timeout (100 seconds) and under "
        "the timeout of check_policy_service in main.cf.")
    optin_reload_interval_seconds: float = setting(
        5.0, _number(0, 86400),
        "How often the opt-in file is checked for changes (its inode, size and modification "
        "time); 0: only on SIGHUP.")
    dns_cache_size: int = setting(
        50_000, _number(1, 10_000_000, integer=True),
        "How many DNS answers are kept, each for its TTL (at most dns_max_ttl_seconds).",
        restart=True)
    dns_max_ttl_seconds: float = setting(
        3600.0, _number(0, 86400),
        "The longest a DNS answer is kept, whatever its TTL; 0: no DNS cache.")
    message_cache_size: int = setting(
        10_000, _number(1, 10_000_000, integer=True),
        "How many messages' reverse DNS and SPF results are kept for their other recipients "
        "(Postfix asks once per recipient; one SPF evaluation per message).", restart=True)
    message_cache_ttl_seconds: float = setting(
        600.0, _number(1, 86400),
        "How long a message's results are kept (the recipients of a message come within its "
        "SMTP transaction).")
    max_connections: int = setting(
        1000, _number(1, 1_000_000, integer=True),
        "How many policy connections (each smtpd process holds one) are served at once, and "
        "as many milter connections; past that the longest-idle one is closed (Postfix "
        "reconnects when it needs to).", restart=True)
    idle_timeout_seconds: float = setting(
        600.0, _number(1, 86400),
        "A connection idle this long, or stuck in the middle of a request, is closed. Postfix "
        "closes idle policy connections itself after smtpd_policy_service_max_idle (300 "
        "seconds).")
    user: str = setting(
        "", _user,
        "The unprivileged account to run as. Started as root, the daemon binds its listeners "
        "and then becomes this user; as root with no user it refuses to start. Leave it empty "
        "in the Debian package: its systemd unit already starts the daemon as its own user "
        "_policyd-ipv6, and a non-root process cannot become another user.", restart=True)
    milter_listen: tuple[str, ...] = setting(
        [], _string_list,
        "Where Postfix reaches the built-in milter (smtpd_milters in main.cf), as Twisted "
        'server endpoint strings such as "tcp:10046:interface=127.0.0.1"; empty: no milter. '
        "With the milter, a sender that fails SPF may still pass with a valid DKIM signature, "
        "which the milter checks at the end of the message, and the milter adds an "
        "Authentication-Results header; without it, SPF alone decides at RCPT TO.",
        restart=True)
    milter_eom_deadline_seconds: float = setting(
        60.0, _number(1, 240),
        "How long the milter waits at end of message for DKIM before answering 451 4.4.3 "
        "(temporary); keep it well below Postfix's milter_content_timeout (300 seconds).")
    milter_peer_users: tuple[str, ...] = setting(
        ["root", "postfix"], _users,
        "On Unix-socket listeners, only processes of these users may connect (SO_PEERCRED); "
        "others are closed at once. Not applicable to TCP listeners.", restart=True)
    authserv_id: str = setting(
        "", _authserv_id,
        "The authserv-id (RFC 8601) the milter writes in its Authentication-Results header, "
        "and whose forged copies it removes from incoming mail; a host name such as "
        '"mx.example.com". Empty: this host\'s fully qualified name.')
    replies: Replies = setting(
        {}, _replies,
        "A table overriding the reply texts, usually written as a [replies] section at the "
        "end of the file: not_opted_in ({domain}), no_reverse_dns ({address}), auth_failed "
        "({address}), temporary ({address}, {check}; must be 4xx).")
    source: str = "<defaults>"

    @classmethod
    def defaults(cls) -> Config:
        return parse_config("", "/etc/policyd-ipv6", "<defaults>")


KEYS: tuple[Key, ...] = tuple(
    Key(f.name, f.metadata["default"], f.metadata["parse"], f.metadata["doc"],
        f.metadata["restart"])
    for f in dataclasses.fields(Config) if "parse" in f.metadata)
# Keys whose change needs a restart: bound sockets, the process's user, sizes of live caches.
RESTART_KEYS: tuple[str, ...] = tuple(key.name for key in KEYS if key.restart)


def keep_restart_keys(running: Config, new: Config) -> tuple[Config, tuple[str, ...]]:
    """``new`` with the restart-only keys of ``running``, and the names of those that differ
    (they take effect at the next restart)."""
    changed = tuple(k for k in RESTART_KEYS if getattr(new, k) != getattr(running, k))
    return dataclasses.replace(new, **{k: getattr(running, k) for k in RESTART_KEYS}), changed


def parse_config(text: str, base_dir: str = ".", source: str = "<config>") -> Config:
    """Validate TOML text; relative paths are taken relative to ``base_dir``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None
    known = {key.name: key for key in KEYS}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key = known.get(name)
        if key is None:
            raise ConfigError(f"{source}: unknown key {name} = {_show(value)} "
                              f"(known keys: {', '.join(known)})")
        try:
            values[name] = key.parse(name, value)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from None
    optin_file = values.get("optin_file", known["optin_file"].default)
    values["optin_file"] = os.path.normpath(os.path.join(base_dir, optin_file))
    return Config(**values, source=source)


def load_config(path: str) -> Config:
    """Read and validate the configuration file at ``path``, which must be a regular file."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: not a regular file")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(_MAX_FILE_BYTES)
        except OSError as error:
            raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, os.path.dirname(os.path.abspath(path)), source=path)
