"""The consumer: runs one stage on RabbitMQ, a thin front over the runtime's parts.

    connection  the broker connection, reopened with backoff; its thread does the I/O
    processing  a delivery -> an Outcome: handler, inbox and outbox in one transaction, in its span
    batching    under a backlog, the waiting deliveries in one transaction, each with its own span and outcome;
                how large a stage's batches are, and whether worker threads or the I/O thread take them
    dispatch    handing deliveries to the worker threads, or handling them on the I/O thread between rounds
    settling    an Outcome -> publish, retry or dead-letter, then ack, on the I/O thread
    outbox      marking confirmed rows, relaying what a crash left, on a thread of its own
    timers      firing the stage's due reminders and deadlines, on a thread of its own
    background  the thread the outbox relay and the timers each loop on
    telemetry   every span the runtime makes
    metrics     what Prometheus scrapes: outcomes, durations, time in queue, in flight

Order per message: handler + inbox record + outbox rows commit in one transaction; then the outbox rows
are published (confirms pipelined, not waited for) and the delivery is acked; as confirms arrive, the
rows are marked published. A crash at any point redelivers the message (the inbox makes it a no-op) or
leaves outbox rows unmarked (the relay publishes them again; downstream inboxes absorb the duplicate)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from functools import partial

import pika
import pika.exceptions

from reportflow.consumers.retries import RetryPolicy
from reportflow.consumers.runtime.batching import Batches, BatchPlan
from reportflow.consumers.runtime.connection import BrokerConnection, ConnectionLost
from reportflow.consumers.runtime.dispatch import dispatch_for
from reportflow.consumers.runtime.messages import Delivery
from reportflow.consumers.runtime.metrics import RuntimeMetrics
from reportflow.consumers.runtime.outbox import OutboxRelay
from reportflow.consumers.runtime.processing import Processor
from reportflow.consumers.runtime.settling import Settler
from reportflow.consumers.runtime.telemetry import Telemetry
from reportflow.consumers.runtime.timers import TimerPoller
from reportflow.consumers.runtime.trust import PublisherTrust
from reportflow.consumers.stage import Stage
from reportflow.shared.broker import connected_address, first_address
from reportflow.shared.config import Settings
from reportflow.shared.topology import Topology, declare_as_permitted

log = logging.getLogger("reportflow.consumer")

STOP_WAITS_FOR_CONFIRMS_SECONDS = 5
# The I/O loop turns every quarter second, and a reconnect waits at most 30 s between tries: a loop
# silent for longer than this is stuck.
LIVE_WITHIN_SECONDS = 90


class Consumer:
    def __init__(
        self,
        stage: Stage,
        settings: Settings,
        session_factory,
        dependencies: dict,
        *,
        tracer_provider=None,
        bindings: dict[str, list[str]] | None = None,
        concurrency: int = 1,
        retry_policy: RetryPolicy | None = None,
    ):
        self.stage = stage
        self.settings = settings
        self.retry_policy = retry_policy or RetryPolicy(settings.retry_delays)
        self.topology = Topology.of(settings, self.retry_policy.delays)
        self.queue = self.topology.queue(stage.name)
        self._bindings = bindings or {stage.name: stage.event_types}
        self.telemetry = Telemetry(
            stage, settings.tracing, session_factory, first_address(settings.amqp_url), tracer_provider
        )
        self.processor = Processor(
            stage,
            session_factory,
            dependencies,
            self.telemetry,
            self.retry_policy,
            queue=self.queue,
            exchange=self.topology.exchange,
            max_message_bytes=settings.max_message_bytes,
            trust=PublisherTrust(settings.trust.trusted_publishers()),
        )
        on_postgresql = session_factory.kw["bind"].dialect.name == "postgresql"
        plan = BatchPlan.of(stage, settings, on_postgresql, concurrency)
        self.batches = Batches(self.processor, session_factory, self.telemetry, plan.size > 1)
        self.batch_size, self.worker_threads = plan.size, plan.worker_threads
        # Room in the prefetch window for a batch to form under a backlog.
        self.prefetch = settings.prefetch or max(settings.effective_prefetch, self.batch_size)
        self._waiting: deque[Delivery] = deque()
        self.settler = Settler(stage.name, self.topology, self.telemetry)
        self.broker = BrokerConnection(
            settings.amqp_url, settings.heartbeat_seconds, f"reportflow-{stage.name}-{os.getpid()}"
        )
        self.metrics = RuntimeMetrics(stage.name)
        self.outbox = OutboxRelay(
            stage.name, session_factory, settings.outbox_relay_seconds, self._publish_on_io, self.metrics.outbox_waiting
        )
        self.timers = (
            TimerPoller(
                stage.name,
                session_factory,
                self.processor,
                self.telemetry,
                self._publish_on_io,
                poll_seconds=settings.timer_poll_seconds,
                lease_seconds=settings.timer_lease_seconds,
                retry_delays=self.retry_policy.delays,
                counted=self.metrics.timers,
            )
            if stage.timers
            else None
        )
        self._dispatch = dispatch_for(plan, self._work_waiting, stage.name)
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self.messages_settled = 0
        self._session_factory = session_factory
        self._last_tick = time.monotonic()

    @property
    def connections_opened(self) -> int:
        return self.broker.opened

    def alive(self) -> bool:
        return time.monotonic() - self._last_tick < LIVE_WITHIN_SECONDS

    def not_ready(self) -> str | None:
        """None when this consumer can work: consuming on a broker node, and its database answers."""
        if not self.ready.is_set():
            return "not connected to a broker node"
        from opentelemetry.instrumentation.utils import suppress_instrumentation
        from sqlalchemy import text

        with suppress_instrumentation(), self._session_factory() as session:
            session.execute(text("SELECT 1"))
        return None

    def snapshot(self) -> dict:
        """What this consumer is doing, for `reportflow status`."""
        return {
            "connected": self.ready.is_set(),
            "messages_settled": self.messages_settled,
            "connections_opened": self.connections_opened,
            "in_flight": self._in_flight_count(),
        }

    def run(self) -> None:
        """Consume until stop(); reconnect with backoff when the broker goes away."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        self.outbox.start()
        if self.timers:
            self.timers.start()
        self.broker.run(self._serve, self._stopping, tick=self._tick)
        if self.timers:
            self.timers.stop()
        self._dispatch.shutdown()
        self.outbox.stop()
        log.info("%s: stopped", self.stage.name)

    def stop(self) -> None:
        """Stop taking messages, finish the one in hand, then return from run()."""
        self._stopping.set()

    def _serve(self, connection: pika.BlockingConnection) -> None:
        """One connection's life, on the I/O thread: declare, consume, do I/O, sort confirms; on stop, wait
        for the messages in hand and, a while, for confirms still due (so a clean stop leaves the relay nothing)."""
        self.telemetry.broker_address = connected_address(connection)
        consume_channel = declare_as_permitted(
            connection, self.topology, self._bindings, {self.stage.name: self.stage.event_types}
        )
        self.settler.open_channels(connection)
        consume_channel.basic_qos(prefetch_count=self.prefetch)
        consumer_tag = consume_channel.basic_consume(self.queue, on_message_callback=self._on_message)
        log.info(
            "%s: consuming %s (prefetch %d, %s, batches of up to %d)",
            self.stage.name,
            self.queue,
            self.prefetch,
            self._dispatch.described,
            self.batch_size,
        )
        self.ready.set()
        stopped_at = time.monotonic()  # from when the stop began: set again then
        try:
            while True:
                connection.process_data_events(time_limit=self._dispatch.round_seconds(bool(self._waiting)))
                self._dispatch.after_round()
                self._tick()
                self.outbox.confirmed(self.settler.take_confirmations())
                if self._stopping.is_set():
                    if consumer_tag:
                        consume_channel.basic_cancel(consumer_tag)
                        consumer_tag, stopped_at = None, time.monotonic()
                    if self._in_flight_count() == 0 and (
                        self.settler.outbox.unconfirmed == 0
                        or time.monotonic() - stopped_at > STOP_WAITS_FOR_CONFIRMS_SECONDS
                    ):
                        break
        finally:
            self.ready.clear()

    def _tick(self) -> None:
        self._last_tick = time.monotonic()

    def _publish_on_io(self, messages) -> Future:
        def publish_all() -> None:
            for message in messages:
                self.settler.publish(message)

        return self.broker.call_on_io(publish_all)

    # -- from the I/O thread to a worker and back ----------------------------------------------
    def _on_message(self, channel, method, properties, body) -> None:
        delivery = Delivery(
            channel, method.delivery_tag, method.exchange, method.routing_key, properties, body, method.redelivered
        )
        with self._lock:
            self._in_flight += 1
        self.metrics.in_flight.inc()
        self._waiting.append(delivery)
        self._dispatch.delivered()

    def _work_waiting(self) -> None:
        """Take what is waiting (one delivery when idle, up to a batch under a backlog), process it, and settle
        each on the I/O thread. Where dispatch runs it, it finds nothing when others took it, and returns."""
        deliveries: list[Delivery] = []
        while len(deliveries) < self.batch_size:
            try:
                deliveries.append(self._waiting.popleft())
            except IndexError:
                break
        if not deliveries:
            return
        if self._stopping.is_set():
            for _ in deliveries:
                self._done()  # not started: left unacked, so the broker gives them to another consumer
            return
        try:
            started = time.perf_counter()
            outcomes = self.batches.process(deliveries)
            each = (time.perf_counter() - started) / len(deliveries)
        except Exception:
            log.exception("%s: %d messages could not be handled", self.stage.name, len(deliveries))
            for _ in deliveries:
                self._done()
            return
        for delivery, outcome in zip(deliveries, outcomes, strict=True):
            self.metrics.processed(delivery, outcome, each)
            try:
                future = self.broker.call_on_io(partial(self.settler.settle, delivery, outcome))
            except ConnectionLost as exc:
                log.warning(
                    "%s: %s; message %s will be redelivered", self.stage.name, exc, delivery.properties.message_id
                )
                self._done()
                continue
            future.add_done_callback(partial(self._settled, delivery))

    def _settled(self, delivery: Delivery, future: Future) -> None:
        """Runs where the settle finished: on the I/O thread, or where a lost connection failed it."""
        try:
            error = future.exception()
            if error is None:
                with self._lock:
                    self.messages_settled += 1
            elif (
                isinstance(error, (ConnectionLost, pika.exceptions.AMQPConnectionError)) or not delivery.channel.is_open
            ):
                # The delivery's channel is gone (a node stopped while it settled): it comes again.
                log.warning(
                    "%s: %s; message %s will be redelivered", self.stage.name, error, delivery.properties.message_id
                )
            else:
                log.error("%s: could not settle message %s: %r", self.stage.name, delivery.properties.message_id, error)
                self.settler.settle_failed(delivery, error)
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1
        self.metrics.in_flight.dec()

    def _in_flight_count(self) -> int:
        with self._lock:
            return self._in_flight
