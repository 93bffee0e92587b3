"""What a failed message carries on its way to a retry queue or the dead-letter queue: the headers that
say why and how often, and the message's own properties, kept so its trace and identity go along.
The consumer runtime writes them; `reportflow dlq` reads them."""

from __future__ import annotations

from datetime import UTC, datetime

import pika

# Failures so far. (Named "attempt" on the wire since the first release; dead letters already stored use it.)
FAILURES = "x-reportflow-attempt"
FIRST_FAILURE = "x-reportflow-first-failure"
ERROR = "x-reportflow-error"
ROUTING_KEY = "x-reportflow-routing-key"
STAGE = "x-reportflow-stage"
QUEUE = "x-reportflow-queue"
DEAD_LETTERED_AT = "x-reportflow-dead-lettered-at"
UNROUTABLE = "x-reportflow-unroutable"
REPLAYED = "x-reportflow-replayed"
# Who published the original of a retry or a dead letter (the broker-checked user_id it came with).
PUBLISHER = "x-reportflow-publisher"
OURS = "x-reportflow-"
# What the broker adds when it dead-letters or redelivers a message itself.
BROKER_DEATH = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)


def now() -> str:
    return datetime.now(UTC).isoformat()


def failures(properties: pika.BasicProperties) -> int:
    value = (properties.headers or {}).get(FAILURES, 0)
    return value if isinstance(value, int) else 0


def after_failure(properties: pika.BasicProperties, routing_key: str, reason: str) -> dict:
    """The message's headers with one more failure counted and its reason."""
    headers = dict(properties.headers or {})
    headers[FAILURES] = failures(properties) + 1
    headers.setdefault(FIRST_FAILURE, now())
    headers[ERROR] = reason[:1000]
    headers[ROUTING_KEY] = properties.type or routing_key
    return headers


def without_failures(headers: dict) -> dict:
    """A replayed message starts afresh: none of the failure bookkeeping, ours or the broker's."""
    return {k: v for k, v in headers.items() if (k == PUBLISHER or not k.startswith(OURS)) and k not in BROKER_DEATH}


def same_message(properties: pika.BasicProperties, event_type: str, headers: dict) -> pika.BasicProperties:
    """The message as it came, persistent, with new headers: its id, type, report and trace context go along."""
    return pika.BasicProperties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        delivery_mode=2,
        message_id=properties.message_id,
        type=properties.type or event_type,
        timestamp=properties.timestamp,
        app_id=properties.app_id,
        correlation_id=properties.correlation_id,
        headers=headers,
    )
