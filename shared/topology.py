"""The broker's shape, in one place: the topic exchange, a durable queue per stage bound by event type,
and the dead-letter route every work queue has."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    exchange: str = "reportflow"

    def queue(self, stage: str) -> str:
        return f"{self.exchange}.{stage}"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.exchange}.dead-letter"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.exchange}.dead-letter"


def declare(channel, topology: Topology, bindings: dict[str, list[str]]) -> None:
    """Declare everything with a pika channel; idempotent, so every process may call it at start."""
    channel.exchange_declare(topology.exchange, exchange_type="topic", durable=True)
    channel.exchange_declare(topology.dead_letter_exchange, exchange_type="fanout", durable=True)
    channel.queue_declare(topology.dead_letter_queue, durable=True)
    channel.queue_bind(topology.dead_letter_queue, topology.dead_letter_exchange)
    for stage, event_types in bindings.items():
        queue = topology.queue(stage)
        channel.queue_declare(queue, durable=True,
                              arguments={"x-dead-letter-exchange": topology.dead_letter_exchange})
        for event_type in event_types:
            channel.queue_bind(queue, topology.exchange, routing_key=event_type)
