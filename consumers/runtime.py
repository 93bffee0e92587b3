"""The consumer runtime: runs any stage on RabbitMQ.

Broker connection, threads, acknowledgements, the inbox and outbox, tracing and dead letters live
here, once, so that stage handlers stay plain functions of (event, unit of work, dependencies).

Threads: pika's BlockingConnection is not thread-safe, so the main thread owns it and does nothing
but I/O (which keeps heartbeats flowing during a long PDF render); handlers run on worker threads,
and everything they need from the broker (publish, ack) is handed back with add_callback_threadsafe.

Order per message: handler + inbox record + outbox rows commit in one transaction; then the outbox
rows are published (confirms pipelined, not waited for) and the delivery is acked; as confirms arrive,
the rows are marked published. A crash at any point redelivers the message (the inbox makes it a
no-op) or leaves outbox rows unmarked (the relay publishes them again; downstream inboxes absorb the
duplicate). An emitted event no queue takes goes to the dead-letter queue itself. A retry or a dead
letter is confirmed before the message it replaces is acked.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import nullcontext
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import pika
import pika.exceptions
from opentelemetry import context, trace
from opentelemetry.instrumentation.pika import PikaInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from sqlalchemy import select, update

from consumers.confirms import PipelinedConfirms
from consumers.retries import RetryPolicy
from consumers.stage import Stage, dependency_names
from shared.config import Settings
from shared.db import UnitOfWork
from shared.events import FOLLOW_UP_EVENTS, Event, InvalidMessage, encode, message_properties, parse, validate
from shared.models import OutboxMessage, Report, utcnow
from shared.topology import Topology, declare
from shared.tracing import carrier_of_current, context_from

log = logging.getLogger("reportflow.consumer")

RECONNECT_BACKOFF_SECONDS = (1, 2, 5, 10, 30)
MARK_PUBLISHED_EVERY_SECONDS = 0.2
STOP_WAITS_FOR_CONFIRMS_SECONDS = 5


class ConnectionLost(RuntimeError):
    pass


@dataclass(frozen=True)
class Delivery:
    channel: object
    delivery_tag: int
    exchange: str
    routing_key: str
    properties: pika.BasicProperties
    body: bytes
    redelivered: bool


@dataclass(frozen=True)
class OutgoingMessage:
    outbox_id: int
    message_id: str
    event_type: str
    payload: dict
    headers: dict  # the trace context it is published under

    @classmethod
    def of(cls, row: OutboxMessage) -> "OutgoingMessage":
        return cls(row.id, row.message_id, row.event_type, row.payload, row.headers or {})


@dataclass
class Outcome:
    """What the I/O thread must do for one delivery once its handler has committed (or failed)."""

    context: context.Context
    publish: list[OutgoingMessage] = field(default_factory=list)
    dead_letter_reason: str | None = None
    retry_after: int | None = None  # seconds; the delivery goes to that delay queue
    failure: str | None = None


ATTEMPT_HEADER = "x-reportflow-attempt"          # failures so far
FIRST_FAILURE_HEADER = "x-reportflow-first-failure"


class Consumer:
    def __init__(self, stage: Stage, settings: Settings, session_factory, dependencies: dict, *,
                 tracer_provider=None, bindings: dict[str, list[str]] | None = None, concurrency: int = 1,
                 retry_policy: RetryPolicy | None = None):
        self.stage = stage
        self.settings = settings
        self.retry_policy = retry_policy or RetryPolicy.from_env()
        self.topology = Topology.from_env(settings.exchange, self.retry_policy.delays)
        self.queue = self.topology.queue(stage.name)
        self._bindings = bindings or {stage.name: stage.event_types}
        self._session_factory = session_factory
        self._tracer_provider = tracer_provider
        self._tracer = trace.get_tracer("reportflow.consumer", tracer_provider=tracer_provider)
        self._handler_kwargs = {h: _injected(h, dependencies) for h in stage.all_handlers}
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"{stage.name}-worker")
        self._app_id = f"reportflow-{stage.name}"
        broker = pika.URLParameters(settings.amqp_url)
        self._broker_address = (broker.host, broker.port)
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._pending_io: set[Future] = set()
        self._connection: pika.BlockingConnection | None = None
        self._publish_channel = None
        self._outbox_channel: PipelinedConfirms | None = None
        self.connections_opened = 0  # more than one means the broker connection was re-established
        self.messages_settled = 0
        # Outbox rows published and confirmed but not yet marked so in the database: marked in batches,
        # because a mark costs a commit. One left unmarked by a crash is republished by the relay, and the
        # consumer's inbox absorbs the duplicate.
        self._published_unmarked: list[int] = []

    # -- lifecycle ------------------------------------------------------------
    def run(self) -> None:
        """Consume until stop(); reconnect with backoff when the broker goes away."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        attempt = 0
        while not self._stopping.is_set():
            try:
                self._serve_one_connection()
                attempt = 0
            except (pika.exceptions.AMQPError, OSError) as exc:
                if self._stopping.is_set():
                    break
                delay = RECONNECT_BACKOFF_SECONDS[min(attempt, len(RECONNECT_BACKOFF_SECONDS) - 1)]
                attempt += 1
                log.warning("%s: broker connection lost (%r); reconnecting in %ss", self.stage.name, exc, delay)
                self._stopping.wait(delay)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._mark_published_batch()
        log.info("%s: stopped", self.stage.name)

    def stop(self) -> None:
        """Stop taking messages, finish the one in hand, then return from run()."""
        self._stopping.set()

    def _serve_one_connection(self) -> None:
        params = pika.URLParameters(self.settings.amqp_url)
        params.heartbeat = self.settings.heartbeat_seconds
        params.client_properties = {"connection_name": f"{self._app_id}-{os.getpid()}"}
        connection = pika.BlockingConnection(params)
        self._connection = connection
        self.connections_opened += 1
        try:
            consume_channel = connection.channel()
            self._publish_channel = self._open_publish_channel(connection)
            self._outbox_channel = PipelinedConfirms(connection, self._instrument)
            declare(consume_channel, self.topology, self._bindings)
            consume_channel.basic_qos(prefetch_count=self.settings.effective_prefetch)
            consumer_tag = consume_channel.basic_consume(self.queue, on_message_callback=self._on_message)
            log.info("%s: consuming %s (prefetch %d, %d worker threads)", self.stage.name, self.queue,
                     self.settings.effective_prefetch, self._executor._max_workers)
            self.ready.set()
            next_relay = next_mark = 0.0
            stopped_at = None
            while True:
                connection.process_data_events(time_limit=0.25)
                self._take_confirmations()
                if self._stopping.is_set():
                    if consumer_tag:
                        consume_channel.basic_cancel(consumer_tag)
                        consumer_tag = None
                        stopped_at = time.monotonic()
                    # Confirms still due are waited for a while, so a clean stop leaves no row to the relay.
                    if self._in_flight_count() == 0 and (self._outbox_channel.unconfirmed == 0 or
                                                         time.monotonic() - stopped_at > STOP_WAITS_FOR_CONFIRMS_SECONDS):
                        break
                elif time.monotonic() >= next_relay:
                    next_relay = time.monotonic() + self.settings.outbox_relay_seconds
                    self._executor.submit(self._relay_outbox)
                if self._published_unmarked and time.monotonic() >= next_mark:
                    next_mark = time.monotonic() + MARK_PUBLISHED_EVERY_SECONDS
                    self._executor.submit(self._mark_published_batch)
        finally:
            self.ready.clear()
            self._fail_pending_io()
            if connection.is_open:
                try:
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def _open_publish_channel(self, connection):
        """For retries and dead letters: each waits for its confirm, because the message is acked after."""
        channel = connection.channel()
        channel.confirm_delivery()
        self._instrument(channel)
        return channel

    def _instrument(self, channel) -> None:
        # Per channel, not global instrument(): only publishing is instrumented this way. Consuming is
        # traced below, because the process span must be able to join a report's stored trace.
        PikaInstrumentor.instrument_channel(channel, tracer_provider=self._tracer_provider,
                                            publish_hook=_publish_hook(*self._broker_address))

    def _take_confirmations(self) -> None:
        """Sort what the broker answered about outbox rows: taken rows are marked (in batches); a row no
        queue takes goes to the dead-letter queue, and is then done too; a refused row is left to the
        relay. On the I/O thread, between rounds of I/O."""
        confirmed, returned, refused = self._outbox_channel.take()
        for message in returned:
            self._dead_letter_unroutable(message)
            confirmed.append(message)
        for message in refused:
            log.warning("%s: the broker refused %s %s; the outbox relay will send it again", self.stage.name,
                        message.event_type, message.message_id)
        if confirmed:
            with self._lock:
                self._published_unmarked.extend(m.outbox_id for m in confirmed)

    # -- I/O thread -------------------------------------------------------------
    def _on_message(self, channel, method, properties, body) -> None:
        delivery = Delivery(channel, method.delivery_tag, method.exchange, method.routing_key,
                            properties, body, method.redelivered)
        with self._lock:
            self._in_flight += 1
        self._executor.submit(self._work, delivery)

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """The handler committed (or failed): publish what it emitted, or send the message to be retried
        or dead-lettered, then acknowledge it. Emitted events do not hold up the ack: they are in the
        outbox, committed, and a row whose confirm never comes is the relay's to send again."""
        token = context.attach(outcome.context)
        try:
            for message in outcome.publish:
                self._publish(message)
            if outcome.retry_after is not None:
                self._retry_later(delivery, outcome)
            elif outcome.dead_letter_reason is not None:
                self._dead_letter(delivery, outcome.dead_letter_reason)
            delivery.channel.basic_ack(delivery.delivery_tag)
        finally:
            context.detach(token)

    def _publish(self, message: OutgoingMessage) -> None:
        event = Event(message.event_type, message.payload, message.message_id)
        properties = pika.BasicProperties(**message_properties(event, app_id=self._app_id))
        if not _sampled(message.headers):
            # No publish span to make: the message carries on the trace it was emitted in, as is.
            properties.headers = {**(properties.headers or {}), **message.headers}
            with suppress_instrumentation():
                self._send(message, event, properties)
            return
        token = context.attach(context_from(message.headers))  # publish under the span that emitted it
        try:
            self._send(message, event, properties)
        finally:
            context.detach(token)

    def _send(self, message: OutgoingMessage, event: Event, properties: pika.BasicProperties) -> None:
        self._outbox_channel.publish(self.topology.exchange, event.type, encode(event), properties, message)

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        headers = self._failure_headers(delivery, reason)
        headers.update({"x-reportflow-stage": self.stage.name, "x-reportflow-queue": self.queue,
                        "x-reportflow-dead-lettered-at": utcnow().isoformat()})
        with self._tracer.start_as_current_span(f"dead-letter {self.queue}", kind=SpanKind.INTERNAL, attributes={
                "reportflow.dead_letter.reason": reason[:1000], "reportflow.attempts": headers[ATTEMPT_HEADER]}):
            self._publish_channel.basic_publish(self.topology.dead_letter_exchange, delivery.routing_key,
                                                delivery.body, self._kept_properties(delivery, headers),
                                                mandatory=True)
        log.error("%s: dead-lettered message %s (%s) after %d attempt(s): %s", self.stage.name,
                  delivery.properties.message_id, delivery.properties.type, headers[ATTEMPT_HEADER], reason)

    def _dead_letter_unroutable(self, message: OutgoingMessage) -> None:
        """An event no queue is bound for (a stage not deployed, a topology not declared) waits in the
        dead-letter queue under its own name, not its emitter's: `reportflow dlq replay` routes it again."""
        event = Event(message.event_type, message.payload, message.message_id)
        reason = f"unroutable: no queue takes {event.type} on exchange {self.topology.exchange}"
        properties = message_properties(event, app_id=self._app_id)
        properties["headers"].update({
            **message.headers, ATTEMPT_HEADER: 1, "x-reportflow-error": reason, "x-reportflow-stage": self.stage.name,
            "x-reportflow-routing-key": event.type, "x-reportflow-unroutable": True,
            "x-reportflow-dead-lettered-at": utcnow().isoformat()})
        with self._tracer.start_as_current_span(f"dead-letter {self.topology.exchange}:{event.type}",
                                                context=context_from(message.headers), kind=SpanKind.INTERNAL,
                                                attributes={"reportflow.dead_letter.reason": reason}), \
                suppress_instrumentation():
            self._publish_channel.basic_publish(self.topology.dead_letter_exchange, event.type, encode(event),
                                                pika.BasicProperties(**properties), mandatory=True)
        log.error("%s: dead-lettered %s %s: %s", self.stage.name, event.type, event.message_id, reason)

    def _retry_later(self, delivery: Delivery, outcome: Outcome) -> None:
        headers = self._failure_headers(delivery, outcome.failure or "")
        queue = self.topology.retry_queue(self.stage.name, outcome.retry_after)
        with self._tracer.start_as_current_span(f"retry {self.queue}", kind=SpanKind.INTERNAL, attributes={
                "reportflow.retry.delay_seconds": outcome.retry_after, "reportflow.attempts": headers[ATTEMPT_HEADER],
                "reportflow.retry.reason": (outcome.failure or "")[:1000]}):
            self._publish_channel.basic_publish("", queue, delivery.body, self._kept_properties(delivery, headers),
                                                mandatory=True)
        log.warning("%s: message %s failed (attempt %d), retrying in %ss: %s", self.stage.name,
                    delivery.properties.message_id, headers[ATTEMPT_HEADER], outcome.retry_after, outcome.failure)

    def _settle_failed(self, delivery: Delivery, error: BaseException) -> None:
        """Sending a failed message to its retry queue or the dead-letter queue failed (the topology is not
        what this process declared). Left unacknowledged, the message would sit on this channel for good;
        it goes to the dead-letter queue, or, failing that, the queue's own dead-letter route. Runs on
        the I/O thread."""
        reason = f"could not settle: {type(error).__name__}: {error}"
        try:
            self._dead_letter(delivery, reason)
            delivery.channel.basic_ack(delivery.delivery_tag)
        except pika.exceptions.AMQPError:
            if delivery.channel.is_open:
                delivery.channel.basic_nack(delivery.delivery_tag, requeue=False)  # the queue's own DLX
            else:
                log.error("%s: message %s is left to the broker to redeliver", self.stage.name,
                          delivery.properties.message_id)

    def _failure_headers(self, delivery: Delivery, reason: str) -> dict:
        headers = dict(delivery.properties.headers or {})
        headers[ATTEMPT_HEADER] = _failures(delivery) + 1
        headers.setdefault(FIRST_FAILURE_HEADER, utcnow().isoformat())
        headers["x-reportflow-error"] = reason[:1000]
        headers["x-reportflow-routing-key"] = delivery.properties.type or delivery.routing_key
        return headers

    @staticmethod
    def _kept_properties(delivery: Delivery, headers: dict) -> pika.BasicProperties:
        """The message as it came, with new headers; its trace context goes along, so a retry or a
        replayed dead letter continues the report's trace."""
        props = delivery.properties
        return pika.BasicProperties(
            content_type=props.content_type, content_encoding=props.content_encoding, delivery_mode=2,
            message_id=props.message_id, type=props.type or delivery.routing_key, timestamp=props.timestamp,
            app_id=props.app_id, correlation_id=props.correlation_id, headers=headers)

    def _call_on_io(self, fn) -> Future:
        """Run fn on the I/O thread; the returned future fails if the connection is lost first."""
        future: Future = Future()

        def run() -> None:
            with self._lock:
                self._pending_io.discard(future)
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting worker
                    future.set_exception(exc)

        with self._lock:
            connection = self._connection
            if connection is None or not connection.is_open:
                raise ConnectionLost("no broker connection")
            self._pending_io.add(future)
        connection.add_callback_threadsafe(run)
        return future

    def _fail_pending_io(self) -> None:
        with self._lock:
            pending, self._pending_io = self._pending_io, set()
            self._connection = None
        for future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(ConnectionLost("broker connection closed before the message was settled"))

    def _in_flight_count(self) -> int:
        with self._lock:
            return self._in_flight

    # -- worker threads -----------------------------------------------------------
    def _work(self, delivery: Delivery) -> None:
        """Handle one delivery, then hand its settling to the I/O thread and move on to the next."""
        try:
            if self._stopping.is_set():
                self._done(delivery)  # not started: left unacked, so the broker gives it to another consumer
                return
            outcome = self._process(delivery)
            future = self._call_on_io(lambda: self._settle(delivery, outcome))
        except ConnectionLost as exc:
            log.warning("%s: %s; message %s will be redelivered", self.stage.name, exc, delivery.properties.message_id)
            self._done(delivery)
            return
        except Exception:  # noqa: BLE001 - the worker must survive anything
            log.exception("%s: message %s could not be handled", self.stage.name, delivery.properties.message_id)
            self._done(delivery)
            return
        future.add_done_callback(lambda f: self._settled(delivery, f))

    def _settled(self, delivery: Delivery, future: Future) -> None:
        """Runs where the settle finished: on the I/O thread, or where a lost connection failed it."""
        try:
            error = future.exception()
            if error is None:
                with self._lock:
                    self.messages_settled += 1
            elif isinstance(error, ConnectionLost):
                log.warning("%s: %s; message %s will be redelivered", self.stage.name, error,
                            delivery.properties.message_id)
            else:
                log.error("%s: could not settle message %s: %r", self.stage.name, delivery.properties.message_id, error)
                self._settle_failed(delivery, error)
        finally:
            self._done(delivery)

    def _done(self, delivery: Delivery) -> None:
        with self._lock:
            self._in_flight -= 1

    def _process(self, delivery: Delivery) -> Outcome:
        """Handle one delivery; whatever happens, say what is to become of it."""
        props = delivery.properties
        event_type = props.type or delivery.routing_key
        message = parse(event_type, props.message_id, props.content_type, delivery.body,
                        self.settings.max_message_bytes)
        try:
            parent, links = self._processing_parent(props, message)
        except Exception:  # noqa: BLE001 - the database may be away; the handler's own try will tell
            parent, links = context_from(props.headers), []
        exchange = delivery.exchange or self.topology.exchange  # retries come back through the default exchange
        with self._tracer.start_as_current_span(
                f"process {exchange}:{event_type}:{self.queue}", context=parent,
                kind=SpanKind.CONSUMER, links=links, attributes=self._span_attributes(delivery, message, exchange),
                record_exception=False, set_status_on_exception=False) as span, _instrumented_if(span.is_recording()):
            try:
                if isinstance(message, Event):
                    with self._child_span("validate", {"event.type": event_type}):
                        message = validate(message)
                return self._handle(message, span)
            except Exception as exc:  # noqa: BLE001 - any handler failure ends in a stated outcome
                return self._failed(delivery, message, span, exc)

    def _child_span(self, name: str, attributes: dict):
        """A span under the current one, or nothing when that one is not sampled: an unsampled span still
        costs the SDK's bookkeeping, and nobody will see it."""
        if trace.get_current_span().is_recording():
            return self._tracer.start_as_current_span(name, attributes=attributes)
        return nullcontext()

    def _failed(self, delivery: Delivery, message, span, exc: Exception) -> Outcome:
        reason = f"{type(exc).__name__}: {exc}"
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, reason))
        span.set_attribute("error.type", type(exc).__qualname__)
        failures = _failures(delivery) + 1
        delay = self.retry_policy.delay_after(failures) if self.retry_policy.is_transient(exc) else None
        if delay is not None:
            log.warning("%s: handling %s %s failed (%s)", self.stage.name, message.type, message.message_id, reason)
            return Outcome(context.get_current(), retry_after=delay, failure=reason)
        log.exception("%s: handling %s %s failed for good", self.stage.name, message.type, message.message_id)
        return Outcome(context.get_current(), dead_letter_reason=reason)

    def _handle(self, message: Event | InvalidMessage, span) -> Outcome:
        carrier = carrier_of_current()  # the process span's: what the handler stores, and its events carry
        if isinstance(message, InvalidMessage):
            span.set_attribute("reportflow.invalid_reasons", message.reasons[:20])
            handler = self.stage.on_invalid.get(message.type)
            if handler is None:
                span.set_status(Status(StatusCode.ERROR, "unreadable message"))
                span.set_attribute("error.type", "InvalidMessage")
                return Outcome(context.get_current(), dead_letter_reason="; ".join(message.reasons))
        else:
            handler = self.stage.handlers.get(message.type)
            if handler is None:
                return Outcome(context.get_current(),
                               dead_letter_reason=f"stage {self.stage.name} has no handler for {message.type}")
            message = replace(message, trace_context=carrier)

        with UnitOfWork(self._session_factory, self.stage.name) as uow:
            if not uow.claim(message.message_id, message.type):
                span.set_attribute("reportflow.duplicate", True)
                log.info("%s: %s %s was processed before; acknowledged without effect",
                         self.stage.name, message.type, message.message_id)
                return Outcome(context.get_current())
            handler(message, uow, **self._handler_kwargs[handler])
            if uow.refusal:
                span.set_attribute("reportflow.refused", uow.refusal)
                span.add_event("refused", {"reason": uow.refusal})
                log.warning("%s: refused %s %s: %s", self.stage.name, message.type, message.message_id,
                            uow.refusal)
            return Outcome(context.get_current(), publish=[
                OutgoingMessage(outbox_id, e.message_id, e.type, e.payload, carrier) for outbox_id, e in uow.commit(carrier)])

    def _processing_parent(self, props, message) -> tuple[context.Context, list[Link]]:
        """The message's own context; or, for an upstream message about a report that lives in another
        trace, the report's trace with a link to the message's ("continue", the default), or the
        message's trace with a link to the report's ("link", for those who sample by trace)."""
        incoming = context_from(props.headers)
        incoming_span = trace.get_current_span(incoming).get_span_context()
        if message.type not in FOLLOW_UP_EVENTS or not message.report_id:
            return incoming, []
        with suppress_instrumentation(), self._session_factory() as session:
            stored = session.scalar(select(Report.trace_context).where(Report.id == message.report_id))
        report_span = trace.get_current_span(context_from(stored)).get_span_context()
        if not report_span.is_valid or (incoming_span.is_valid and incoming_span.trace_id == report_span.trace_id):
            return incoming, []
        if self.settings.tracing.late_messages == "link" and incoming_span.is_valid:
            return incoming, [Link(report_span, {"reportflow.link.reason": "the report's trace"})]
        links = [Link(incoming_span, {"reportflow.link.reason": "message arrived in this trace"})] \
            if incoming_span.is_valid else []
        return context_from(stored), links

    def _span_attributes(self, delivery: Delivery, message, exchange: str) -> dict:
        host, port = self._broker_address
        attributes = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": f"{exchange}:{message.type}:{self.queue}",
            "messaging.consumer.group.name": self.queue,
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
        attributes.update(_event_attributes(message, self.settings.tracing.record_emails))
        if delivery.redelivered:
            attributes["reportflow.redelivered"] = True
        if _failures(delivery):
            attributes["reportflow.attempt"] = _failures(delivery) + 1
        return attributes

    def _mark_published_batch(self) -> None:
        with self._lock:
            batch, self._published_unmarked = self._published_unmarked, []
        try:
            self._mark_published(batch)
        except Exception:  # noqa: BLE001 - unmarked rows are only republished by the relay, harmlessly
            log.warning("%s: could not mark %d outbox rows published; the relay will resend them",
                        self.stage.name, len(batch), exc_info=True)

    def _mark_published(self, outbox_ids: list[int]) -> None:
        if not outbox_ids:
            return
        with suppress_instrumentation(), self._session_factory() as session, session.begin():
            session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(outbox_ids))
                            .values(published_at=utcnow()))

    def _relay_outbox(self) -> None:
        """Publish what a crash left in the outbox. Runs at start and every outbox_relay_seconds; rows
        younger than that may still be on their way out through the normal path, so they wait a round."""
        try:
            cutoff = time.time() - self.settings.outbox_relay_seconds
            with suppress_instrumentation(), self._session_factory() as session:
                rows = session.scalars(select(OutboxMessage).where(
                    OutboxMessage.source == self.stage.name, OutboxMessage.published_at.is_(None))
                    .order_by(OutboxMessage.id).limit(500)).all()
                stale = [OutgoingMessage.of(r) for r in rows if _timestamp(r.created_at) < cutoff]
            if not stale:
                return
            log.warning("%s: relaying %d unpublished outbox messages", self.stage.name, len(stale))
            self._call_on_io(lambda: [self._publish(m) for m in stale]).result()  # marked as their confirms come
        except Exception:  # noqa: BLE001 - the next round tries again
            log.exception("%s: outbox relay failed; will retry", self.stage.name)


def _instrumented_if(sampled: bool):
    """Library instrumentation (SQL statements, publishes) only inside a sampled trace. Unsampled, it would
    make spans nobody exports, at a cost on every statement; the trace context still travels, because
    the outbox stores it and _publish injects it."""
    return nullcontext() if sampled else suppress_instrumentation()


def _sampled(stored_headers: dict) -> bool:
    """Whether the context stored with an outbox row is sampled. It is asked for every message published,
    so the W3C flags (bit 0) are read directly; another format (OTEL_PROPAGATORS) takes full extraction."""
    traceparent = (stored_headers or {}).get("traceparent")
    if traceparent is None:
        return trace.get_current_span(context_from(stored_headers)).get_span_context().trace_flags.sampled
    try:
        return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)
    except (IndexError, ValueError):
        return False


def _event_attributes(message, record_emails: bool) -> dict:
    """What operators filter on, read from the payload: template, stage, decision, and who acted."""
    payload = (message.payload if isinstance(message.payload, dict) else None) or {}
    attributes = {}
    if isinstance(payload.get("template"), str):
        attributes["report.template"] = payload["template"]
    stage = payload.get("stage")
    stage = stage.get("name") if isinstance(stage, dict) else stage
    if isinstance(stage, str):
        attributes["approval.stage"] = stage
    if payload.get("decision") in ("approve", "reject"):
        attributes["approval.decision"] = payload["decision"]
    role, person = next(((r, payload[k]) for k, r in (("approver", "approver"), ("submitter", "submitter"))
                         if isinstance(payload.get(k), dict)), (None, None))
    if person:
        attributes["enduser.role"] = person.get("role") if isinstance(person.get("role"), str) else role
        if isinstance(person.get("id"), str):
            attributes["enduser.id"] = person["id"]
        if record_emails and isinstance(person.get("email"), str):
            attributes["user.email"] = person["email"]
    return attributes


def _failures(delivery: Delivery) -> int:
    value = (delivery.properties.headers or {}).get(ATTEMPT_HEADER, 0)
    return value if isinstance(value, int) else 0


def _timestamp(moment: datetime) -> float:
    # SQLite hands back naive datetimes; they were written in UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _injected(handler, dependencies: dict) -> dict:
    """The dependencies a handler names after (message, uow), looked up by parameter name."""
    names = dependency_names(handler)
    missing = [n for n in names if n not in dependencies]
    if missing:
        raise TypeError(f"{handler.__qualname__} needs {missing}, which the bootstrap does not provide")
    return {n: dependencies[n] for n in names}


def _publish_hook(host: str, port: int):
    """Brings the pika instrumentation's publish span to the current messaging conventions: its name,
    operation, destination, server and conversation. (Its older attributes stay; these go beside them.)"""
    def hook(span, body, properties) -> None:
        _name_publish_span(span, body, properties)
        span.set_attribute("server.address", host)
        span.set_attribute("server.port", port)
    return hook


def _name_publish_span(span, body, properties) -> None:
    exchange = getattr(span, "name", "").removesuffix(" send")
    routing_key = properties.type or ""
    destination = f"{exchange}:{routing_key}" if exchange and routing_key else (exchange or routing_key)
    span.update_name(f"publish {destination}")
    span.set_attribute("messaging.operation.type", "send")
    span.set_attribute("messaging.operation.name", "publish")
    span.set_attribute("messaging.destination.name", destination)
    span.set_attribute("messaging.destination.temporary", False)
    span.set_attribute("messaging.temp_destination", False)
    span.set_attribute("messaging.rabbitmq.destination.routing_key", routing_key)
    span.set_attribute("messaging.message.body.size", len(body))
    if properties.correlation_id:
        span.set_attribute("messaging.message.conversation_id", properties.correlation_id)
        span.set_attribute("report.id", properties.correlation_id)
