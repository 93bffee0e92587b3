"""Publisher confirms, pipelined, for the events a stage emits.

pika's BlockingChannel waits for each confirm before it returns from basic_publish, so a stage could
publish only once per broker round trip, and the four-stage chain ran 20-40% faster with no confirms
at all. Here publishes go out at once on the asynchronous channel under a blocking one, and the
broker's confirms (often several in one frame) are sorted as they arrive. Everything runs on the
connection's own thread: the broker's answers arrive as callbacks while the connection does its I/O,
and the runtime collects them between rounds.
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

import pika
import pika.exceptions

from reportflow.shared.publishing import ConfirmLedger

Item = TypeVar("Item")

CONFIRM_MODE_TIMEOUT_SECONDS = 30


class PipelinedConfirms(Generic[Item]):
    def __init__(self, connection: pika.BlockingConnection):
        self._channel = connection.channel()._impl
        selected: list[object] = []
        self._channel.confirm_delivery(ack_nack_callback=self._on_confirmation, callback=selected.append)
        deadline = time.monotonic() + CONFIRM_MODE_TIMEOUT_SECONDS
        while not selected:
            if time.monotonic() > deadline:
                raise pika.exceptions.AMQPChannelError("the broker did not enter confirm mode")
            connection.process_data_events(time_limit=0.1)
        self._channel.add_on_return_callback(self._on_return)
        self._ledger: ConfirmLedger[Item] = ConfirmLedger()
        self.confirmed: list[Item] = []  # taken by some queue
        self.returned: list[Item] = []  # no queue takes them
        self.refused: list[Item] = []  # nacked by the broker

    def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties, item: Item
    ) -> None:
        """Send now; item lands in confirmed, returned or refused when the broker answers. mandatory: a
        message no queue takes comes back instead of vanishing."""
        self._channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
        self._ledger.published(properties.message_id, item)

    @property
    def unconfirmed(self) -> int:
        return self._ledger.unconfirmed

    def take(self) -> tuple[list[Item], list[Item], list[Item]]:
        """What the broker has answered since the last take: (confirmed, returned, refused)."""
        answered = self.confirmed, self.returned, self.refused
        self.confirmed, self.returned, self.refused = [], [], []
        return answered

    def _on_return(self, _channel, _method, properties, _body) -> None:
        self._ledger.returned(properties.message_id)

    def _on_confirmation(self, frame) -> None:
        for outcome, item in self._ledger.answered(frame.method):
            {"confirmed": self.confirmed, "returned": self.returned, "refused": self.refused}[outcome].append(item)
