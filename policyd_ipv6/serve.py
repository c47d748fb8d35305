"""``policyd-ipv6 serve``: run the daemon in the foreground on the global reactor.

Contract: ``serve(config, log_level)`` builds the service, binds its listeners, runs until
SIGTERM or SIGINT and returns the exit status; it raises ``ConfigError`` for a configuration
that cannot start (bad opt-in file, endpoint that cannot be bound), before the first request.
SIGHUP re-reads the opt-in file.
"""

from __future__ import annotations

import sys

from twisted.logger import Logger

from . import __version__
from .config import Config, ConfigError
from .logsetup import start_logging
from .service import build, install_sighup, listen

__all__ = ["serve"]

_log = Logger(namespace="policyd-ipv6")


def serve(config: Config, log_level: str = "info") -> int:
    from twisted.internet import reactor

    parts = build(config, reactor)  # raises ConfigError before anything is bound
    start_logging(sys.stdout, log_level)
    failure: list[ConfigError] = []

    def started(_ports) -> None:
        parts.optin.start()
        install_sighup(reactor, lambda: parts.optin.reload("SIGHUP"))
        servers = ", ".join(str(s) for s in parts.client.nameservers)
        _log.info("policyd-ipv6 {version} ready: rdns={rdns}, nameservers {servers}, "
                  "opt-in table {path} ({count} entries)", version=__version__,
                  rdns=config.rdns, servers=servers, path=config.optin_file,
                  count=len(parts.optin.table))

    def not_started(f) -> None:
        failure.append(f.value if f.check(ConfigError) else ConfigError(str(f.value)))
        reactor.stop()

    reactor.callWhenRunning(
        lambda: listen(parts, reactor).addCallbacks(started, not_started))
    reactor.run()
    if failure:
        raise failure[0]
    _log.info("policyd-ipv6 stopped")
    return 0
