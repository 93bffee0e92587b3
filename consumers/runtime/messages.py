"""What travels between the runtime's parts: a delivery as it came, what became of it, what it emitted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pika
from opentelemetry import context

from reportflow.shared.models import OutboxMessage


@dataclass(frozen=True)
class Delivery:
    channel: Any  # the pika channel it came on
    delivery_tag: int
    exchange: str
    routing_key: str
    properties: pika.BasicProperties
    body: bytes
    redelivered: bool


@dataclass(frozen=True)
class OutgoingMessage:
    """An event a handler emitted, committed to the outbox, to be published under the context it was emitted in."""

    outbox_id: int
    message_id: str
    event_type: str
    payload: dict
    headers: dict  # the trace context it is published under

    @classmethod
    def of(cls, row: OutboxMessage) -> OutgoingMessage:
        return cls(row.id, row.message_id, row.event_type, row.payload, row.headers or {})


@dataclass
class Outcome:
    """What is to become of one delivery once its handler has committed (or failed): publish what it emitted,
    or send it to a delay queue, or to the dead-letter queue; then acknowledge it."""

    context: context.Context
    publish: list[OutgoingMessage] = field(default_factory=list)
    dead_letter_reason: str | None = None
    retry_after: int | None = None  # seconds; the delivery goes to that delay queue
    failure: str | None = None  # why the handler failed, when it did
    verdict: str = "handled"  # or "duplicate" (seen before), "refused" (recorded, not applied)
