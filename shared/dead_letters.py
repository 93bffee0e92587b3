"""The dead-letter queue, for operators: look at what failed and why, replay it, or purge it.

Listing takes messages without acknowledging them and closes the channel, which puts them back in
order. A replay sends the message, unchanged but for its failure count, to the work queue it died
in; its trace context goes with it, so the replay continues the report's trace, and the stage's
inbox makes replaying an already-applied message harmless."""

from __future__ import annotations

import builtins
from dataclasses import dataclass

import pika
import pika.exceptions

from reportflow.shared import failures
from reportflow.shared.broker import blocking_connection
from reportflow.shared.topology import Topology
from reportflow.shared.tracing import trace_business_operation


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
    def of(cls, properties: pika.BasicProperties, body: bytes) -> DeadLetter:
        headers = dict(properties.headers or {})
        death = (headers.get("x-death") or [{}])[0]  # set by the broker, e.g. past a quorum delivery limit
        queue = headers.get(failures.QUEUE) or _text(death.get("queue"))
        return cls(
            message_id=properties.message_id or "(none)",
            event_type=properties.type or headers.get(failures.ROUTING_KEY) or "(unknown)",
            stage=headers.get(failures.STAGE),
            queue=queue,
            error=headers.get(failures.ERROR) or f"broker: {_text(death.get('reason')) or 'unknown'}",
            attempts=int(headers.get(failures.FAILURES) or death.get("count") or 1),
            first_failure=headers.get(failures.FIRST_FAILURE),
            dead_lettered_at=headers.get(failures.DEAD_LETTERED_AT),
            headers=headers,
            body=body,
        )


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
    def replay(self, message_id: str | None = None) -> builtins.list[DeadLetter]:  # list, not the method above
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
                headers = {**failures.without_failures(letter.headers), failures.REPLAYED: True}
                try:
                    channel.basic_publish(
                        *destination,
                        body,
                        failures.same_message(properties, letter.event_type, headers),
                        mandatory=True,
                    )
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
        if letter.headers.get(failures.UNROUTABLE):
            return self._topology.exchange, letter.event_type
        return None

    def purge(self) -> int:
        with _channel(self._url) as channel:
            return channel.queue_purge(self._topology.dead_letter_queue).method.message_count


class _channel:
    def __init__(self, url: str):
        self._connection = blocking_connection(url)

    def __enter__(self):
        return self._connection.channel()

    def __exit__(self, *exc_info):
        if self._connection.is_open:
            self._connection.close()
