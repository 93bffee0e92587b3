"""Events as handlers see them, and as they travel: the wire format of the event contract (README)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from reportflow import schemas

CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Event:
    """One event: its type, its validated payload and the id that makes it idempotent."""

    type: str
    payload: dict
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # The trace context (W3C headers) the event is processed in; handlers store it, never read it.
    trace_context: dict = field(default_factory=dict, compare=False)

    @property
    def report_id(self) -> str | None:
        value = self.payload.get("report_id")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class InvalidMessage:
    """A message that could not be read as its event type; reasons say why, payload is what could be read."""

    type: str
    message_id: str
    reasons: list[str]
    payload: dict | None = None

    @property
    def report_id(self) -> str | None:
        value = (self.payload or {}).get("report_id")
        return value if isinstance(value, str) else None


def new_report_id() -> str:
    """The id of a report whose request named none: chosen by whoever publishes the request first."""
    return f"rpt-{uuid.uuid4().hex[:16]}"


def oversize(body: bytes, max_bytes: int) -> str | None:
    """Why a message body is too large for the bus, or None: the publisher and the consumer ask alike."""
    return f"message body is {len(body)} bytes, over the limit of {max_bytes}" if len(body) > max_bytes else None


def unreadable_version(schema_version: object) -> str | None:
    """Why a message's schema_version cannot be read here, or None. Within a major version the contract
    only grows, so any minor of ours reads; a message without the header is read as version 1 (the
    first publishers sent none); another major is refused, to be replayed once the consumers read it."""
    if schema_version is None:
        return None
    if isinstance(schema_version, bytes):
        schema_version = schema_version.decode("utf-8", errors="replace")
    if str(schema_version).split(".", 1)[0].strip() == schemas.SCHEMA_VERSION:
        return None
    return (
        f"schema_version {str(schema_version)[:20]!r} is not one this consumer reads (it reads "
        f"{schemas.SCHEMA_VERSION}); upgrade the consumers before publishing it"
    )


def encode(event: Event) -> bytes:
    return json.dumps(event.payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def message_properties(
    event: Event, headers: dict | None = None, app_id: str = "reportflow", user_id: str | None = None
) -> dict:
    """The AMQP properties every reportflow message carries (as keyword arguments for pika or kombu).
    user_id, when given, must be the publishing connection's user: the broker refuses the message otherwise."""
    return {
        **({"user_id": user_id} if user_id else {}),
        "content_type": CONTENT_TYPE,
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "message_id": event.message_id,
        "type": event.type,
        "timestamp": int(time.time()),
        "app_id": app_id,
        "correlation_id": event.report_id,
        "headers": {"schema_version": schemas.SCHEMA_VERSION, **(headers or {})},
    }


def parse(
    event_type: str | None,
    message_id: str | None,
    content_type: str | None,
    body: bytes,
    max_bytes: int,
    schema_version: object = None,
) -> InvalidMessage | Event:
    """Read one delivery: size, content type, JSON, contract version. The payload is checked by validate()."""
    event_type = event_type or "(unknown)"
    message_id = message_id or f"no-id:{uuid.uuid5(uuid.NAMESPACE_OID, body[:65536].hex())}"
    too_large = oversize(body, max_bytes)
    if too_large:
        return InvalidMessage(event_type, message_id, [too_large])
    if content_type and content_type.split(";")[0].strip().lower() != CONTENT_TYPE:
        return InvalidMessage(event_type, message_id, [f"content type {content_type!r} is not {CONTENT_TYPE}"])
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return InvalidMessage(event_type, message_id, [f"body is not UTF-8 JSON: {exc}"])
    except RecursionError:
        return InvalidMessage(event_type, message_id, ["body is JSON nested too deeply to read"])
    if not isinstance(payload, dict):
        return InvalidMessage(event_type, message_id, ["body is not a JSON object"])
    unknown_version = unreadable_version(schema_version)
    if unknown_version:  # the payload is kept so that the refusal can name the report
        return InvalidMessage(event_type, message_id, [unknown_version], payload)
    return Event(event_type, payload, message_id)


def validate(parsed: Event) -> Event | InvalidMessage:
    """The payload against its event type's schema."""
    if parsed.type not in schemas.event_types():
        return InvalidMessage(parsed.type, parsed.message_id, [f"unknown event type {parsed.type!r}"], parsed.payload)
    reasons = schemas.errors(parsed.type, parsed.payload)
    if reasons:
        return InvalidMessage(parsed.type, parsed.message_id, reasons, parsed.payload)
    return parsed
