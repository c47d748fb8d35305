"""The metrics listener: ``GET /metrics`` over HTTP, for Prometheus to scrape.

Contract: ``MetricsResource(metrics, reactor)`` answers ``GET`` (and ``HEAD``) of exactly
``/metrics`` (a query string is ignored) with the Prometheus text format; any other path is
404, any other method 405. The values are read on the reactor thread in one short pass
(``Metrics.snapshot``); the text is written in the reactor's thread pool, so a scrape never
holds a decision back for longer than that read, and at most ``MAX_SCRAPES`` are under way at
once (more: 503). ``listen_metrics(reactor, endpoints, metrics, bound)`` binds each
``metrics_listen`` endpoint: a Deferred of ``bound`` (the ports listening already) plus the
new ones, or failing with ``ConfigError`` naming the key and the endpoint, every port of
``bound`` and the new ones closed. Requests are not logged (Prometheus asks every few seconds);
an idle HTTP connection is closed after ``IDLE_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import resource, server

from policyd_ipv6.daemon.config import ConfigError
from policyd_ipv6.daemon.metrics import CONTENT_TYPE, Metrics, render

__all__ = ["MetricsResource", "MetricsSite", "listen_metrics", "MAX_SCRAPES",
           "IDLE_TIMEOUT_SECONDS"]

_log = Logger(namespace="policyd-ipv6")

MAX_SCRAPES = 4
IDLE_TIMEOUT_SECONDS = 60


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics, reactor) -> None:
        super().__init__()
        self.metrics = metrics
        self.reactor = reactor
        self.scrapes = 0

    def render_GET(self, request) -> bytes | int:
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Not found: the metrics are at /metrics\n"
        if self.scrapes >= MAX_SCRAPES:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Too many scrapes at once\n"
        snapshot = self.metrics.snapshot()
        self.scrapes += 1
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), render,
                                      snapshot)
        d.addCallbacks(self._write, self._failed, callbackArgs=(request,),
                       errbackArgs=(request,))
        d.addBoth(self._done)
        return server.NOT_DONE_YET

    def render_HEAD(self, request) -> bytes | int:
        return self.render_GET(request)

    def _write(self, body: bytes, request) -> None:
        if request.finished or request._disconnected:
            return
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        request.write(body)
        request.finish()

    def _failed(self, failure, request) -> None:
        _log.failure("internal error writing the metrics", failure)
        if not (request.finished or request._disconnected):
            request.setResponseCode(500)
            request.finish()

    def _done(self, _ignored) -> None:
        self.scrapes -= 1


class MetricsSite(server.Site):
    """A ``Site`` that does not log each request."""

    noisy = False

    def log(self, request) -> None:
        pass


@defer.inlineCallbacks
def listen_metrics(reactor, endpoints, metrics: Metrics, bound=()):
    """Bind every ``metrics_listen`` endpoint; see the module docstring."""
    site = MetricsSite(MetricsResource(metrics, reactor), timeout=IDLE_TIMEOUT_SECONDS)
    ports: list = list(bound)
    for description in endpoints:
        try:
            port = yield serverFromString(reactor, description).listen(site)
        except Exception as error:
            for bound in ports:
                bound.stopListening()
            raise ConfigError(f'metrics_listen = "{description}": cannot listen '
                              f"({error})") from None
        ports.append(port)
        _log.info("listening for metrics scrapes on {where}", where=description)
    return ports
