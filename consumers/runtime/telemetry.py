"""Telemetry, the runtime's one place for spans: the process span of each delivery (its parent, its
attributes), the spans of retries and dead letters, and the publish spans of what a stage emits.

What a span says about the business (which stage, which decision, who acted) and where a follow-up
event's trace lives are the stage's to say, through Stage.describe and Stage.stored_trace."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from opentelemetry import context, trace
from opentelemetry.instrumentation.pika import PikaInstrumentor
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, suppress_instrumentation
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from reportflow.consumers.stage import Stage
from reportflow.shared import failures
from reportflow.shared.config import TracingSettings
from reportflow.shared.publishing import publish_span_attributes, publish_span_name
from reportflow.shared.trace_context import carrier_of_current, context_from, unsampled_remote

PRIVATE_ATTRIBUTES = {"user.email"}  # personal data: recorded only when tracing.record_emails says so


class Telemetry:
    def __init__(
        self,
        stage: Stage,
        settings: TracingSettings,
        session_factory,
        broker_address: tuple[str, int],
        tracer_provider=None,
    ):
        self.stage = stage
        self.settings = settings
        self._session_factory = session_factory
        self.broker_address = broker_address  # the node connected to: spans name it
        self._provider = tracer_provider
        self.tracer = trace.get_tracer("reportflow.consumer", tracer_provider=tracer_provider)
        # Whether the provider's sampler follows an unsampled upstream (ParentBased's default): then such a
        # message needs no span to learn it is not sampled.
        self._unsampled_parent_decides = getattr(tracer_provider, "unsampled_parent_decides", False)
        # Whether a process span's attributes must be there for the sampler; if not, only a span that records
        # gets them. With no SDK behind the API (tracing off) nothing records: none are built.
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self._attributes_for_sampler = getattr(
            provider,
            "sampler_reads_attributes",
            not isinstance(provider, (trace.NoOpTracerProvider, trace.ProxyTracerProvider)),
        )

    def instrument(self, channel) -> None:
        # Per channel, not global instrument(): the channel of retries and dead letters, whose publishes are
        # rare. Consuming is traced by process() below, because the process span must be able to join a
        # report's stored trace; emitted events by publishing(), whose attributes are set once, at start.
        PikaInstrumentor.instrument_channel(
            channel, tracer_provider=self._provider, publish_hook=_publish_hook(*self.broker_address)
        )

    @contextmanager
    def process(
        self, delivery, message, exchange: str, queue: str, publisher: str | None = None, in_report_trace: bool = True
    ):
        """The span a delivery is processed in. Library instrumentation (SQL, publishes) runs only inside a
        sampled one: unsampled, it would make spans nobody exports; the context still travels on. Its attributes
        are given at start to a sampler that may read them, and otherwise built only for a span that records.
        in_report_trace: whether a late message may join its report's stored trace (a database read)."""
        try:
            parent, links = self._parent(delivery.properties, message, in_report_trace)
        except Exception:
            parent, links = context_from(delivery.properties.headers), []
        if self._unsampled_parent_decides and unsampled_remote(parent):
            # The sampler would only say no: the upstream's context travels on as it came, with no span made,
            # no attributes built, and no instrumentation asked.
            upstream = trace.get_current_span(parent)
            with trace.use_span(upstream), suppress_instrumentation():
                yield upstream
            return
        attributes = (
            self._attributes(delivery, message, exchange, queue, publisher) if self._attributes_for_sampler else None
        )
        with (
            self.tracer.start_as_current_span(
                f"process {exchange}:{message.type}:{queue}",
                context=parent,
                kind=SpanKind.CONSUMER,
                links=links,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
            nullcontext() if span.is_recording() else suppress_instrumentation(),
        ):
            if attributes is None and span.is_recording():
                span.set_attributes(self._attributes(delivery, message, exchange, queue, publisher))
            yield span

    @contextmanager
    def timer(self, message, stored_headers: dict, due_at):
        """The span a timer fires in: in the trace it was set in (the report's), so a reminder three days
        later is a span of the report's one trace, and what it emits carries that context on."""
        attributes = {
            "messaging.message.id": message.message_id,
            "reportflow.timer.due_at": due_at.isoformat(),
        }
        if message.report_id:
            attributes["report.id"] = message.report_id
        if self.stage.describe is not None:
            attributes.update({k: v for k, v in self.stage.describe(message).items() if k not in PRIVATE_ATTRIBUTES})
        with (
            self.tracer.start_as_current_span(
                f"timer {message.type}",
                context=context_from(stored_headers),
                kind=SpanKind.INTERNAL,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
            nullcontext() if span.is_recording() else suppress_instrumentation(),
        ):
            yield span

    def runtime_sql(self, instrumented: bool = True):
        """Around the runtime's own bookkeeping (inbox claim, outbox rows, commit): reportflow's plumbing,
        not the operator's business, so its SQL is traced only with tracing.runtime_sql. instrumented: whether
        its statements pass where the instrumentation sees them. (In an unsampled message's span,
        instrumentation is suppressed already.)"""
        if not instrumented or self.settings.runtime_sql or not is_instrumentation_enabled():
            return nullcontext()
        return suppress_instrumentation()

    @staticmethod
    def failed(span, exc: Exception, reason: str) -> None:
        span.record_exception(exc)
        Telemetry.error(span, type(exc).__qualname__, reason)

    @staticmethod
    def error(span, error_type: str, reason: str) -> None:
        span.set_status(Status(StatusCode.ERROR, reason))
        span.set_attribute("error.type", error_type)

    def retry(self, queue: str, delay: int, headers: dict, reason: str):
        return self.tracer.start_as_current_span(
            f"retry {queue}",
            kind=SpanKind.INTERNAL,
            attributes={
                "reportflow.retry.delay_seconds": delay,
                "reportflow.attempts": headers[failures.FAILURES],
                "reportflow.retry.reason": reason[:1000],
            },
        )

    def dead_letter(self, name: str, reason: str, headers: dict, parent: context.Context | None = None):
        return self.tracer.start_as_current_span(
            f"dead-letter {name}",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes={
                "reportflow.dead_letter.reason": reason[:1000],
                "reportflow.attempts": headers[failures.FAILURES],
            },
        )

    @contextmanager
    def publishing(self, stored_headers: dict, exchange: str, properties, body_size: int):
        """The publish span of an emitted event (an outbox row), under the span that emitted it, with its
        attributes given at start as the client's are; unsampled, no span at all. Yields the trace headers
        the message carries: the publish span's, or the stored context as it is."""
        if not sampled(stored_headers):
            yield dict(stored_headers)
            return
        routing_key = properties.type or ""
        with self.tracer.start_as_current_span(
            publish_span_name(exchange, routing_key),
            # Settled right after its handler, the emitting span is current already: nothing to extract.
            context=None if _is_current(stored_headers) else context_from(stored_headers),
            kind=SpanKind.PRODUCER,
            attributes=publish_span_attributes(
                exchange,
                routing_key,
                message_id=properties.message_id,
                report_id=properties.correlation_id,
                body_size=body_size,
                server=self.broker_address,
            ),
        ):
            yield carrier_of_current()

    def _parent(self, props, message, in_report_trace: bool = True) -> tuple[context.Context, list[Link]]:
        """The message's own context; or, for a message about a report that lives in another trace (a late
        decision), the report's trace with a link to the message's ("continue", the default), or the
        message's trace with a link to the report's ("link", for those who sample by trace)."""
        incoming = context_from(props.headers)
        if self.stage.stored_trace is None or not message.report_id or not in_report_trace:
            return incoming, []
        with suppress_instrumentation(), self._session_factory() as session:
            stored = self.stage.stored_trace(message, session)
        if not stored:
            return incoming, []
        incoming_span = trace.get_current_span(incoming).get_span_context()
        report_span = trace.get_current_span(context_from(stored)).get_span_context()
        if not report_span.is_valid or (incoming_span.is_valid and incoming_span.trace_id == report_span.trace_id):
            return incoming, []
        if self.settings.late_messages == "link" and incoming_span.is_valid:
            return incoming, [Link(report_span, {"reportflow.link.reason": "the report's trace"})]
        links = (
            [Link(incoming_span, {"reportflow.link.reason": "message arrived in this trace"})]
            if incoming_span.is_valid
            else []
        )
        return context_from(stored), links

    def _attributes(self, delivery, message, exchange: str, queue: str, publisher: str | None = None) -> dict:
        host, port = self.broker_address
        attributes = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": f"{exchange}:{message.type}:{queue}",
            "messaging.consumer.group.name": queue,
            "messaging.rabbitmq.destination.routing_key": message.type,
            "messaging.rabbitmq.message.delivery_tag": delivery.delivery_tag,
            "messaging.message.id": message.message_id,
            "messaging.message.body.size": len(delivery.body),
            "server.address": host,
            "server.port": port,
        }
        if message.report_id:
            attributes["messaging.message.conversation_id"] = message.report_id
            attributes["report.id"] = message.report_id
        if self.stage.describe is not None and isinstance(message.payload, dict):
            attributes.update(
                {
                    k: v
                    for k, v in self.stage.describe(message).items()
                    if self.settings.record_emails or k not in PRIVATE_ATTRIBUTES
                }
            )
        if publisher:
            attributes["reportflow.publisher"] = publisher
        if delivery.redelivered:
            attributes["reportflow.redelivered"] = True
        failed_before = failures.failures(delivery.properties)
        if failed_before:
            attributes["reportflow.attempt"] = failed_before + 1
        return attributes


def sampled(stored_headers: dict) -> bool:
    """Whether the context stored with an outbox row is sampled. It is asked for every message published,
    so the W3C flags (bit 0) are read directly; another format (OTEL_PROPAGATORS) takes full extraction."""
    traceparent = (stored_headers or {}).get("traceparent")
    if traceparent is None:
        return trace.get_current_span(context_from(stored_headers)).get_span_context().trace_flags.sampled
    try:
        return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)
    except (IndexError, ValueError):
        return False


def _is_current(stored_headers: dict) -> bool:
    """Whether the stored W3C context is that of the current span, so that nothing need be extracted: as when
    a delivery is settled in its process span's context (ended by then). Sampled, as publishing asks first,
    that span was recording, so its context carries no suppression of instrumentation."""
    current = trace.get_current_span().get_span_context()
    traceparent = stored_headers.get("traceparent")
    return (
        current.trace_flags.sampled
        and isinstance(traceparent, str)
        and traceparent[36:52] == format(current.span_id, "016x")
        and traceparent[3:35] == format(current.trace_id, "032x")
    )


def _publish_hook(host: str, port: int):
    """Brings the pika instrumentation's publish span to the current messaging conventions: its name,
    operation, destination, server and conversation. (Its older attributes stay; these go beside them.)"""

    def hook(span, body, properties) -> None:
        exchange = getattr(span, "name", "").removesuffix(" send")
        routing_key = properties.type or ""
        span.update_name(publish_span_name(exchange, routing_key))
        span.set_attribute("messaging.temp_destination", False)  # the instrumentation's older name, kept beside
        span.set_attributes(
            publish_span_attributes(
                exchange,
                routing_key,
                message_id=properties.message_id,
                report_id=properties.correlation_id,
                body_size=len(body),
                server=(host, port),
            )
        )

    return hook
