"""What an orchestrator asks of every reportflow process, on REPORTFLOW_METRICS_PORT (off when unset):

    /livez    the process's loop is alive (else: restart it)
    /readyz   it can do its work now: connected to a broker node and the database, and consuming
    /metrics  Prometheus's text format, written by prometheus-client (the Prometheus project's own)

The span pipeline's counters are exported from the same registry, so there is one place to scrape."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger("reportflow.health")


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # probes every few seconds would fill the log
        pass


class HealthServer:
    def __init__(
        self,
        port: int,
        live: Callable[[], bool],
        ready: Callable[[], str | None],
        *,
        bind: str = "0.0.0.0",
        registry=REGISTRY,
    ):
        """ready() returns None when ready, else why not."""
        self._live, self._ready = live, ready
        self._metrics = make_wsgi_app(registry)
        self._server = make_server(bind, port, self._app, ThreadingWSGIServer, handler_class=_Quiet)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health and metrics on :%d (/livez, /readyz, /metrics)", self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/livez":
            return _answer(start_response, None if self._live() else "the process's loop has stopped")
        if path == "/readyz":
            try:
                why_not = self._ready()
            except Exception as exc:
                why_not = f"readiness check failed: {exc!r}"
            return _answer(start_response, why_not)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"/livez, /readyz or /metrics\n"]


def _answer(start_response, why_not: str | None):
    status = "200 OK" if why_not is None else "503 Service Unavailable"
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")])
    return [(why_not or "ok").encode() + b"\n"]


def serve_health(settings, live, ready, provider=None) -> HealthServer | None:
    """The process's health server, when REPORTFLOW_METRICS_PORT is set; its span pipeline joins /metrics."""
    if not settings.metrics_port:
        return None
    if provider is not None:
        REGISTRY.register(SpanPipelineCollector(provider))
    return HealthServer(settings.metrics_port, live, ready, bind=settings.metrics_bind).start()


class SpanPipelineCollector:
    """The span pipeline's own counters (shared.tracing.SpanPipelineStats), read at scrape time."""

    def __init__(self, provider):
        self._provider = provider

    def collect(self):
        snapshot = self._provider.stats.snapshot()
        spans = CounterMetricFamily(
            "reportflow_spans", "Spans through this process's span pipeline, by state", labels=["state"]
        )
        for state in ("started", "ended", "exported", "failed", "dropped"):
            spans.add_metric([state], snapshot[state])
        yield spans
        yield GaugeMetricFamily("reportflow_spans_queued", "Spans waiting to be exported", value=snapshot["queued"])
