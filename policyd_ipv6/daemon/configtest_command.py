"""``policyd-ipv6 configtest [--config FILE]``: would this configuration start?

Contract: ``configtest(config)`` takes a ``Config`` that loaded (the file's syntax, every key
and value already checked by ``load_config``) and goes on with what ``serve`` checks before it
binds: ``user`` names an account this process could become (``plan_privileges``, as for
``serve`` started by the same user, root allowed: ``--allow-root`` is ``serve``'s to give),
every endpoint string of ``listen``, ``milter_listen`` and ``metrics_listen`` parses, the
users of ``milter_peer_users`` exist (when a listener is a Unix socket), and the opt-in source
loads (the file, or PostgreSQL or its last-good copy, never written). It sends no DNS
query and binds nothing. It prints ``policyd-ipv6: configuration OK: FILE (N opt-in
entries)`` and returns 0, or raises ``ConfigError`` naming the key and value (the command
line prints it and exits 1). The unit's ``ExecReload=`` runs it before signalling, so
``systemctl reload`` refuses a bad edit instead of the daemon logging it later; it runs it with
``database=False``: PostgreSQL is not asked (nor its last-good copy read), since a reload keeps
the daemon's connection and its table in force whatever the database does, and a silent one
would hold the reload up to ``optin_connect_timeout_seconds`` (300 s at most), past the unit's
start timeout, which systemd also applies to ``ExecReload=`` (it would kill the check and fail
the reload unsignalled).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.python.failure import Failure

from policyd_ipv6.daemon.config import Config, ConfigError
from policyd_ipv6.daemon.privileges import plan_privileges
from policyd_ipv6.daemon.wiring import PolicyService
from policyd_ipv6.optin.postgresql import PostgresOptin

__all__ = ["configtest"]


def _endpoints(config: Config, reactor) -> None:
    for key in ("listen", "milter_listen", "metrics_listen"):
        for description in getattr(config, key, ()):
            try:
                serverFromString(reactor, description)  # parses; binds nothing
            except Exception as error:
                raise ConfigError(
                    f'{key} = "{description}": not a valid endpoint ({error})') from None


def configtest(config: Config, database: bool = True) -> int:
    from twisted.internet import reactor as global_reactor

    # Twisted types it with zope interfaces, whose methods mypy cannot call (no self).
    reactor: Any = global_reactor
    # serve's first check: a user that does not exist (or that this process cannot become,
    # as when ExecReload= runs it as the unit's User=) would refuse the next start.
    plan_privileges(config.user, allow_root=True)
    _endpoints(config, reactor)
    parts = PolicyService(config, reactor, keep_state=False)  # reads the opt-in file
    if not database and isinstance(parts.optin, PostgresOptin):
        parts.optin.stop()  # never started: no connection was made
        print(f"policyd-ipv6: configuration OK: {config.source} (opt-in table from "
              f"{parts.optin.describe()}: not read)")
        return 0
    done: list[Any] = []

    def run() -> None:
        d = parts.ready()  # PostgreSQL: its first load, or the last-good copy
        d.addBoth(done.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    parts.optin.stop()
    if isinstance(done[0], Failure):
        done[0].raiseException()
    print(f"policyd-ipv6: configuration OK: {config.source} "
          f"({len(parts.optin.table)} opt-in entries)")
    return 0
