"""The runtime's Prometheus metrics, per stage and event type: what became of each message, how long it
took, how long it waited in its queue, what is in flight, what the outbox still holds, and what became of
its timers.

Event types come from the message, which anyone can publish: a type outside the contract is counted as
"unknown", so a hostile publisher cannot grow the label set."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from reportflow import schemas
from reportflow.consumers.runtime.messages import Delivery, Outcome

MESSAGES = Counter(
    "reportflow_messages",
    "Messages a stage processed, by what became of them (handled, duplicate, refused, retried, dead_lettered)",
    ["stage", "event_type", "outcome"],
)
FAILURES = Counter(
    "reportflow_message_failures", "Handler failures (each then retried or dead-lettered)", ["stage", "event_type"]
)
HANDLING = Histogram(
    "reportflow_handling_seconds",
    "Processing one message: parse, handler, commit",
    ["stage", "event_type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IN_QUEUE = Histogram(
    "reportflow_time_in_queue_seconds",
    "From the message's timestamp to its processing",
    ["stage", "event_type"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)
IN_FLIGHT = Gauge("reportflow_messages_in_flight", "Messages taken from the queue and not yet settled", ["stage"])
OUTBOX_WAITING = Gauge(
    "reportflow_outbox_waiting", "Outbox rows not yet published, as the relay last counted", ["stage"]
)

TIMERS = Counter(
    "reportflow_timers", "Timers a stage fired, by what became of them (fired, retried, given_up)", ["stage", "outcome"]
)


class RuntimeMetrics:
    def __init__(self, stage: str):
        self.stage = stage
        self.in_flight = IN_FLIGHT.labels(stage)
        self.outbox_waiting = OUTBOX_WAITING.labels(stage)
        self.timers = {outcome: TIMERS.labels(stage, outcome) for outcome in ("fired", "retried", "given_up")}

    def processed(self, delivery: Delivery, outcome: Outcome, seconds: float) -> None:
        event_type = _known(delivery.properties.type or delivery.routing_key)
        if outcome.failure:
            FAILURES.labels(self.stage, event_type).inc()
        MESSAGES.labels(self.stage, event_type, _outcome(outcome)).inc()
        HANDLING.labels(self.stage, event_type).observe(seconds)
        if delivery.properties.timestamp:
            IN_QUEUE.labels(self.stage, event_type).observe(max(0.0, time.time() - delivery.properties.timestamp))


def _outcome(outcome: Outcome) -> str:
    if outcome.retry_after is not None:
        return "retried"
    if outcome.dead_letter_reason is not None:
        return "dead_lettered"
    return outcome.verdict


def _known(event_type: str | None) -> str:
    return event_type if event_type in schemas.event_types() else "unknown"
