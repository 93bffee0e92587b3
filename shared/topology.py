"""The broker's shape, in one place: the topic exchange, a durable work queue per stage bound by event
type, a delay queue per stage and retry tier, and the dead-letter route every work queue has."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pika.exceptions

from reportflow.shared.config import Settings

log = logging.getLogger("reportflow.topology")


@dataclass(frozen=True)
class Topology:
    exchange: str = Settings.exchange
    queue_type: str = Settings.queue_type  # or "quorum" (replicated; needs a delivery limit against poison loops)
    delivery_limit: int = Settings.delivery_limit
    retry_delays: tuple[int, ...] = ()

    @classmethod
    def of(cls, settings: Settings, retry_delays: tuple[int, ...] | None = None) -> Topology:
        return cls(
            exchange=settings.exchange,
            queue_type=settings.queue_type,
            delivery_limit=settings.delivery_limit,
            retry_delays=settings.retry_delays if retry_delays is None else retry_delays,
        )

    def queue(self, stage: str) -> str:
        return f"{self.exchange}.{stage}"

    def retry_queue(self, stage: str, delay_seconds: int) -> str:
        return f"{self.exchange}.{stage}.retry.{delay_seconds}s"

    def all_queues(self, stages) -> list[str]:
        """Every queue this topology has for these stages: work, retry tiers, dead letters."""
        return [
            *(
                q
                for stage in stages
                for q in (self.queue(stage), *(self.retry_queue(stage, d) for d in self.retry_delays))
            ),
            self.dead_letter_queue,
        ]

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.exchange}.dead-letter"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.exchange}.dead-letter"

    def work_queue_arguments(self) -> dict:
        arguments = {"x-dead-letter-exchange": self.dead_letter_exchange, **self._kind()}
        if self.queue_type == "quorum":
            arguments["x-delivery-limit"] = self.delivery_limit  # against poison messages
        return arguments

    def retry_queue_arguments(self, stage: str, delay_seconds: int) -> dict:
        # Expired messages go back to the work queue through the default exchange.
        return {
            "x-message-ttl": delay_seconds * 1000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.queue(stage),
            **self._kind(),
        }

    def dead_letter_queue_arguments(self) -> dict:
        return self._kind()

    def _kind(self) -> dict:
        """Quorum: every queue replicated over the cluster's nodes (work, retry tiers, dead letters)."""
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}


def declare_as_permitted(connection, topology: Topology, bindings: dict[str, list[str]], own: dict[str, list[str]]):
    """Declare the whole topology (bindings), so that what a stage emits finds its queues whichever process
    starts first; a least-privilege stage user may declare only its own part (own). The channel, declared."""
    channel = connection.channel()
    try:
        declare(channel, topology, bindings)
    except pika.exceptions.ChannelClosedByBroker as refused:
        if refused.reply_code != 403:
            raise
        log.info("this broker user may declare only its own queues (%s): %s", ", ".join(own), refused.reply_text)
        channel = connection.channel()
        declare(channel, topology, own)
    return channel


class TopologyMismatch(RuntimeError):
    """The broker has a queue of this name declared otherwise (classic where quorum is asked, other
    arguments): a process must not run against it."""


def declare(channel, topology: Topology, bindings: dict[str, list[str]]) -> None:
    """Declare everything with a pika channel. Idempotent, so every process declares at start; a queue
    that exists with other arguments makes the broker refuse (PRECONDITION_FAILED): TopologyMismatch."""
    try:
        channel.exchange_declare(topology.exchange, exchange_type="topic", durable=True)
        channel.exchange_declare(topology.dead_letter_exchange, exchange_type="fanout", durable=True)
        channel.queue_declare(
            topology.dead_letter_queue, durable=True, arguments=topology.dead_letter_queue_arguments()
        )
        channel.queue_bind(topology.dead_letter_queue, topology.dead_letter_exchange)
        for stage, event_types in bindings.items():
            queue = topology.queue(stage)
            channel.queue_declare(queue, durable=True, arguments=topology.work_queue_arguments())
            for event_type in event_types:
                channel.queue_bind(queue, topology.exchange, routing_key=event_type)
            for delay in topology.retry_delays:
                channel.queue_declare(
                    topology.retry_queue(stage, delay),
                    durable=True,
                    arguments=topology.retry_queue_arguments(stage, delay),
                )
    except pika.exceptions.ChannelClosedByBroker as refused:
        if refused.reply_code != 406:
            raise
        raise TopologyMismatch(
            f"the broker refused reportflow's topology ({refused.reply_text}). A queue keeps the type and "
            f"arguments it was declared with: REPORTFLOW_QUEUE_TYPE={topology.queue_type} does not match "
            "what is there. See docs/deploying.md, 'Quorum queues', to move a topology."
        ) from None
