"""Settling a delivery, on the connection's I/O thread: publish what its handler emitted, or send it to a
delay queue or the dead-letter queue, then acknowledge it.

Emitted events do not hold up the ack: they are committed in the outbox, and their confirms are sorted
as they arrive (taken rows are marked published, a row no queue takes is dead-lettered itself, a refused
one is left to the relay). A retry or a dead letter replaces the delivery, so it is confirmed before
the delivery is acknowledged."""

from __future__ import annotations

import logging
from typing import Any

import pika
import pika.exceptions
from opentelemetry import context
from opentelemetry.instrumentation.utils import suppress_instrumentation

from reportflow.consumers.confirms import PipelinedConfirms
from reportflow.consumers.runtime.connection import ConnectionLost
from reportflow.consumers.runtime.messages import Delivery, Outcome, OutgoingMessage
from reportflow.consumers.runtime.telemetry import Telemetry
from reportflow.consumers.runtime.trust import keep_publisher
from reportflow.shared import failures
from reportflow.shared.events import Event, encode, message_properties
from reportflow.shared.topology import Topology
from reportflow.shared.trace_context import context_from

log = logging.getLogger("reportflow.consumer")


class Settler:
    def __init__(self, stage_name: str, topology: Topology, telemetry: Telemetry):
        self.stage_name = stage_name
        self.topology = topology
        self.queue = topology.queue(stage_name)
        self.app_id = f"reportflow-{stage_name}"
        self._telemetry = telemetry
        self._replacing: Any = None  # pika's channel for retries and dead letters: each waits for its confirm
        self._outbox: PipelinedConfirms | None = None  # emitted events: confirms pipelined

    @property
    def outbox(self) -> PipelinedConfirms:
        if self._outbox is None:
            raise RuntimeError("the settler has no channels yet: open_channels() or attach() first")
        return self._outbox

    def open_channels(self, connection) -> None:
        replacing = connection.channel()
        replacing.confirm_delivery()
        self.attach(replacing, PipelinedConfirms(connection))

    def attach(self, replacing_channel, outbox: PipelinedConfirms) -> None:
        """The channels to settle on: a confirming channel for retries and dead letters, pipelined confirms
        for emitted events."""
        self._telemetry.instrument(replacing_channel)
        self._replacing, self._outbox = replacing_channel, outbox

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        token = context.attach(outcome.context)
        try:
            for message in outcome.publish:
                self.publish(message)
            if not delivery.channel.is_open:
                # Its channel went with a broker node: the broker gives the delivery again, and the inbox
                # absorbs what was committed. A retry or a dead letter sent now, on the new connection,
                # would be a second copy of it.
                raise ConnectionLost("the channel it came on is closed")
            if outcome.retry_after is not None:
                self._retry_later(delivery, outcome)
            elif outcome.dead_letter_reason is not None:
                self._dead_letter(delivery, outcome.dead_letter_reason)
            _acknowledge(delivery)
        finally:
            context.detach(token)

    def publish(self, message: OutgoingMessage) -> None:
        event = Event(message.event_type, message.payload, message.message_id)
        properties = pika.BasicProperties(**message_properties(event, app_id=self.app_id))
        body = encode(event)
        with self._telemetry.publishing(message.headers, self.topology.exchange, properties, len(body)) as carried:
            properties.headers = {**(properties.headers or {}), **carried}
            self.outbox.publish(self.topology.exchange, event.type, body, properties, message)

    def take_confirmations(self) -> list[int]:
        """The outbox ids the broker has taken since the last call. A row no queue takes goes to the
        dead-letter queue, and is then done too; a refused row is left to the relay."""
        confirmed, returned, refused = self.outbox.take()
        for message in returned:
            self._dead_letter_unroutable(message)
            confirmed.append(message)
        for message in refused:
            log.warning(
                "%s: the broker refused %s %s; the outbox relay will send it again",
                self.stage_name,
                message.event_type,
                message.message_id,
            )
        return [m.outbox_id for m in confirmed]

    def settle_failed(self, delivery: Delivery, error: BaseException) -> None:
        """Sending a failed message to its retry queue or the dead-letter queue failed (the topology is not
        what this process declared). Left unacknowledged, the message would sit on this channel for good;
        it goes to the dead-letter queue, or, failing that, the queue's own dead-letter route."""
        reason = f"could not settle: {type(error).__name__}: {error}"
        try:
            self._dead_letter(delivery, reason)
            delivery.channel.basic_ack(delivery.delivery_tag)
        except pika.exceptions.AMQPError:
            if delivery.channel.is_open:
                delivery.channel.basic_nack(delivery.delivery_tag, requeue=False)  # the queue's own DLX
            else:
                log.error(
                    "%s: message %s is left to the broker to redeliver", self.stage_name, delivery.properties.message_id
                )

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        headers = keep_publisher(failures.after_failure(delivery.properties, delivery.routing_key, reason), delivery)
        headers.update(
            {failures.STAGE: self.stage_name, failures.QUEUE: self.queue, failures.DEAD_LETTERED_AT: failures.now()}
        )
        with self._telemetry.dead_letter(self.queue, reason, headers):
            self._replacing.basic_publish(
                self.topology.dead_letter_exchange,
                delivery.routing_key,
                delivery.body,
                failures.same_message(delivery.properties, delivery.routing_key, headers),
                mandatory=True,
            )
        log.error(
            "%s: dead-lettered message %s (%s) after %d attempt(s): %s",
            self.stage_name,
            delivery.properties.message_id,
            delivery.properties.type,
            headers[failures.FAILURES],
            reason,
        )

    def _dead_letter_unroutable(self, message: OutgoingMessage) -> None:
        """An event no queue is bound for (a stage not deployed, a topology not declared) waits in the
        dead-letter queue under its own name, not its emitter's: `reportflow dlq replay` routes it again."""
        event = Event(message.event_type, message.payload, message.message_id)
        reason = f"unroutable: no queue takes {event.type} on exchange {self.topology.exchange}"
        properties = message_properties(event, app_id=self.app_id)
        properties["headers"].update(
            {
                **message.headers,
                failures.FAILURES: 1,
                failures.ERROR: reason,
                failures.STAGE: self.stage_name,
                failures.ROUTING_KEY: event.type,
                failures.UNROUTABLE: True,
                failures.DEAD_LETTERED_AT: failures.now(),
            }
        )
        with (
            self._telemetry.dead_letter(
                f"{self.topology.exchange}:{event.type}",
                reason,
                properties["headers"],
                parent=context_from(message.headers),
            ),
            suppress_instrumentation(),
        ):
            self._replacing.basic_publish(
                self.topology.dead_letter_exchange,
                event.type,
                encode(event),
                pika.BasicProperties(**properties),
                mandatory=True,
            )
        log.error("%s: dead-lettered %s %s: %s", self.stage_name, event.type, event.message_id, reason)

    def _retry_later(self, delivery: Delivery, outcome: Outcome) -> None:
        assert outcome.retry_after is not None  # settle() sends only retries here
        reason = outcome.failure or ""
        headers = keep_publisher(failures.after_failure(delivery.properties, delivery.routing_key, reason), delivery)
        queue = self.topology.retry_queue(self.stage_name, outcome.retry_after)
        with self._telemetry.retry(self.queue, outcome.retry_after, headers, reason):
            self._replacing.basic_publish(
                "",
                queue,
                delivery.body,
                failures.same_message(delivery.properties, delivery.routing_key, headers),
                mandatory=True,
            )
        log.warning(
            "%s: message %s failed (attempt %d), retrying in %ss: %s",
            self.stage_name,
            delivery.properties.message_id,
            headers[failures.FAILURES],
            outcome.retry_after,
            reason,
        )


def _acknowledge(delivery: Delivery) -> None:
    """The ack joins the connection's output behind the publishes before it, and goes out in the I/O loop's
    next round with them: pika's BlockingChannel.basic_ack flushes (a poll and a send) for each one."""
    channel = getattr(delivery.channel, "_impl", delivery.channel)
    channel.basic_ack(delivery.delivery_tag)
