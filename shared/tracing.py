"""OpenTelemetry for every reportflow process: resource, sampler, exporter, propagation, log correlation,
a span pipeline that watches itself, and decorators for the project's own code and its extensions."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.jaeger import JaegerPropagator
from opentelemetry.propagators.textmap import TextMapPropagator, default_getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from reportflow.shared.config import Settings, TracingSettings
from reportflow.shared.otlp_wire import http_exporter
from reportflow.shared.version import version

log = logging.getLogger("reportflow.tracing")
_enabled = False  # read by the decorators on every call: when tracing is off they only call through


class UpstreamFriendlyPropagator(TextMapPropagator):
    """Reads W3C, B3 (single and multi header) and Jaeger headers; writes W3C trace context and baggage.

    Upstream systems keep whatever format they have; what reportflow publishes is the standard one.
    W3C is read last, so it wins when a message carries several formats."""

    _readers = (
        JaegerPropagator(),
        B3MultiFormat(),
        B3SingleFormat(),
        TraceContextTextMapPropagator(),
        W3CBaggagePropagator(),
    )
    _writers = (TraceContextTextMapPropagator(), W3CBaggagePropagator())

    _reader_fields = tuple(frozenset(r.fields) for r in _readers)

    def extract(self, carrier, context=None, getter=None):
        kwargs = {"getter": getter} if getter is not None else {}
        # Every message is read on every hop: with the default getter (propagate.extract passes it), a
        # format none of whose headers is present is not asked. (Jaeger's baggage headers: prefix uberctx-.)
        present = None
        if (getter is None or getter is default_getter) and isinstance(carrier, dict):
            present = set(carrier) | ({"uber-trace-id"} if any(k.startswith("uberctx-") for k in carrier) else set())
        for reader, fields in zip(self._readers, self._reader_fields, strict=True):
            if present is not None and fields.isdisjoint(present):
                continue
            context = reader.extract(carrier, context, **kwargs)
        return context

    def inject(self, carrier, context=None, setter=None):
        kwargs = {"setter": setter} if setter is not None else {}
        for writer in self._writers:
            writer.inject(carrier, context, **kwargs)

    @property
    def fields(self):
        return {f for w in self._writers for f in w.fields}


def enabled() -> bool:
    """Whether this process traces: setup_tracing installed a provider."""
    return _enabled


@contextlib.contextmanager
def switched(on: bool):
    """Tracing's decorators on or off for a block, whatever setup_tracing said: for a process that embeds
    reportflow's code and for tests; the switch is put back after."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


class ReportflowTracerProvider(TracerProvider):
    """The SDK's provider, with the span pipeline's counters beside it, for status, health and metrics.
    unsampled_parent_decides: its sampler never samples a span whose remote parent is unsampled (so the
    consumer runtime passes such a context on without asking it). sampler_reads_attributes: whether its
    sampler may decide on a span's attributes (if not, the runtime builds them only for a span it records)."""

    def __init__(self, *, unsampled_parent_decides: bool = False, sampler_reads_attributes: bool = True, **options):
        super().__init__(**options)
        self.unsampled_parent_decides = unsampled_parent_decides
        self.sampler_reads_attributes = sampler_reads_attributes
        self.stats = SpanPipelineStats()
        self.add_span_processor(self.stats)


def setup_tracing(
    service_name: str, settings: TracingSettings | None = None, environment: str = "development"
) -> ReportflowTracerProvider | None:
    """Install this process's tracer provider; None when tracing is off (then no exporter exists and
    the API's no-op tracer passes incoming trace context through unchanged)."""
    global _enabled
    settings = settings or TracingSettings()
    if not os.environ.get("OTEL_PROPAGATORS"):
        propagate.set_global_textmap(UpstreamFriendlyPropagator())
    # else: opentelemetry.propagate already built the composite that OTEL_PROPAGATORS names.
    if not settings.enabled or sdk_disabled():
        _enabled = False
        log.info("tracing is off: no tracer provider, no exporter")
        return None

    detected = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, when set
    ours = {
        "service.name": service_name,
        "service.namespace": "reportflow",
        "service.version": version(),
        "deployment.environment.name": environment,
        "service.instance.id": str(uuid.uuid4()),
    }
    set_by_user = set(detected.attributes) if os.environ.get("OTEL_RESOURCE_ATTRIBUTES") else set()
    if os.environ.get("OTEL_SERVICE_NAME"):
        set_by_user.add("service.name")
    resource = detected.merge(Resource({k: v for k, v in ours.items() if k not in set_by_user}))

    sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else ParentBased(TraceIdRatioBased(settings.sampling_ratio))
    # ParentBased's default for an unsampled remote parent is ALWAYS_OFF, and a ratio decides on the trace id
    # alone; a sampler named by OTEL_TRACES_SAMPLER may do neither, so it is asked for every span, attributes
    # and all.
    own = sampler is not None
    provider = ReportflowTracerProvider(
        resource=resource,
        unsampled_parent_decides=own,
        sampler_reads_attributes=not own,
        **({"sampler": sampler} if own else {}),
    )
    exporter = _exporter(settings, service_name)
    if exporter is not None:
        watched = WatchedExporter(exporter, provider.stats)

        # Ours unless the standard OTEL_BSP_* variable is set; None lets the SDK read that variable.
        def ours_unless(standard: str, value: int) -> int | None:
            return None if os.environ.get(standard) or not value else value

        processor = BatchSpanProcessor(
            watched,
            max_export_batch_size=ours_unless("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", settings.batch_max_export_size),
            schedule_delay_millis=ours_unless("OTEL_BSP_SCHEDULE_DELAY", settings.batch_schedule_delay_ms),
        )
        provider.stats.watch_queue(processor)
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _enabled = True
    return provider


def setup_command_tracing() -> None:
    """Tracing for one command-line run (reportflow publish, demo): spans are flushed when it exits."""
    settings = Settings.load()
    provider = setup_tracing("reportflow-cli", settings.tracing, settings.environment)
    if provider is not None:
        atexit.register(provider.shutdown)


def _exporter(settings: TracingSettings, service_name: str) -> SpanExporter | None:
    endpoint = (
        settings.exporter_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if not endpoint:
        return JsonLinesExporter(Path(settings.local_dir), service_name) if settings.local_dir else None
    protocol = (
        settings.exporter_protocol
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    # Given in the settings, the endpoint is passed; otherwise the exporter reads the OTEL_* variables itself.
    explicit = _traces_url(endpoint, protocol) if settings.exporter_endpoint else None
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=explicit)
    return http_exporter(explicit)


def _traces_url(endpoint: str, protocol: str) -> str:
    # Like OTEL_EXPORTER_OTLP_ENDPOINT: a base URL, to which HTTP adds the signal's path.
    return endpoint if protocol == "grpc" or endpoint.endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"


class JsonLinesExporter(SpanExporter):
    """With no collector, spans go to a file per process as OTLP JSON, one export request per line,
    so `reportflow trace` can show a trace to someone without Jaeger."""

    def __init__(self, folder: Path, service_name: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{service_name}-{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    def export(self, spans) -> SpanExportResult:
        from google.protobuf.json_format import MessageToDict
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        request = MessageToDict(encode_spans(spans))
        for resource_spans in request.get("resourceSpans", []):
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    _ids_to_hex(span)
                    for link in span.get("links", []):
                        _ids_to_hex(link)
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(request, separators=(",", ":")) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _ids_to_hex(record: dict) -> None:
    """OTLP/JSON writes trace and span ids as hex; protobuf's JSON mapping would give base64."""
    import base64

    for key in ("traceId", "spanId", "parentSpanId"):
        if record.get(key):
            record[key] = base64.b64decode(record[key]).hex()


class SpanPipelineStats(SpanProcessor):
    """Counts what goes through the span pipeline: started, ended, exported, failed, dropped, queued,
    and how long exports take. Logged every stats_interval_seconds and shown by `reportflow status`."""

    def __init__(self):
        self.started = self.ended = self.exported = self.failed = self.export_failures = 0
        self.in_export = 0
        self.export_seconds_last = self.export_seconds_max = 0.0
        self._queue_of = None

    def watch_queue(self, processor: BatchSpanProcessor) -> None:
        batch = getattr(processor, "_batch_processor", None)
        queue = getattr(batch, "_queue", None)
        self._queue_of = (lambda: len(queue)) if queue is not None else None

    def on_start(self, span, parent_context=None) -> None:
        self.started += 1

    def on_end(self, span: ReadableSpan) -> None:
        if span.context.trace_flags.sampled:
            self.ended += 1

    def snapshot(self) -> dict:
        queued = self._queue_of() if self._queue_of else 0
        accounted = self.exported + self.failed + queued + self.in_export
        return {
            "started": self.started,
            "ended": self.ended,
            "exported": self.exported,
            "failed": self.failed,
            "export_failures": self.export_failures,
            "dropped": max(0, self.ended - accounted) if self._queue_of else 0,
            "queued": queued,
            "export_ms_last": round(self.export_seconds_last * 1000, 2),
            "export_ms_max": round(self.export_seconds_max * 1000, 2),
        }


class WatchedExporter(SpanExporter):
    """An exporter that tells SpanPipelineStats how each export went. A collector that cannot be
    reached costs failed exports and, once the queue is full, dropped spans: never a slower consumer,
    since exports happen on the batch processor's own thread."""

    def __init__(self, inner: SpanExporter, stats: SpanPipelineStats):
        self.inner, self.stats = inner, stats

    def export(self, spans) -> SpanExportResult:
        self.stats.in_export = len(spans)
        started = time.perf_counter()
        try:
            result = self.inner.export(spans)
        except Exception:
            log.exception("span export raised")
            result = SpanExportResult.FAILURE
        elapsed = time.perf_counter() - started
        self.stats.export_seconds_last = elapsed
        self.stats.export_seconds_max = max(self.stats.export_seconds_max, elapsed)
        if result is SpanExportResult.SUCCESS:
            self.stats.exported += len(spans)
        else:
            self.stats.failed += len(spans)
            self.stats.export_failures += 1
        self.stats.in_export = 0
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def log_span_stats_periodically(provider: ReportflowTracerProvider | None, interval_seconds: int) -> None:
    if provider is None or interval_seconds <= 0:
        return

    def loop() -> None:
        previous_failures = 0
        while True:
            time.sleep(interval_seconds)
            snapshot = provider.stats.snapshot()
            level = (
                logging.WARNING
                if snapshot["export_failures"] > previous_failures or snapshot["dropped"]
                else logging.INFO
            )
            log.log(level, "span pipeline: %s", snapshot)
            previous_failures = snapshot["export_failures"]

    threading.Thread(target=loop, name="span-stats", daemon=True).start()


# -- decorators -------------------------------------------------------------------------------------
def _traced(span_name: str | None, attributes: dict | None, kind=trace.SpanKind.INTERNAL):
    def decorate(function):
        name = span_name or function.__qualname__
        tracer = trace.get_tracer(function.__module__)
        fixed = (
            attributes
            if attributes is not None
            else {"code.function.name": function.__qualname__, "code.namespace": function.__module__}
        )

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if not _enabled:
                return function(*args, **kwargs)
            with tracer.start_as_current_span(
                name, kind=kind, attributes=fixed, record_exception=False, set_status_on_exception=False
            ) as span:
                try:
                    return function(*args, **kwargs)
                except Exception as exc:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                    span.set_attribute("error.type", type(exc).__qualname__)
                    raise

        return wrapper

    return decorate


def trace_function(function=None, *, name: str | None = None):
    """A span around a function, named after it: `@trace_function` or `@trace_function(name=...)`."""
    decorate = _traced(name, None)
    return decorate(function) if function is not None else decorate


def trace_external_call(service: str, operation: str):
    """A CLIENT span for a call to another system (SMTP, storage, an HTTP API)."""
    return _traced(
        f"{service} {operation}", {"peer.service": service, "reportflow.operation": operation}, trace.SpanKind.CLIENT
    )


def trace_business_operation(name: str):
    """A span that names a step of the workflow, for operators reading the trace."""
    return _traced(name, {"reportflow.operation": name})


# -- logs -----------------------------------------------------------------------------------------------
class TraceIdsInLogs(logging.Filter):
    """Every log line carries the trace and span it was written in."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        record.trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else "-"
        record.span_id = format(span_context.span_id, "016x") if span_context.is_valid else "-"
        return True


class JsonLogFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", "-"),
            "span_id": getattr(record, "span_id", "-"),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "INFO", log_format: str = "text", service: str = "reportflow") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(TraceIdsInLogs())
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonLogFormatter(service)
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s trace_id=%(trace_id)s span_id=%(span_id)s %(message)s"
        )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pika", "fontTools", "weasyprint", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(logging.WARNING if noisy != "weasyprint" else logging.ERROR)
    # The SDK logs every span it drops when its queue is full: thousands of lines under load. The span
    # pipeline's own stats count drops and warn once per interval instead.
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
