"""What tracing costs per message per hop, in CPU time (all threads, the exporter's included), so broker
and database latency do not blur it: the runtime's own tracing calls for one delivery, with the real
SDK, the real pika and SQLAlchemy instrumentations and a real OTLP export to a local sink, against
the same work with tracing off.

    python -m bench.tracing_cost OTLP_PORT ITERATIONS  (prints JSON; run once with tracing on, once off)

It runs in its own process because a process has one global tracer provider."""
from __future__ import annotations

import json
import os
import sys
import time

import pika
from opentelemetry import context, trace
from opentelemetry.instrumentation.pika.utils import _decorate_basic_publish
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from sqlalchemy import create_engine, text

from consumers.runtime import _event_attributes, _publish_hook
from shared.config import TracingSettings
from shared.events import Event, message_properties, parse
from shared.tracing import carrier_of_current, context_from, setup_tracing


class _Params:
    host, port = "127.0.0.1", 5672


class _NetworklessChannel:
    """Stands in for the broker: this measures the instrumentation around a publish, not the publish."""

    class connection:  # noqa: N801 - the attribute shape pika's instrumentation reads
        params = _Params()

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        return None


def main(port: int, iterations: int, enabled: bool, ratio: float = 1.0) -> dict:
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
    provider = setup_tracing("bench-tracing-cost", TracingSettings(enabled=enabled, sampling_ratio=ratio))
    tracer = trace.get_tracer("reportflow.consumer")
    engine = create_engine("sqlite://")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE inbox (id TEXT PRIMARY KEY)"))
    if provider is not None:
        SQLAlchemyInstrumentor().instrument(engine=engine, tracer_provider=provider)
    channel = _NetworklessChannel()
    if provider is not None:  # what PikaInstrumentor.instrument_channel does to a channel's publish
        channel.basic_publish = _decorate_basic_publish(
            channel.basic_publish, channel, provider.get_tracer("opentelemetry.instrumentation.pika"),
            _publish_hook("127.0.0.1", 5672))
    # As an upstream that leaves sampling to reportflow sends it: no traceparent, each message a new root.
    headers: dict = {}
    body = json.dumps({"report_id": "r-1", "title": "t", "template": "standard",
                       "submitter": {"email": "a@example.com", "id": "u-1"}, "stages": ["s"]}).encode()

    def one_message(n: int) -> None:
        message = parse("report.created", f"m-{n}", "application/json", body, 1 << 20)
        parent = context_from(headers)
        attributes = {"messaging.system": "rabbitmq", "messaging.operation.type": "process",
                      "messaging.destination.name": "reportflow:report.created:reportflow.generation",
                      "messaging.rabbitmq.destination.routing_key": "report.created",
                      "messaging.message.id": message.message_id, "messaging.rabbitmq.message.delivery_tag": n,
                      "server.address": "127.0.0.1", "server.port": 5672, "report.id": "r-1",
                      "messaging.message.conversation_id": "r-1", **_event_attributes(message, False)}
        with tracer.start_as_current_span("process reportflow:report.created:reportflow.generation", context=parent,
                                          kind=trace.SpanKind.CONSUMER, attributes=attributes):
            with tracer.start_as_current_span("validate"):
                pass
            with engine.begin() as connection:  # the inbox check and the insert: two statements, as in a hop
                connection.execute(text("SELECT id FROM inbox WHERE id = :id"), {"id": message.message_id})
                connection.execute(text("INSERT INTO inbox VALUES (:id)"), {"id": message.message_id})
            carrier = carrier_of_current()
        token = context.attach(context_from(carrier))
        try:
            event = Event("report.generated", {"report_id": "r-1"})
            channel.basic_publish("reportflow", event.type, b"{}", pika.BasicProperties(**message_properties(event)))
        finally:
            context.detach(token)

    for n in range(200):  # warm
        one_message(-n - 1)
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    for n in range(iterations):
        one_message(n)
    if provider is not None:
        provider.force_flush()  # the export's CPU belongs to the messages it exported
    cpu = time.process_time() - started_cpu
    spans = provider.stats.snapshot() if provider is not None else {}
    if provider is not None:
        provider.shutdown()
    return {"enabled": enabled, "iterations": iterations, "cpu_seconds": cpu,
            "wall_seconds": time.perf_counter() - started_wall, "spans": spans}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "on",
                          float(sys.argv[4]) if len(sys.argv) > 4 else 1.0)))
