"""Service wiring: from a ``Config`` to running listeners, shared by ``serve`` and ``check``.

Contract: ``build(config, reactor)`` creates the long-lived parts (DNS client, lookup cache,
fact finder, opt-in watcher, engine) and raises ``ConfigError`` naming the key and value when
one of them cannot start (an unreadable or invalid opt-in file, no nameservers). ``listen(parts,
reactor)`` binds every ``listen`` endpoint and raises ``ConfigError`` naming the endpoint that
cannot be parsed or bound. ``system_nameservers()`` reads /etc/resolv.conf's nameserver lines
(only those: the search list is never used).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from .config import Config, ConfigError, parse_nameserver
from .decision import Policy
from .dns_client import DnsClient, Nameserver
from .engine import PolicyEngine
from .lookups import Lookups
from .message_facts import FactFinder
from .optin import OptinSyntaxError
from .optin_watch import OptinWatcher
from .policy_server import PolicyFactory

__all__ = ["Parts", "build", "listen", "system_nameservers", "install_sighup"]

_log = Logger(namespace="policyd-ipv6")


@dataclass
class Parts:
    config: Config
    client: DnsClient
    lookups: Lookups
    finder: FactFinder
    optin: OptinWatcher
    engine: PolicyEngine
    factory: PolicyFactory


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


def build(config: Config, reactor) -> Parts:
    servers = list(config.nameservers) or system_nameservers()
    client = DnsClient(reactor, servers, config.dns_timeout_seconds, config.dns_attempts)
    lookups = Lookups(client, reactor, config.dns_cache_size, config.dns_max_ttl_seconds)
    finder = FactFinder(lookups, reactor, config.rdns, config.decision_deadline_seconds,
                        config.message_cache_size, config.message_cache_ttl_seconds)
    try:
        optin = OptinWatcher(config.optin_file, reactor, config.optin_reload_interval_seconds)
    except OSError as error:
        raise ConfigError(f'optin_file = "{config.optin_file}": cannot read it '
                          f"({error.strerror})") from None
    except OptinSyntaxError as error:
        raise ConfigError(f'optin_file = "{config.optin_file}": {error}') from None
    policy = Policy(config.trusted_networks, config.replies)
    engine = PolicyEngine(policy, optin, finder, reactor)
    factory = PolicyFactory(engine, reactor, config.max_connections, config.idle_timeout_seconds)
    factory.noisy = False
    return Parts(config, client, lookups, finder, optin, engine, factory)


@defer.inlineCallbacks
def listen(parts: Parts, reactor):
    """Bind every endpoint of ``listen``; fails with ConfigError naming the one that failed."""
    ports = []
    for description in parts.config.listen:
        try:
            endpoint = serverFromString(reactor, description)
        except Exception as error:
            raise ConfigError(f'listen = "{description}": not a valid endpoint ({error})')
        try:
            port = yield endpoint.listen(parts.factory)
        except Exception as error:
            for bound in ports:
                bound.stopListening()
            raise ConfigError(f'listen = "{description}": cannot listen ({error})')
        ports.append(port)
        _log.info("listening for policy requests on {where}", where=description)
    return ports


def install_sighup(reactor, action) -> None:
    """Run ``action()`` on the reactor thread when SIGHUP arrives."""
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(action))
