"""What tracing costs per message per hop, in CPU time (all threads, the exporter's included), so broker
and database latency do not blur it. It drives the runtime's own code for one delivery, the consumer's
processor and settler, on a pass-through stage with PostgreSQL, the real SDK, the pika and SQLAlchemy
instrumentations and a real OTLP export to a local sink; only the broker is left out (a channel that
sends nothing). Run once with tracing on and once off: the difference is tracing's.

    python -m bench.tracing_cost OTLP_PORT ITERATIONS on|off|sdk|paired [SAMPLING_RATIO [root|unsampled]]

(prints JSON). root: each message comes with no trace context, as from an upstream that leaves sampling
to reportflow, so the hop starts its trace; unsampled: each comes in a trace its upstream did not sample,
as every hop after a chain's first does at sampling 0.

on, off and sdk each run in a process of their own, because a process has one global tracer provider.
paired runs the traced and the untraced hop side by side in one process, in alternating blocks, so that
what moves a process's CPU time from one run to the next (the machine's load, where its heap landed)
moves both alike and cancels in their difference."""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
import uuid

import pika
from pika.adapters.blocking_connection import BlockingChannel

from bench.passthrough import first_event, pass_through
from reportflow.consumers.bootstrap import session_factory
from reportflow.consumers.descriptions import describe
from reportflow.consumers.runtime import Consumer, Delivery
from reportflow.consumers.stage import Stage
from reportflow.shared.config import Settings, TracingSettings
from reportflow.shared.events import Event, encode, message_properties
from reportflow.shared.migrate import upgrade
from reportflow.shared.tracing import setup_tracing


class _NetworklessChannel(BlockingChannel):
    """Stands in for the broker: this measures the runtime and the instrumentation around a publish and
    an ack, not the network. (A BlockingChannel by type, so the pika instrumentation takes it as one.)"""

    def __init__(self) -> None:
        self._consumer_infos = {}

    @property
    def is_open(self) -> bool:  # the settler asks before it settles a delivery on its channel
        return True

    class connection:
        class params:
            host, port = "127.0.0.1", 5672

    def confirm_delivery(self) -> None:
        pass

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False) -> None:
        pass

    def basic_consume(self, *args, **kwargs) -> None:
        pass

    def basic_ack(self, delivery_tag, multiple=False) -> None:
        pass


class _NetworklessConfirms:
    """Stands in for the pipelined-confirms channel: the runtime's publish, and no broker behind it."""

    def __init__(self):
        self._channel = _NetworklessChannel()

    def publish(self, exchange, routing_key, body, properties, item) -> None:
        self._channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)


def main(port: int, iterations: int, mode: str, ratio: float, database_url: str) -> dict:
    """mode: "on" or "off", the runtime's hop with tracing on or off; "sdk", the floor: the two spans a
    traced hop exports (process and publish, with the attributes the runtime gives them), made and
    exported by the SDK alone, with no runtime around them."""
    _prepare(port, database_url)
    settings = _settings(database_url, TracingSettings(enabled=mode != "off", sampling_ratio=ratio))
    if mode == "sdk":
        # Made faster than a hop makes them, the spans would overflow the SDK's queue and go unexported.
        os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", str(4 * (iterations + 200)))
        provider = setup_tracing("bench-tracing-cost", settings.tracing)
        return _measured(iterations, provider, _bare_spans(settings, iterations))
    provider = setup_tracing("bench-tracing-cost", settings.tracing)
    return _measured(iterations, provider, _hops(settings, session_factory(settings, provider), provider))


def _prepare(port: int, database_url: str) -> None:
    """Spans to the sink on port, and the database migrated to the schema's head."""
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
    upgrade(database_url)


def _settings(database_url: str, tracing: TracingSettings) -> Settings:
    return Settings(database_url=database_url, exchange="bench-tracing-cost", tracing=tracing)


def _hops(settings: Settings, sessions, provider, upstream: str = "root"):
    """one_message(n): the runtime's hop for the n-th message, on a pass-through stage."""
    stage = Stage("tracing-cost", {"report.created": pass_through("report.created")}, describe=describe)
    consumer = Consumer(stage, settings, sessions, {}, tracer_provider=provider)
    consumer.settler.attach(_NetworklessChannel(), _NetworklessConfirms())
    run = uuid.uuid4().hex[:8]

    def one_message(n: int) -> None:
        event = Event("report.created", first_event(f"r-{run}-{n}"))
        properties = pika.BasicProperties(**message_properties(event, _upstream_headers(upstream)))
        delivery = Delivery(_NetworklessChannel(), n, settings.exchange, event.type, properties, encode(event), False)
        outcome = consumer.processor.process(delivery)
        assert outcome.publish and outcome.dead_letter_reason is None, outcome
        consumer.settler.settle(delivery, outcome)

    return one_message


def _upstream_headers(upstream: str) -> dict:
    """The trace context a message arrives with: none (a root), or an unsampled trace of its own."""
    if upstream == "root":
        return {}
    trace_id, span_id = random.getrandbits(128) or 1, random.getrandbits(64) or 1
    return {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-00"}


# Messages a block. A sampled block ends with a flush, so its spans' export is in its own time: blocks of a
# hundred keep exports as large as a hop's (64 spans). Unsampled, nothing is exported and the two hops
# alternate message by message, so that the machine's drift, which moves a hundred-message block by more
# than the cost measured, falls on both alike.
PAIRED_BLOCK = {"sampled": 100, "unsampled": 1}


def paired(port: int, iterations: int, ratio: float, database_url: str, upstream: str = "root") -> dict:
    """The hop traced and untraced in one process, in alternating blocks of PAIRED_BLOCK messages, each
    pair's order swapped from the last. A traced block ends with a flush, which waits for an export the
    batch processor has started and sends the rest, so the export of its spans is in its own CPU time and
    none runs on into an untraced block. Tracing's cost is the median of the pairs' differences, per
    message. upstream: the trace context the messages come with (see the module's doc)."""
    from opentelemetry.trace import NoOpTracerProvider

    _prepare(port, database_url)
    untraced = _settings(database_url, TracingSettings(enabled=False))
    traced = _settings(database_url, TracingSettings(enabled=True, sampling_ratio=ratio))
    # The untraced hop's engine first: once the SQLAlchemy instrumentation is on, it instruments every engine
    # made after. Its tracer is the API's no-op one, as in a process that traces nothing.
    off = _hops(untraced, session_factory(untraced), NoOpTracerProvider(), upstream)
    provider = setup_tracing("bench-tracing-cost", traced.tracing)
    on = _hops(traced, session_factory(traced, provider), provider, upstream)
    size = PAIRED_BLOCK["sampled" if ratio > 0 else "unsampled"]

    def block(one_message, first: int, flush: bool) -> float:
        started = time.process_time()
        for n in range(first, first + size):
            one_message(n)
        if flush:
            provider.force_flush()
        return (time.process_time() - started) / size

    for n in range(200):  # warm both
        on(-n - 1), off(-n - 1)
    provider.force_flush()
    differences, on_cpu, off_cpu = [], [], []
    for pair in range(max(1, iterations // size)):
        first = pair * size
        if pair % 2:
            untraced_cpu, traced_cpu = block(off, first, False), block(on, first, True)
        else:
            traced_cpu, untraced_cpu = block(on, first, True), block(off, first, False)
        differences.append(traced_cpu - untraced_cpu)
        on_cpu.append(traced_cpu)
        off_cpu.append(untraced_cpu)
    spans = provider.stats.snapshot()
    provider.shutdown()
    quartiles = statistics.quantiles(differences, n=4) if len(differences) > 1 else differences * 3
    return {
        "iterations": len(differences) * size,
        "pairs": len(differences),
        "tracing_us": statistics.median(differences) * 1e6,
        "tracing_us_quartiles": [quartiles[0] * 1e6, quartiles[2] * 1e6],
        "traced_us": statistics.median(on_cpu) * 1e6,
        "untraced_us": statistics.median(off_cpu) * 1e6,
        "spans": spans,
    }


def _bare_spans(settings: Settings, iterations: int):
    """One hop's spans with the SDK alone: attributes as the runtime makes them, made before the clock
    starts, each message with its own ids as in a real hop (an encoder that keeps repeated attributes
    must not find them all repeated)."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    from reportflow.shared.publishing import publish_span_attributes

    stage = Stage("tracing-cost", {"report.created": pass_through("report.created")}, describe=describe)
    consumer = Consumer(stage, settings, session_factory(settings), {})
    queue = consumer.queue

    def attributes(n: int) -> tuple[dict, dict]:
        event = Event("report.created", first_event(f"r-bare-{n}"))
        properties = pika.BasicProperties(**message_properties(event))
        body = encode(event)
        delivery = Delivery(_NetworklessChannel(), n + 201, settings.exchange, event.type, properties, body, False)
        processed = consumer.telemetry._attributes(delivery, event, settings.exchange, queue)
        published = publish_span_attributes(
            settings.exchange,
            "report.generated",
            message_id=uuid.uuid4().hex,
            report_id=event.report_id,
            body_size=len(body),
            server=consumer.telemetry.broker_address,
        )
        return processed, published

    made = {n: attributes(n) for n in range(-200, iterations)}
    tracer = trace.get_tracer("bench.bare")

    def one_message(n: int) -> None:
        processed, published = made[n]
        with tracer.start_as_current_span(
            f"process {settings.exchange}:report.created:{queue}", kind=SpanKind.CONSUMER, attributes=processed
        ):
            with tracer.start_as_current_span(
                f"publish {settings.exchange}:report.generated", kind=SpanKind.PRODUCER, attributes=published
            ):
                pass

    return one_message


def _measured(iterations: int, provider, one_message) -> dict:
    for n in range(200):  # warm
        one_message(-n - 1)
    started_cpu, started_wall, started_thread = time.process_time(), time.perf_counter(), time.thread_time()
    for n in range(iterations):
        one_message(n)
    if provider is not None:
        provider.force_flush()  # the export's CPU belongs to the messages it exported
    cpu = time.process_time() - started_cpu
    main_thread = time.thread_time() - started_thread
    spans = provider.stats.snapshot() if provider is not None else {}
    if provider is not None:
        provider.shutdown()
    return {
        "iterations": iterations,
        "cpu_seconds": cpu,
        "main_thread_cpu_seconds": main_thread,
        "wall_seconds": time.perf_counter() - started_wall,
        "spans": spans,
    }


if __name__ == "__main__":
    port, iterations, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    ratio = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    upstream = sys.argv[5] if len(sys.argv) > 5 else "root"
    database_url = os.environ.get("REPORTFLOW_DATABASE_URL", "postgresql://postgres@127.0.0.1/reportflow_test")
    if mode == "paired":
        print(json.dumps(paired(port, iterations, ratio, database_url, upstream)))
    else:
        print(json.dumps(main(port, iterations, mode, ratio, database_url)))
