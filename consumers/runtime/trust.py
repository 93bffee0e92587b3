"""Who may publish what: the broker's word, not the body's. RabbitMQ checks a message's AMQP user_id
against the user of the connection that published it, so user_id names its publisher; a deployment lists,
per upstream event type, the broker users it trusts (trust.publishers). A message of a listed type from
anyone else is refused: handled as an unreadable message of its type (recorded, its refusal emitted, the
refusal on its span), and never applied. Unlisted types are taken from anyone."""

from __future__ import annotations

from dataclasses import replace

from reportflow.consumers.runtime.messages import Delivery
from reportflow.shared import failures
from reportflow.shared.events import Event, InvalidMessage


class PublisherTrust:
    def __init__(self, trusted: dict[str, frozenset[str]]):
        self._trusted = trusted

    def refusal(self, event_type: str, publisher: str | None) -> str | None:
        """Why a message of event_type from publisher is not to be applied, or None."""
        allowed = self._trusted.get(event_type)
        if allowed is None or publisher in allowed:
            return None
        if not publisher:
            return f"{event_type} is taken only from trusted publishers, and this message has no user_id"
        return f"broker user {publisher!r} is not trusted to publish {event_type}"

    def screen(self, message: Event | InvalidMessage, publisher: str | None) -> Event | InvalidMessage:
        reason = self.refusal(message.type, publisher)
        if reason is None:
            return message
        if isinstance(message, InvalidMessage):
            return replace(message, reasons=[reason, *message.reasons])
        return InvalidMessage(message.type, message.message_id, [reason], message.payload)


def publisher_of(delivery: Delivery) -> str | None:
    """Who published a delivery. Through the exchange: the user_id the broker checked. Through the default
    exchange (a retry coming back, a dead letter replayed), where only reportflow's own users and operators
    may publish: the publisher recorded when the runtime took the message out of its queue."""
    if delivery.exchange == "":
        value = (delivery.properties.headers or {}).get(failures.PUBLISHER)
    else:
        value = delivery.properties.user_id
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def keep_publisher(headers: dict, delivery: Delivery) -> dict:
    """The headers of a copy of the delivery (a retry, a dead letter), saying who published the original.
    A header of that name that came from outside is replaced, never believed."""
    publisher = publisher_of(delivery)
    headers.pop(failures.PUBLISHER, None)
    if publisher:
        headers[failures.PUBLISHER] = publisher
    return headers
