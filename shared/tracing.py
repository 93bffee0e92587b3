"""OpenTelemetry for every reportflow process: resource, exporter, propagation, log correlation."""
from __future__ import annotations

import logging
import os
import uuid
from importlib import metadata

from opentelemetry import context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.jaeger import JaegerPropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)


class UpstreamFriendlyPropagator(TextMapPropagator):
    """Reads W3C, B3 (single and multi header) and Jaeger headers; writes W3C trace context and baggage.

    Upstream systems keep whatever format they have; what reportflow publishes is the standard one.
    W3C is read last, so it wins when a message carries several formats."""

    _readers = (JaegerPropagator(), B3MultiFormat(), B3SingleFormat(), TraceContextTextMapPropagator(),
                W3CBaggagePropagator())
    _writers = (TraceContextTextMapPropagator(), W3CBaggagePropagator())

    def extract(self, carrier, context=None, getter=None):
        kwargs = {"getter": getter} if getter is not None else {}
        for reader in self._readers:
            context = reader.extract(carrier, context, **kwargs)
        return context

    def inject(self, carrier, context=None, setter=None):
        kwargs = {"setter": setter} if setter is not None else {}
        for writer in self._writers:
            writer.inject(carrier, context, **kwargs)

    @property
    def fields(self):
        return {f for w in self._writers for f in w.fields}


def version() -> str:
    try:
        return metadata.version("reportflow")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def setup_tracing(service_name: str, environment: str = "development") -> TracerProvider:
    """Install the tracer provider of this process. Exports over OTLP when an endpoint is configured."""
    resource = Resource.create({
        "service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name,
        "service.namespace": "reportflow",
        "service.version": version(),
        "deployment.environment.name": environment,
        "service.instance.id": str(uuid.uuid4()),
    })
    provider = TracerProvider(resource=resource)
    exporter = _otlp_exporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    propagate.set_global_textmap(UpstreamFriendlyPropagator())
    return provider


def _otlp_exporter():
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def carrier_of_current() -> dict:
    """The current trace context as W3C headers, to store or send."""
    carrier: dict = {}
    propagate.inject(carrier)
    return carrier


def context_from(carrier: dict | None) -> context.Context:
    return propagate.extract(carrier or {})


class TraceIdsInLogs(logging.Filter):
    """Every log line carries the trace and span it was written in."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        record.trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else "-"
        record.span_id = format(span_context.span_id, "016x") if span_context.is_valid else "-"
        return True


def setup_logging(level: str | None = None) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(TraceIdsInLogs())
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s trace_id=%(trace_id)s span_id=%(span_id)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("REPORTFLOW_LOG_LEVEL", "INFO"))
    logging.getLogger("pika").setLevel(logging.WARNING)
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    logging.getLogger("weasyprint").setLevel(logging.ERROR)
