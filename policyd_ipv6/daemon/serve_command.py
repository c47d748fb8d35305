"""``policyd-ipv6 serve``: run the daemon in the foreground on the global reactor.

Contract: ``serve(config, log_level, allow_root)`` checks privileges, builds the service, binds
its listeners, drops to the configured user, and runs until SIGTERM or SIGINT; it returns the
exit status. It raises ``ConfigError`` for a configuration that cannot start (root without a
``user``, bad opt-in file, endpoint that cannot be bound) before the first request is served.
Every module is imported before the drop. The drop happens in the same reactor turn as the
binding, before any connection is read; if it fails, the error is logged, the listeners are
closed and ``serve`` returns 1 without having answered a request.
SIGHUP re-reads the configuration and the opt-in table. With ``metrics_listen``, the service
is counted (``metrics.Metrics``) and the metrics listeners are bound after the others, before
the drop. With ``optin_postgresql`` the listeners
are bound only once the first table is loaded (``PolicyService.ready()``), systemd being told
first that the start may last ``optin_connect_timeout_seconds`` more (``Lifecycle.waiting``),
and the database connection is closed at shutdown.
"""

from __future__ import annotations

import os
import sys
from typing import Any, cast

from twisted.logger import ILogObserver, Logger, globalLogPublisher

from policyd_ipv6 import __version__
from policyd_ipv6.daemon.collector import Collector
from policyd_ipv6.daemon.config import Config, ConfigError
from policyd_ipv6.daemon.lifecycle import Lifecycle, inherited_sockets
from policyd_ipv6.daemon.limits import descriptor_budget, raise_open_files_limit
from policyd_ipv6.daemon.logs import start_logging
from policyd_ipv6.daemon.privileges import (
    drop_privileges,
    load_lazy_modules,
    plan_privileges,
)
from policyd_ipv6.daemon.wiring import PolicyService, install_sighup
from policyd_ipv6.optin.postgresql import PostgresOptin

__all__ = ["serve"]

_log = Logger(namespace="policyd-ipv6")


def serve(config: Config, log_level: str = "info", allow_root: bool = False) -> int:
    from twisted.internet import reactor as global_reactor

    # Twisted types it with zope interfaces, whose methods mypy cannot call (no self).
    reactor: Any = global_reactor

    plan = plan_privileges(config.user, allow_root)
    inherited = inherited_sockets()  # socket activation: what systemd passed, if anything
    # Raises ConfigError before anything is bound. A socket named milter turns the milter on.
    service = PolicyService(config, reactor,
                            milter_socket=any(name == "milter" for _fd, name in inherited))
    # systemd: sockets passed in (socket activation), READY/RELOADING/STOPPING, watchdog.
    lifecycle = Lifecycle.from_environment(reactor, service, inherited)
    # Our own buffered stream on standard output, whatever python -u or PYTHONUNBUFFERED say:
    # lines are flushed once per reactor turn (logsetup), not written one system call each.
    stream = os.fdopen(sys.stdout.fileno(), "w", buffering=1 << 16, encoding="utf-8",
                       errors="backslashreplace", closefd=False)
    start_logging(stream, log_level, reactor)
    collector = Collector(reactor)
    metrics = None
    metrics_connections = 0  # the metrics listener's connections, reserved in the budget
    if config.metrics_listen:
        # Imported only here: prometheus_client and twisted.web are for the metrics alone.
        from policyd_ipv6.daemon.metrics import Metrics
        from policyd_ipv6.daemon.metrics_http import MAX_CONNECTIONS, listen_metrics

        metrics_connections = MAX_CONNECTIONS
        metrics = Metrics(reactor)
        metrics.attach(service)
        metrics.collector = collector
        globalLogPublisher.addObserver(cast(ILogObserver, metrics.observe_log))
    soft, _hard = raise_open_files_limit()
    milter = service.milter_factory
    connections, dns_inflight = descriptor_budget(soft, config.max_connections,
                                                  2 if milter is not None else 1,
                                                  metrics_connections)
    service.factory.max_connections = connections
    if milter is not None:
        milter.max_connections = connections
    service.lookups.max_inflight = dns_inflight
    if connections < config.max_connections:
        _log.warn("max_connections = {asked} lowered to {connections}: the open-files limit is "
                  "{soft} (raise LimitNOFILE / ulimit -n)", asked=config.max_connections,
                  connections=connections, soft=soft)
    failure: list[ConfigError] = []
    status = [0]
    if plan is not None:
        load_lazy_modules()

    def started(ports) -> None:
        if milter is not None and milter.dkim_pool is not None:
            # Spawned while still root so that they can import from wherever the daemon was
            # started (a clone in /root); each drops to the daemon's user before its first job.
            milter.dkim_pool.start(become=plan)
        try:
            drop_privileges(plan)
        except Exception as error:
            # Never serve as root: close the listeners in this same reactor turn, before any
            # connection is read, and exit non-zero.
            for port in ports:
                port.stopListening()
            _log.error("cannot drop privileges to user {user}: {error}; stopping without "
                       "serving", user=plan[2] if plan else "", error=str(error))
            status[0] = 1
            reactor.stop()
            return
        # Short collections only, the start-up objects frozen (daemon.collector).
        collector.start()
        service.optin.start()
        install_sighup(reactor, lifecycle.reloading(service.reload))
        lifecycle.ready(ports)  # READY=1: bound, privileges dropped, table loaded
        servers = ", ".join(str(s) for s in service.client.nameservers)
        _log.info("policyd-ipv6 {version} ready: rdns={rdns}, nameservers {servers}, "
                  "opt-in table {path} ({count} entries), up to {files} open files{user}",
                  version=__version__, rdns=config.rdns, servers=servers,
                  path=(service.optin.describe() if isinstance(service.optin, PostgresOptin)
                        else config.optin_file), count=len(service.optin.table), files=soft,
                  user=f", running as {plan[2]}" if plan else "")
        if service.milter_factory is not None:
            _log.info("milter: SPF or DKIM (DKIM checked at end of message), "
                      "Authentication-Results authserv-id {authserv_id}",
                      authserv_id=service.milter_factory.authserv_id)
        else:
            _log.info("no milter_listen: SPF alone decides at RCPT (no DKIM)")
        if allow_root and plan is None:
            _log.warn("running as root (--allow-root): meant for disposable test labs only")

    def metrics_too(ports):
        if metrics is None:
            return ports
        return listen_metrics(reactor, config.metrics_listen, metrics, ports)

    def not_started(f) -> None:
        failure.append(f.value if f.check(ConfigError) else ConfigError(str(f.value)))
        reactor.stop()

    def first_table():
        if isinstance(service.optin, PostgresOptin):
            # Up to optin_connect_timeout_seconds (300 at most) before the last-good copy is
            # served: longer than systemd's default start timeout, which would kill the start.
            lifecycle.waiting(config.optin_connect_timeout_seconds,
                              "waiting for the opt-in table from " + service.optin.describe())
        return service.ready()

    reactor.addSystemEventTrigger("before", "shutdown", service.optin.stop)
    reactor.callWhenRunning(
        lambda: first_table().addCallback(lambda _table: service.listen(lifecycle.inherited))
        .addCallback(metrics_too).addCallbacks(started, not_started))
    reactor.run()
    if failure:
        stream.flush()
        raise failure[0]
    _log.info("policyd-ipv6 stopped")
    stream.flush()  # the reactor's last turn is over: nothing else will flush this line
    return status[0]
