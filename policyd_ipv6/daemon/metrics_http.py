"""The metrics listener: ``GET /metrics`` over HTTP, for Prometheus to scrape.

Contract: ``MetricsResource(metrics, reactor)`` answers ``GET`` (and ``HEAD``) of exactly
``/metrics`` (a query string is ignored) with the Prometheus text format; any other path is
404, any other method 405. The values are read on the reactor thread in one short pass
(``Metrics.snapshot``); the text is written in the reactor's thread pool, so a scrape never
holds a decision back for longer than that read, and at most ``MAX_SCRAPES`` are under way at
once (more: 503). ``listen_metrics(reactor, endpoints, metrics, bound)`` binds each
``metrics_listen`` endpoint: a Deferred of ``bound`` (the ports listening already) plus the
new ones, or failing with ``ConfigError`` naming the key and the endpoint, every port of
``bound`` and the new ones closed. Requests are not logged (Prometheus asks every few seconds).
What a client can hold is bounded, outside the policy listeners' budget: at most
``MAX_CONNECTIONS`` connections over all the endpoints (``MetricsFactory``: a newcomer beyond
them is closed at once, unread, with a warning at most once a minute, and counted in
``connections_refused_total{listener="metrics"}``, its open ones in
``connections{listener="metrics"}``: ``metrics_factory`` sets ``Metrics.listener`` to the
factory it builds); a connection serves one request (``Connection: close``) and is
aborted ``CONNECTION_SECONDS`` after it was accepted, whatever it is doing (a client trickling
its headers included); a request announcing a body (``Content-Length`` above 0, or any
``Transfer-Encoding``) is answered 413 and closed before a byte of the body is read
(``MetricsRequest``: Twisted would spool it to a temporary file).
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.web import resource, server

from policyd_ipv6.connection import OverLimitWarning
from policyd_ipv6.daemon.config import ConfigError
from policyd_ipv6.daemon.metrics import CONTENT_TYPE, Metrics, render

__all__ = ["MetricsResource", "MetricsRequest", "MetricsSite", "MetricsFactory",
           "metrics_factory", "listen_metrics", "MAX_SCRAPES", "MAX_CONNECTIONS",
           "CONNECTION_SECONDS"]

_log = Logger(namespace="policyd-ipv6")

MAX_SCRAPES = 4
# Descriptors the metrics may hold: serve reserves them out of the open-files budget.
MAX_CONNECTIONS = 8
CONNECTION_SECONDS = 10
# Written as it is: the request never reaches the resource, its body is never read.
BODY_REFUSED = (b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 31\r\n\r\n"
                b"A metrics request has no body.\n")


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics, reactor) -> None:
        super().__init__()
        self.metrics = metrics
        self.reactor = reactor
        self.scrapes = 0

    def render(self, request) -> bytes | int:
        # Another method is refused here, in plain text with its Allow header: Twisted's own
        # 405 page is built by a class it deprecated in 22.10 (a warning on every such request).
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Method not allowed: the metrics are read with GET\n"
        return super().render(request)

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
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _failed(self, failure, request) -> None:
        _log.failure("internal error writing the metrics", failure)
        if not (request.finished or request._disconnected):
            request.setResponseCode(500)
            request.finish()

    def _done(self, _ignored) -> None:
        self.scrapes -= 1


class MetricsRequest(server.Request):
    """A request that never has a body, and the last one on its connection."""

    def gotLength(self, length) -> None:
        # Twisted calls this once the headers are in, before any byte of a body (which it
        # would spool to a temporary file past 100 kB): the place to refuse one unread.
        # Persistence was decided just before: one request per connection, so that
        # CONNECTION_SECONDS bounds a connection without cutting a scrape's keep-alive.
        channel: Any = self.channel
        channel.persistent = False
        self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        if length == 0:
            super().gotLength(length)
            return
        self.content = io.BytesIO()  # never written: the channel stops reading now
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the refusal
        channel.transport.write(BODY_REFUSED)
        channel.loseConnection()


class MetricsSite(server.Site):
    """A ``Site`` that does not log each request."""

    noisy = False
    requestFactory = MetricsRequest

    def log(self, request) -> None:
        pass


class _Deadline(policies.ProtocolWrapper):
    """One metrics connection, aborted ``CONNECTION_SECONDS`` after it was accepted."""

    transport: Any  # Twisted's zope-typed ITransport, whose methods mypy cannot call
    deadline = None

    def makeConnection(self, transport) -> None:
        self.deadline = self.factory.clock.callLater(CONNECTION_SECONDS, self._expired)
        super().makeConnection(transport)

    def _expired(self) -> None:
        self.deadline = None
        self.transport.abortConnection()

    def connectionLost(self, reason=connectionDone) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None
        super().connectionLost(reason)


class MetricsFactory(policies.WrappingFactory):
    """The site behind every metrics endpoint, at most ``MAX_CONNECTIONS`` connections at once
    (``protocols``: those open); ``buildProtocol`` returning None closes the newcomer."""

    noisy = False
    protocol = _Deadline

    def __init__(self, site: MetricsSite, clock) -> None:
        super().__init__(site)
        self.clock = clock
        # Not max_connections: a bound of its own, which the setting does not change.
        self.over_limit = OverLimitWarning(
            clock, "metrics", "{listener} listener: {limit} connections at once reached "
            "(a fixed bound)")

    def buildProtocol(self, addr):
        if len(self.protocols) >= MAX_CONNECTIONS:
            self.over_limit.note(MAX_CONNECTIONS, "the newcomer was closed")
            return None
        return super().buildProtocol(addr)


def metrics_factory(metrics: Metrics, reactor) -> MetricsFactory:
    """What each metrics endpoint listens with; no idle timeout: ``CONNECTION_SECONDS`` bounds
    a connection's whole life."""
    site = MetricsSite(MetricsResource(metrics, reactor), timeout=None, reactor=reactor)
    factory = MetricsFactory(site, reactor)
    metrics.listener = factory  # its refusals, counted with the policy and milter ones
    return factory


@defer.inlineCallbacks
def listen_metrics(reactor, endpoints, metrics: Metrics, bound=()):
    """Bind every ``metrics_listen`` endpoint; see the module docstring."""
    factory = metrics_factory(metrics, reactor)
    ports: list = list(bound)
    for description in endpoints:
        try:
            port = yield serverFromString(reactor, description).listen(factory)
        except Exception as error:
            for bound in ports:
                bound.stopListening()
            raise ConfigError(f'metrics_listen = "{description}": cannot listen '
                              f"({error})") from None
        ports.append(port)
        _log.info("listening for metrics scrapes on {where}", where=description)
    return ports
