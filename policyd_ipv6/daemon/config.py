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
import os
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from policyd_ipv6.daemon.values import (
    authserv_id,
    channel,
    choice,
    domain_entries,
    endpoints,
    fingerprints,
    local_parts,
    nameservers,
    networks,
    number,
    parse_nameserver,
    path,
    replies,
    report_rules,
    show,
    sql_query,
    string_list,
    user,
    users,
)
from policyd_ipv6.optin.rows import conninfo
from policyd_ipv6.policy.replies import Replies
from policyd_ipv6.vocabulary import PolicyRule

__all__ = ["Config", "ConfigError", "KEYS", "RESTART_KEYS", "Key", "load_config",
           "parse_config", "keep_restart_keys", "DEFAULT_CONFIG_PATH", "parse_nameserver"]

DEFAULT_CONFIG_PATH = "/etc/policyd-ipv6/policyd-ipv6.toml"
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


@dataclass(frozen=True)
class Config:
    """The validated configuration; ``defaults()`` gives the one with every key at its default.

    Each field is one key of the file, in the order the documentation lists them."""

    listen: tuple[str, ...] = setting(
        ["tcp:10045:interface=127.0.0.1"], endpoints,
        "Where Postfix reaches the policy service: Twisted server endpoint strings, at least "
        'one. "tcp:10045:interface=127.0.0.1" is TCP port 10045 on IPv4 loopback; '
        '"tcp6:10045:interface=\\\\:\\\\:1" the same on IPv6 loopback (a colon in an address is '
        'escaped with a backslash, doubled in a TOML string); '
        '"unix:/var/spool/postfix/policyd-ipv6/policy:mode=660" a Unix socket, in a directory '
        "made with install -d -o root -g postfix -m 2750 /var/spool/postfix/policyd-ipv6 (see "
        "main.cf.fragment; Postfix's own private/ is not writable for the daemon). An endpoint "
        "that cannot be parsed or bound stops the daemon at start-up.", restart=True)
    optin_file: str = setting(
        "/etc/policyd-ipv6/optin-domains", path,
        "The opt-in table: the recipient domains that accept mail over IPv6, one per line "
        '("example.com" exactly, ".example.com" its subdomains). A relative path is taken '
        "relative to the configuration file. A missing or invalid file stops the daemon at "
        "start-up; later, a file that becomes unreadable or invalid leaves the previous table "
        "in force. Not used with optin_postgresql (setting both is an error).")
    optin_postgresql: str = setting(
        "", conninfo,
        "The opt-in table from PostgreSQL instead of optin_file: a libpq connection string "
        '("host=db.example.com dbname=mail user=policyd") or URI '
        '("postgresql://policyd@db.example.com/mail"); empty: optin_file is used. Keep the '
        "password out of it: libpq's passfile (~/.pgpass, or PGPASSFILE or passfile=) works, "
        "and the daemon never logs or prints a password. The daemon LISTENs on "
        "optin_notify_channel and reloads within a second of a NOTIFY (the trigger is in "
        "postfix-examples/optin-postgresql.sql), and every optin_reload_interval_seconds. "
        "It listens for mail only after a first load; while the database is down the last "
        "table stays in force and it reconnects, backing off up to 30 seconds. Needs the "
        "python3-psycopg package (psycopg 3).", restart=True)
    optin_query: str = setting(
        "SELECT domain, options FROM policyd_ipv6_optin", sql_query,
        "The query giving the opt-in table: one row per entry, the domain (as a line of "
        'optin_file: "example.com" or ".example.com") and its options (NULL, or the same '
        '"key=value" words as in the file). A row that the file would refuse is skipped with '
        "a warning naming it.", restart=True)
    optin_notify_channel: str = setting(
        "policyd_ipv6_optin", channel,
        "The channel the daemon LISTENs on for changes of the opt-in table (as pg_notify() "
        "names it: exactly, case included).", restart=True)
    optin_connect_timeout_seconds: float = setting(
        10.0, number(1, 300),
        "How long start-up waits for the database's first answer (also libpq's connect "
        "timeout and the longest a query may run). Past it, or when the database refuses, the "
        "daemon starts on the last-good copy in state_directory, with a warning; with no copy "
        "it refuses to start.", restart=True)
    state_directory: str = setting(
        "/var/lib/policyd-ipv6", path,
        "Where the daemon keeps its state: optin-domains.last-good, the last opt-in table "
        "loaded from optin_postgresql, in the opt-in file's syntax, replaced atomically after "
        "each load that changed it. It must be writable by the daemon's user (the Debian "
        "unit's StateDirectory=). A relative path is taken relative to the configuration "
        "file.", restart=True)
    rdns: str = setting(
        "ptr", choice("ptr", "fcrdns"),
        'The reverse DNS rule. "ptr": the client address must have a PTR record (what Exchange '
        'Online Protection documents). "fcrdns": a PTR name must also resolve (AAAA) back to '
        "the client address (what Gmail asks).")
    trusted_networks: tuple = setting(
        ["127.0.0.0/8", "::1/128"], networks,
        "Clients in these networks (IPv4 or IPv6, in CIDR notation) are not subject to the "
        "rules and get DUNNO, as do SASL-authenticated clients.")
    mode: str = setting(
        "enforce", choice("enforce", "report"),
        '"enforce": refusals are given. "report": wherever a refusal (550, 450 or 451) would '
        "be given the reply is DUNNO, and the decision's log line carries would=\"<the reply "
        'it would have given>" beside rule=; the milter likewise accepts at end of message, '
        "logs would= and still adds Authentication-Results. An opt-in entry's mode= option "
        "overrides it for that entry.")
    report_only_rules: frozenset[PolicyRule] = setting(
        [], report_rules,
        "Rules whose refusal is only reported, among not-opted-in, no-rdns, spf-failed, "
        "rdns-temporary and spf-temporary: when one applies its reply is logged as would= "
        "and the walk goes on, so the reply is the first enforced refusal or DUNNO (for "
        'example ["no-rdns"]: enforce SPF or DKIM while only observing PTR records).')
    unlisted_domains: str = setting(
        "refuse", choice("refuse", "enforce", "report", "ignore"),
        'Recipient domains not in the opt-in table. "refuse": 550 5.2.1 (what Exchange '
        'Online Protection does). "enforce": the PTR and SPF-or-DKIM rules apply to every '
        'recipient domain. "report": DUNNO, with would= the 550. "ignore": DUNNO without '
        "lookups.")
    exempt_recipients: tuple[str, ...] = setting(
        ["postmaster", "abuse"], local_parts,
        "Local parts exempt from the rules at every domain the rules apply to, compared "
        "without regard to case (RFC 5321 section 4.5.1 reserves postmaster at each domain). "
        "Setting the key replaces this list; the bare recipient Postmaster is always exempt.")
    exempt_client_certificates: tuple[str, ...] = setting(
        [], fingerprints,
        "SHA-256 fingerprints (hex, colons optional, any case) of TLS client certificates "
        "whose clients are connector partners, not anonymous senders: matched against "
        "Postfix's ccert_fingerprint and ccert_pubkey_fingerprint, they get DUNNO (rule "
        "tls-connector) at any recipient domain. Needs smtpd_tls_ask_ccert = yes and "
        "smtpd_tls_fingerprint_digest = sha256 in main.cf.")
    rdns_exempt_sender_domains: tuple[str, ...] = setting(
        [], domain_entries,
        'Sender domains ("example.com" exactly, ".example.com" its subdomains) not refused '
        "for a missing or unconfirmed PTR when SPF passes for them or, with the milter, a "
        "DKIM signature whose d= is their domain verifies: partners whose outbound IPv6 has "
        "no PTR. Bound to authentication, so it cannot be forged; one that does not "
        "authenticate gets the 450 4.7.25 of a missing PTR.")
    nameservers: tuple = setting(
        [], nameservers,
        'The DNS servers to ask, each as "ADDRESS", "ADDRESS:PORT" or "[IPv6]:PORT", tried in '
        "order. Empty: the nameserver lines of /etc/resolv.conf (127.0.0.1 if it has none). "
        "The resolv.conf search list is never used. A recursive resolver on the mail server "
        "itself (such as unbound) keeps lookups fast.")
    dns_timeout_seconds: float = setting(
        2.0, number(0.05, 30),
        "How long to wait for one DNS answer before the next try (the next server, or the "
        "same one again).")
    dns_attempts: int = setting(
        2, number(1, 5, integer=True),
        "How many rounds of tries over the nameservers before a lookup fails temporarily.")
    decision_deadline_seconds: float = setting(
        15.0, number(0.1, 90),
        "A decision whose lookups have not finished by then answers 451 4.4.3 (temporary). "
        "Keep it well under Postfix's smtpd_policy_service_timeout (100 seconds) and under "
        "the timeout of check_policy_service in main.cf.")
    optin_reload_interval_seconds: float = setting(
        5.0, number(0, 86400),
        "How often the opt-in file is checked for changes (its inode, size and modification "
        "time), or the query of optin_postgresql run again; 0: only on SIGHUP (and NOTIFY).")
    dns_cache_size: int = setting(
        50_000, number(1, 10_000_000, integer=True),
        "How many DNS answers are kept, each for its TTL (at most dns_max_ttl_seconds).",
        restart=True)
    dns_cache_bytes: int = setting(
        33_554_432, number(65_536, 17_179_869_184, integer=True),
        "The most memory (in bytes, estimated) the DNS answers kept may hold, whatever their "
        "number: one TXT answer can be 64 KB. The default is 32 MiB.", restart=True)
    spf_void_limit: int = setting(
        2, number(2, 20, integer=True),
        "How many SPF lookups may find nothing (NXDOMAIN or no records) before the SPF "
        "result is permerror (RFC 7208 section 4.6.4 recommends 2).", restart=True)
    dns_max_ttl_seconds: float = setting(
        3600.0, number(0, 86400),
        "The longest a DNS answer is kept, whatever its TTL; 0: no DNS cache.")
    message_cache_size: int = setting(
        10_000, number(1, 10_000_000, integer=True),
        "How many messages' reverse DNS and SPF results are kept for their other recipients "
        "(Postfix asks once per recipient; one SPF evaluation per message).", restart=True)
    message_cache_ttl_seconds: float = setting(
        600.0, number(1, 86400),
        "How long a message's results are kept (the recipients of a message come within its "
        "SMTP transaction).")
    max_connections: int = setting(
        1000, number(1, 1_000_000, integer=True),
        "How many policy connections (each smtpd process holds one) are served at once, and "
        "as many milter connections; past that the longest-idle one is closed (Postfix "
        "reconnects when it needs to).", restart=True)
    idle_timeout_seconds: float = setting(
        600.0, number(1, 86400),
        "A connection idle this long, or stuck in the middle of a request, is closed. Postfix "
        "closes idle policy connections itself after smtpd_policy_service_max_idle (300 "
        "seconds).")
    user: str = setting(
        "", user,
        "The unprivileged account to run as. Started as root, the daemon binds its listeners "
        "and then becomes this user; as root with no user it refuses to start. Leave it empty "
        "in the Debian package: its systemd unit already starts the daemon as its own user "
        "_policyd-ipv6, and a non-root process cannot become another user.", restart=True)
    log_decisions: str = setting(
        "all", choice("all", "ipv6", "refusals"),
        'Which decisions get a log line. "all": every policy decision and milter verdict. '
        '"ipv6": only those about IPv6 clients. "refusals": only refusals and would-be '
        "refusals (report mode's would=), which is what policyd-ipv6 report needs to find "
        "whom the rules would hurt; it can then no longer tell whether a deferred sender "
        "later got through.")
    metrics_listen: tuple[str, ...] = setting(
        [], string_list,
        "Where Prometheus scrapes the metrics (GET /metrics, the Prometheus text format; any "
        'other path is 404), as Twisted server endpoint strings such as '
        '"tcp:9145:interface=127.0.0.1"; empty: no metrics listener. The metrics tell '
        "decisions, DNS queries and cache use apart by rule, outcome and type, never by "
        "address or sender; keep the port on loopback or behind a firewall all the same. An "
        "endpoint that cannot be parsed or bound stops the daemon at start-up.", restart=True)
    milter_listen: tuple[str, ...] = setting(
        [], string_list,
        "Where Postfix reaches the built-in milter (smtpd_milters in main.cf), as Twisted "
        'server endpoint strings such as "tcp:10046:interface=127.0.0.1"; empty: no milter. '
        "With the milter, a sender that fails SPF may still pass with a valid DKIM signature, "
        "which the milter checks at the end of the message, and the milter adds an "
        "Authentication-Results header; without it, SPF alone decides at RCPT TO.",
        restart=True)
    milter_eom_deadline_seconds: float = setting(
        60.0, number(1, 240),
        "How long the milter waits at end of message for DKIM before answering 451 4.4.3 "
        "(temporary); keep it well below Postfix's milter_content_timeout (300 seconds).")
    milter_peer_users: tuple[str, ...] = setting(
        ["root", "postfix"], users,
        "On Unix-socket listeners, only processes of these users may connect (SO_PEERCRED); "
        "others are closed at once. Not applicable to TCP listeners.", restart=True)
    authserv_id: str = setting(
        "", authserv_id,
        "The authserv-id (RFC 8601) the milter writes in its Authentication-Results header, "
        "and whose forged copies it removes from incoming mail; a host name such as "
        '"mx.example.com". Empty: this host\'s fully qualified name.')
    replies: Replies = setting(
        {}, replies,
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
            raise ConfigError(f"{source}: unknown key {name} = {show(value)} "
                              f"(known keys: {', '.join(known)})")
        try:
            values[name] = key.parse(name, value)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from None
    if values.get("optin_postgresql") and "optin_file" in raw:
        raise ConfigError(f'{source}: optin_file = "{raw["optin_file"]}" and optin_postgresql '
                          "are both set: the opt-in table comes from one of them; remove one")
    for name in ("optin_file", "state_directory"):
        given = values.get(name, known[name].default)
        values[name] = os.path.normpath(os.path.join(base_dir, given))
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
