"""The dead-letter queue, for operators: look at what failed and why, replay it, or purge it.

Listing takes messages without acknowledging them and closes the channel, which puts them back in
order. A replay sends the message, unchanged but for its failure count, to the work queue it died
in; its trace context goes with it, so the replay continues the report's trace, and the stage's
inbox makes replaying an already-applied message harmless."""
from __future__ import annotations

from dataclasses import dataclass

import pika
import pika.exceptions

from shared.topology import Topology
from shared.tracing import trace_business_operation

FAILURE_HEADERS = ("x-reportflow-attempt", "x-reportflow-first-failure", "x-reportflow-error",
                   "x-reportflow-dead-lettered-at", "x-death", "x-first-death-exchange", "x-first-death-queue",
                   "x-first-death-reason", "x-delivery-count")


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    event_type: str
    stage: str | None
    queue: str | None
    error: str
    attempts: int
    first_failure: str | None
    dead_lettered_at: str | None
    headers: dict
    body: bytes

    @classmethod
    def of(cls, properties: pika.BasicProperties, body: bytes) -> "DeadLetter":
        headers = dict(properties.headers or {})
        death = (headers.get("x-death") or [{}])[0]  # set by the broker, e.g. past a quorum delivery limit
        queue = headers.get("x-reportflow-queue") or _text(death.get("queue"))
        return cls(
            message_id=properties.message_id or "(none)",
            event_type=properties.type or headers.get("x-reportflow-routing-key") or "(unknown)",
            stage=headers.get("x-reportflow-stage"),
            queue=queue,
            error=headers.get("x-reportflow-error") or f"broker: {_text(death.get('reason')) or 'unknown'}",
            attempts=int(headers.get("x-reportflow-attempt") or death.get("count") or 1),
            first_failure=headers.get("x-reportflow-first-failure"),
            dead_lettered_at=headers.get("x-reportflow-dead-lettered-at"),
            headers=headers, body=body)


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class DeadLetterQueue:
    def __init__(self, amqp_url: str, topology: Topology):
        self._url = amqp_url
        self._topology = topology

    def list(self, limit: int = 1000) -> list[DeadLetter]:
        with _channel(self._url) as channel:
            found = []
            for _ in range(limit):
                method, properties, body = channel.basic_get(self._topology.dead_letter_queue, auto_ack=False)
                if method is None:
                    break
                found.append(DeadLetter.of(properties, body))
            return found  # unacknowledged: closing the channel puts them back

    def show(self, message_id: str) -> DeadLetter | None:
        return next((d for d in self.list() if d.message_id == message_id), None)

    @trace_business_operation("dead letters replay")
    def replay(self, message_id: str | None = None) -> list[DeadLetter]:
        """Send one dead letter (by message id), or all when message_id is None, back where it failed."""
        replayed = []
        with _channel(self._url) as channel:
            channel.confirm_delivery()
            while True:
                method, properties, body = channel.basic_get(self._topology.dead_letter_queue, auto_ack=False)
                if method is None:
                    break
                letter = DeadLetter.of(properties, body)
                if message_id is not None and letter.message_id != message_id:
                    continue  # left unacknowledged: back in the queue when the channel closes
                destination = self._destination(letter)
                if destination is None:
                    continue
                headers = {k: v for k, v in letter.headers.items()
                           if k not in FAILURE_HEADERS and not k.startswith("x-reportflow-")}
                headers["x-reportflow-replayed"] = True
                try:
                    self._republish(channel, *destination, body, properties, letter, headers)
                except pika.exceptions.UnroutableError:
                    continue  # still no queue for it: left in the dead-letter queue
                channel.basic_ack(method.delivery_tag)
                replayed.append(letter)
                if message_id is not None:
                    break
        return replayed

    def _destination(self, letter: DeadLetter) -> tuple[str, str] | None:
        """A failed message goes back to the queue that failed it; an event no queue took goes through the
        exchange again, to whatever is bound for it now. (exchange, routing key), or None: nowhere known."""
        if letter.queue:
            return "", letter.queue
        if letter.headers.get("x-reportflow-unroutable"):
            return self._topology.exchange, letter.event_type
        return None

    @staticmethod
    def _republish(channel, exchange: str, routing_key: str, body: bytes, properties, letter: DeadLetter,
                   headers: dict) -> None:
        channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(
            content_type=properties.content_type, content_encoding=properties.content_encoding,
            delivery_mode=2, message_id=properties.message_id, type=letter.event_type,
            timestamp=properties.timestamp, app_id=properties.app_id,
            correlation_id=properties.correlation_id, headers=headers), mandatory=True)

    def purge(self) -> int:
        with _channel(self._url) as channel:
            return channel.queue_purge(self._topology.dead_letter_queue).method.message_count


class _channel:
    def __init__(self, url: str):
        self._connection = pika.BlockingConnection(pika.URLParameters(url))

    def __enter__(self):
        return self._connection.channel()

    def __exit__(self, *exc_info):
        if self._connection.is_open:
            self._connection.close()
