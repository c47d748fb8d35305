"""Service wiring: from a ``Config`` to running listeners, shared by ``serve`` and ``check``.

Contract: ``PolicyService(config, reactor)`` creates the long-lived parts (DNS client, lookup
cache, fact finder, opt-in source, engine, protocol factory) and raises ``ConfigError``
naming the key and value when one cannot start (an unreadable or invalid opt-in file, or
``optin_postgresql`` without its driver). ``ready()`` is a Deferred that fires once the opt-in
table is loaded (at once for a file; from PostgreSQL or its last-good copy for
``optin_postgresql``, failing with ``ConfigError`` when neither answers): listen only after it.
With ``keep_state=False`` (``check``) the last-good copy is read but never written.
``listen()`` binds every ``listen`` endpoint, then every ``milter_listen`` endpoint (a Deferred
failing with ``ConfigError`` naming the key and the endpoint), except one at the address of a
socket systemd passed (``systemd.served_addresses``); a passed Unix socket gets the
``milter_peer_users`` check as a configured one (``peer_uids``). With ``milter_listen`` set, the
policy engine and the milter share one ``sessions.Sessions`` registry (the milter tells the
policy side which SMTP sessions it is on); without it the engine has none and SPF alone
decides. The configuration in force is one object, ``service.live.now`` (a ``live.InForce``:
the ``Config`` and what is derived from it), whose reloadable values every running part
gets from it (``live.Setting``, each part attached once). ``reload()`` (SIGHUP) re-reads the
configuration file: a file that does not load leaves the running configuration in force and
logs why; otherwise the new ``Config``, with the restart-only keys (``config.RESTART_KEYS``,
logged when they changed) carried over from the running one, becomes the new snapshot in one
assignment; only the opt-in source is restarted when its file or interval changed.
``RELOADED_KEYS`` names every key a reload applies (a test checks it is every key not in
``RESTART_KEYS``).
``system_nameservers()`` reads /etc/resolv.conf's nameserver lines (the search list is never
used).
"""

from __future__ import annotations

import pwd
import signal
import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from policyd_ipv6.checks.gather import FactFinder
from policyd_ipv6.checks.spf_eval import Limits
from policyd_ipv6.daemon.config import (
    RESTART_KEYS,
    Config,
    ConfigError,
    keep_restart_keys,
    load_config,
    parse_nameserver,
)
from policyd_ipv6.daemon.systemd import adopt_inherited, endpoint_address, served_addresses
from policyd_ipv6.live import InForce, Live
from policyd_ipv6.milter.registry import Sessions
from policyd_ipv6.optin.postgresql import DatabaseSettings, PostgresOptin, StartError
from policyd_ipv6.optin.table import OptinSyntaxError
from policyd_ipv6.optin.watch import OptinWatcher
from policyd_ipv6.policy.decision import Policy
from policyd_ipv6.policy.engine import PolicyEngine
from policyd_ipv6.policy.server import PolicyFactory
from policyd_ipv6.resolver.client import DnsClient
from policyd_ipv6.resolver.lookups import Lookups
from policyd_ipv6.resolver.wire import Nameserver

__all__ = ["PolicyService", "in_force", "system_nameservers", "install_sighup", "RESTART_KEYS",
           "RELOADED_KEYS"]

_log = Logger(namespace="policyd-ipv6")

# The keys the decision reads (``decision.Policy``, fields of the same names).
POLICY_KEYS = ("trusted_networks", "replies", "mode", "report_only_rules", "unlisted_domains",
               "exempt_recipients", "exempt_client_certificates", "rdns_exempt_sender_domains")
# Every key a reload applies. The running parts read them from the configuration in force
# (``live.Setting``), so applying them is the one swap in ``reload()``; the opt-in source is
# the one part a reload restarts (a new file, or a new interval).
RELOADED_KEYS = frozenset({
    "dns_timeout_seconds", "dns_attempts", "nameservers",  # resolver.client.DnsClient
    "dns_max_ttl_seconds",  # resolver.lookups.Lookups
    "rdns", "decision_deadline_seconds", "message_cache_ttl_seconds",  # checks.gather
    "idle_timeout_seconds",  # policy.server.PolicyFactory, milter.server.MilterFactory
    "milter_eom_deadline_seconds", "authserv_id",  # milter.server.MilterFactory
    "log_decisions",  # policy.engine.PolicyEngine
    "optin_file", "optin_reload_interval_seconds",  # the opt-in source, restarted
} | set(POLICY_KEYS))
# How long a milter session's entry outlives the milter's last event if its close is missed;
# Postfix ends an SMTP session idle for smtpd_timeout (300s) long before.
SESSION_TTL_SECONDS = 3600.0


def system_nameservers(path: str = "/etc/resolv.conf") -> list[Nameserver]:
    """The nameserver lines of resolv.conf; 127.0.0.1 when it names none (resolv.conf(5))."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    try:
                        servers.append(parse_nameserver(words[1].split("%", 1)[0]))
                    except ValueError:
                        continue
    except OSError as error:
        raise ConfigError(f"nameservers = []: cannot read {path} ({error.strerror}); "
                          "set nameservers in the configuration") from None
    return servers or [Nameserver("127.0.0.1")]


def _watcher(config: Config, reactor) -> OptinWatcher:
    try:
        return OptinWatcher(config.optin_file, reactor, config.optin_reload_interval_seconds)
    except OSError as error:
        raise ConfigError(f'optin_file = "{config.optin_file}": cannot read it '
                          f"({error.strerror})") from None
    except OptinSyntaxError as error:
        raise ConfigError(f'optin_file = "{config.optin_file}": {error}') from None


def _optin_source(config: Config, reactor, keep_state: bool) -> OptinWatcher | PostgresOptin:
    if not config.optin_postgresql:
        return _watcher(config, reactor)
    try:
        import psycopg
    except ImportError as error:
        raise ConfigError(
            "optin_postgresql is set but the PostgreSQL driver psycopg 3 cannot be loaded "
            f"({error}): install python3-psycopg (pip: policyd-ipv6[postgresql])") from None
    settings = DatabaseSettings(
        config.optin_postgresql, config.optin_query, config.optin_notify_channel,
        config.optin_connect_timeout_seconds, config.state_directory,
        config.optin_reload_interval_seconds, write_copy=keep_state)
    return PostgresOptin(settings, reactor, psycopg)


def in_force(config: Config, servers: Sequence[Nameserver]) -> InForce:
    """The snapshot the running parts read: ``config`` and what is derived from it."""
    return InForce(config, policy_of(config), tuple(servers), authserv_id(config))


class PolicyService:
    def __init__(self, config: Config, reactor, keep_state: bool = True,
                 milter_socket: bool = False) -> None:
        servers = self._servers(config)
        self.live = Live(in_force(config, servers))
        self.reactor = reactor
        self.client = DnsClient(reactor, servers, config.dns_timeout_seconds,
                                config.dns_attempts)
        self.lookups = Lookups(self.client, reactor, config.dns_cache_size,
                               config.dns_max_ttl_seconds,
                               max_bytes=config.dns_cache_bytes)
        self.finder = FactFinder(self.lookups, reactor, config.rdns,
                                 config.decision_deadline_seconds, config.message_cache_size,
                                 config.message_cache_ttl_seconds,
                                 Limits(void_lookups=config.spf_void_limit))
        self.optin = _optin_source(config, reactor, keep_state)
        # One entry per SMTP session the milter is on: bounded like the connections.
        # The milter is on when milter_listen names an endpoint or systemd passes a socket
        # named milter (the packaged policyd-ipv6-milter.socket): a socket handed over is
        # served, never left to hold Postfix's connections (an upgrade keeps an older
        # configuration without milter_listen).
        sessions = (Sessions(reactor, config.max_connections, SESSION_TTL_SECONDS)
                    if config.milter_listen or milter_socket else None)
        self.engine = PolicyEngine(policy_of(config),
                                   self.optin, self.finder, reactor, sessions)
        self.engine.log_decisions = config.log_decisions
        uids = peer_uids(config)
        self.factory = PolicyFactory(self.engine, reactor, config.max_connections,
                                     config.idle_timeout_seconds, peer_uids=uids)
        self.factory.noisy = False
        self.milter_factory = None
        if sessions is not None:
            # Imported here: DKIM (dkimpy, and the cryptography it loads) is the milter's,
            # and a policy service without one never loads it. Still before the privilege
            # drop (see privileges.load_lazy_modules).
            from policyd_ipv6.checks.dkim_pool import DkimPool
            from policyd_ipv6.milter.server import MilterFactory

            self.milter_factory = MilterFactory(
                self.engine, self.lookups, reactor, authserv_id(config),
                config.max_connections, config.idle_timeout_seconds,
                eom_deadline_seconds=config.milter_eom_deadline_seconds, peer_uids=uids,
                dkim_pool=DkimPool(reactor))  # started by serve, once privileges are dropped
        # From here on the reloadable values come from the snapshot in force (live.Setting).
        for part in (self.client, self.lookups, self.finder, self.engine, self.factory,
                     self.milter_factory):
            if part is not None:
                self.live.attach(part)

    @property
    def config(self) -> Config:
        """The configuration in force (``live.now.config``)."""
        return self.live.now.config

    @staticmethod
    def _servers(config: Config) -> list[Nameserver]:
        return list(config.nameservers) or system_nameservers()

    def ready(self) -> defer.Deferred:
        """Fires once the opt-in table is loaded; fails with ConfigError when it cannot be."""
        if not isinstance(self.optin, PostgresOptin):
            return defer.succeed(self.optin.table)

        def not_loaded(failure):
            failure.trap(StartError)
            raise ConfigError(str(failure.value))
        return self.optin.ready().addErrback(not_loaded)

    @defer.inlineCallbacks
    def listen(self, inherited: Sequence[tuple[int, str]] = ()):
        """Bind every endpoint of ``listen`` and ``milter_listen``; fails with ConfigError
        naming the key and the endpoint that failed (and unbinds the others). ``inherited``
        are the sockets systemd passed (``systemd.take_listen_fds``): those named ``policy``
        serve policy requests, those named ``milter`` the milter, beside the endpoints at other
        addresses."""
        ports: list = adopt_inherited(self.reactor, inherited, self.factory,
                                      self.milter_factory)
        adopted = {address for port in ports for address in served_addresses(port)}
        # A Unix socket systemd passed checks its peers like a configured one, whatever listen
        # and milter_listen name: resolved now, before the reactor reads a connection.
        if self.factory.peer_check.uids is None and any(a.startswith("unix:") for a in adopted):
            try:
                uids = peer_uids(self.config, unix_sockets=True)
            except ConfigError:
                for bound in ports:
                    bound.stopListening()
                raise
            for served in (self.factory, self.milter_factory):
                if served is not None:
                    served.peer_check.uids = uids
        # The configured endpoints are bound too, except one at an address systemd already
        # passed: an upgrade that adds the packaged socket units keeps serving the endpoints
        # an older configuration names (a Postfix still pointed at them keeps working).
        # Matched by address (systemd.served_addresses): "tcp:PORT" is served already by a
        # dual-stack [::]:PORT socket (ListenStream=PORT), which it could not bind beside.
        wanted: list[tuple[str, str, Any, str]] = []
        wanted += [("listen", d, self.factory, "policy requests") for d in self.config.listen
                   if endpoint_address(d) not in adopted]
        if self.milter_factory is not None:
            wanted += [("milter_listen", d, self.milter_factory, "the milter")
                       for d in self.config.milter_listen if endpoint_address(d) not in adopted]
        for key, description, factory, what in wanted:
            try:
                endpoint = serverFromString(self.reactor, description)
            except Exception as error:
                for bound in ports:
                    bound.stopListening()
                raise ConfigError(
                    f'{key} = "{description}": not a valid endpoint ({error})') from None
            try:
                port = yield endpoint.listen(factory)
            except Exception as error:
                for bound in ports:
                    bound.stopListening()
                raise ConfigError(
                    f'{key} = "{description}": cannot listen ({error})') from None
            ports.append(port)
            _log.info("listening for {what} on {where}", what=what, where=description)
        return ports

    def reload(self) -> bool:
        """SIGHUP: re-read the configuration and the opt-in table; True if the new one is in
        force (then ``live.now.config`` is that one, restart-only keys kept)."""
        try:
            new = load_config(self.config.source)
            optin = None
            if new.optin_file != self.config.optin_file and not self.config.optin_postgresql:
                optin = _watcher(new, self.reactor)
            servers = self._servers(new)
        except ConfigError as error:
            _log.error("configuration not reloaded (SIGHUP): {error}; the running configuration "
                       "stays in force", error=str(error))
            return False
        old = self.config
        new, changed = keep_restart_keys(old, new)
        for key in changed:
            _log.warn("configuration key {key} changed: it takes effect at the next restart",
                      key=key)
        self.live.now = in_force(new, servers)  # the one swap: every attached part follows
        if optin is None:
            self.optin.reload("SIGHUP")
            if isinstance(self.optin, PostgresOptin):
                self.optin.interval_seconds = new.optin_reload_interval_seconds
            elif new.optin_reload_interval_seconds != old.optin_reload_interval_seconds:
                self.optin.stop()
                self.optin.interval_seconds = new.optin_reload_interval_seconds
                self.optin.start()
        else:
            self.optin.stop()
            self.optin = self.engine.optin = optin
            optin.start()
        _log.info("configuration reloaded (SIGHUP) from {path}", path=new.source)
        return True


def policy_of(config: Config) -> Policy:
    """The decision's configuration (``POLICY_KEYS``), rebuilt at each reload."""
    return Policy(**{key: getattr(config, key) for key in POLICY_KEYS})


def peer_uids(config: Config, unix_sockets: bool = False) -> frozenset[int] | None:
    """The uids of ``milter_peer_users``, who alone may connect to a Unix listener (policy or
    milter); None when no listener is a Unix socket, neither a configured one nor one systemd
    passed (``unix_sockets``): TCP carries no credentials, and a TCP-only daemon does not need
    the users to exist. Resolved once, at start-up (the key needs a restart): a user that does
    not exist stops the daemon, rather than silently leaving a socket open to nobody or to
    everybody."""
    if not unix_sockets and not any(endpoint.startswith("unix:")
                                    for endpoint in (*config.listen, *config.milter_listen)):
        return None
    uids = set()
    for name in config.milter_peer_users:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise ConfigError(f'milter_peer_users = "{name}": no such user') from None
    return frozenset(uids)


def authserv_id(config: Config) -> str:
    """The configured authserv_id, or this host's fully qualified name (RFC 8601 §2.5)."""
    if config.authserv_id:
        return config.authserv_id
    name = socket.getfqdn()
    # A name that could not go into the header unquoted would make every header invalid.
    return name if name and all(c.isalnum() or c in ".-_" for c in name) else "localhost"


def install_sighup(reactor, action) -> None:
    """Run ``action()`` on the reactor thread when SIGHUP arrives."""
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(action))
