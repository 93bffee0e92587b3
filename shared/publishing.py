"""What every reportflow publish shares, whoever publishes (the client, the bulk publisher, a stage):
the attributes of its publish span, and the sorting of the broker's publisher confirms."""

from __future__ import annotations

from typing import Generic, TypeVar

import pika.spec

Item = TypeVar("Item")


def publish_span_name(exchange: str, routing_key: str) -> str:
    return f"publish {publish_destination(exchange, routing_key)}"


def publish_destination(exchange: str, routing_key: str) -> str:
    return f"{exchange}:{routing_key}" if exchange and routing_key else (exchange or routing_key)


def publish_span_attributes(
    exchange: str,
    routing_key: str,
    *,
    message_id: str | None,
    report_id: str | None,
    body_size: int,
    server: tuple[str, int] | None = None,
) -> dict:
    """The OpenTelemetry messaging conventions for a RabbitMQ publish, and the report it is about. (Not
    messaging.destination.temporary: the conventions set it only when true, and no exchange here is.)"""
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": publish_destination(exchange, routing_key),
        "messaging.rabbitmq.destination.routing_key": routing_key,
        "messaging.message.body.size": body_size,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    if report_id:
        attributes["messaging.message.conversation_id"] = report_id
        attributes["report.id"] = report_id
    if server:
        attributes["server.address"], attributes["server.port"] = server
    return attributes


class ConfirmLedger(Generic[Item]):
    """Which published messages the broker took, returned (no queue for them) or refused. Confirms come one
    by one or several at once (multiple), and a message's Basic.Return comes before its Basic.Ack."""

    def __init__(self):
        self._sequence = 0
        self._unconfirmed: dict[int, tuple[str | None, Item]] = {}  # publish sequence -> (message id, item)
        self._returned: set[str] = set()

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    def published(self, message_id: str | None, item: Item) -> None:
        """Call after each publish on a channel in confirm mode, in order."""
        self._sequence += 1
        self._unconfirmed[self._sequence] = (message_id, item)

    def returned(self, message_id: str) -> None:
        self._returned.add(message_id)

    def answered(self, method) -> list[tuple[str, Item]]:
        """What a Basic.Ack or Basic.Nack settles: ("confirmed" | "returned" | "refused", item) each."""
        sequences = (
            [s for s in self._unconfirmed if s <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        )
        settled = []
        for sequence in sequences:
            if sequence not in self._unconfirmed:
                continue
            message_id, item = self._unconfirmed.pop(sequence)
            if isinstance(method, pika.spec.Basic.Nack):
                settled.append(("refused", item))
            elif message_id in self._returned:
                self._returned.discard(message_id)
                settled.append(("returned", item))
            else:
                settled.append(("confirmed", item))
        return settled
