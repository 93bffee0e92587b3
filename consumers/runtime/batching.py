"""Batches: under a backlog, the deliveries waiting in the prefetch window are handled in one transaction
(one inbox insert for all of them, their handlers one after another, one outbox insert, one commit), then
each is settled on its own. A commit and its bookkeeping statements are most of a pass-through hop's cost,
and a backlog shares them.

Each message keeps what it has alone: its own process span in its own trace, its own outcome, its own
retry. Its handler runs inside a savepoint, so a handler that fails is rolled back alone, its inbox claim
given back, and the message handled alone after the batch commits: one bad message never fails its
neighbours' effects. What cannot be batched (an unreadable or untrusted message, a type with no handler,
a stage that asks not to be, SQLite) is handled alone, as is a single delivery: an idle pipeline never
waits to fill a batch. BatchPlan says how large a stage's batches are and which threads take them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from opentelemetry import context

from reportflow.consumers.retries import database_away
from reportflow.consumers.runtime.messages import Delivery, Outcome, OutgoingMessage
from reportflow.shared.db import Effects, UnitOfWork
from reportflow.shared.events import Event
from reportflow.shared.trace_context import carrier_of_current

log = logging.getLogger("reportflow.consumer")


@dataclass(frozen=True)
class BatchPlan:
    """How a stage's consumer takes its deliveries: in batches of up to `size` (1: one at a time), on
    `worker_threads` threads, or, with none, on the connection's I/O thread itself."""

    size: int
    worker_threads: int

    @property
    def on_io_thread(self) -> bool:
        return self.worker_threads == 0

    @classmethod
    def of(cls, stage, settings, on_postgresql: bool, concurrency: int) -> BatchPlan:
        """concurrency: the threads the stage runs where nothing says fewer (Settings.worker_threads)."""
        batching = stage.batch and settings.batch_size > 1 and on_postgresql
        # Unless the operator says otherwise, a stage that batches and waits only on the database is handled
        # on the I/O thread: what arrives while it works forms its next batch, and a message handled alone
        # crosses no thread (each hand-off is a wake-up and a wait for the interpreter lock). A worker
        # thread would only add them, and more than one would split the batches, each paying its own commit;
        # several threads pay only where handlers wait on something else (SMTP). Its handlers are short, so
        # heartbeats still go out in time.
        on_io_thread = batching and stage.waits_only_on_database and not settings.concurrency
        return cls(settings.batch_size if batching else 1, 0 if on_io_thread else concurrency)


@dataclass
class _Handled:
    """A message of the batch whose handler ran (effects) or that was seen before (no effects)."""

    index: int
    context: context.Context
    effects: Effects | None = None
    carrier: dict = field(default_factory=dict)


class Batches:
    def __init__(self, processor, session_factory, telemetry, enabled: bool):
        """processor: the stage's Processor, whose handlers and readings the batch shares."""
        self._processor = processor
        # A batch's messages share a session, sampled or not: its SQL is on the traced engine, if any, and
        # an unsampled message's statements are suppressed there by its span.
        self._session_factory = getattr(session_factory, "always_traced", session_factory)
        self._telemetry = telemetry
        self.enabled = enabled

    def process(self, deliveries: list[Delivery]) -> list[Outcome]:
        """An outcome for each delivery, in order."""
        if not self.enabled or len(deliveries) == 1:
            return [self._processor.process(d) for d in deliveries]
        outcomes: dict[int, Outcome] = {}
        batch, ids, later = [], set(), []
        for index, delivery in enumerate(deliveries):
            event = self._processor.batchable(delivery)
            if event is None:
                outcomes[index] = self._processor.process(delivery)
            elif event.message_id in ids:
                later.append((index, delivery))  # a second copy: after the first commits, the inbox has it
            else:
                ids.add(event.message_id)
                batch.append((index, delivery, event))
        if len(batch) == 1:
            index, delivery, _ = batch[0]
            outcomes[index] = self._processor.process(delivery)
        elif batch:
            try:
                outcomes.update(self._in_one_transaction(batch))
            except Exception as exc:
                if database_away(exc):  # alone, each would wait out the same timeout in turn
                    log.warning("a batch of %d met the database away (%r); each is retried", len(batch), exc)
                    outcomes.update({index: self._processor.fail(delivery, exc) for index, delivery, _ in batch})
                else:  # the commit itself: each is handled alone, with its own retry
                    log.warning("a batch of %d could not commit (%r); handling each alone", len(batch), exc)
                    outcomes.update({index: self._processor.process(delivery) for index, delivery, _ in batch})
        outcomes.update({index: self._processor.process(delivery) for index, delivery in later})
        return [outcomes[index] for index in range(len(deliveries))]

    def _in_one_transaction(self, batch: list[tuple[int, Delivery, Event]]) -> dict[int, Outcome]:
        processor, telemetry = self._processor, self._telemetry
        handled: list[_Handled] = []
        alone: list[tuple[int, Delivery]] = []
        with UnitOfWork(self._session_factory, processor.stage.name) as uow:
            with telemetry.runtime_sql():
                claimed = uow.claim_all([(event.message_id, event.type) for _, _, event in batch])
            for index, delivery, event in batch:
                with processor.span(delivery, event) as span:
                    span.set_attribute("reportflow.batch.size", len(batch))
                    if event.message_id not in claimed:
                        span.set_attribute("reportflow.duplicate", True)
                        handled.append(_Handled(index, context.get_current()))
                        continue
                    carrier = carrier_of_current()
                    savepoint = uow.session.begin_nested()
                    try:
                        processor.run_handler(replace(event, trace_context=carrier), uow)
                        savepoint.commit()
                    except Exception as exc:
                        if database_away(exc):
                            raise  # not this message's doing: the batch's neighbours would each meet it too
                        savepoint.rollback()
                        with telemetry.runtime_sql():
                            uow.unclaim(event.message_id)
                        uow.take_effects()
                        span.add_event("taken out of its batch", {"reason": f"{type(exc).__name__}: {exc}"[:1000]})
                        alone.append((index, delivery))
                        continue
                    effects = uow.take_effects()
                    processor.note_refusal(span, event, effects.refusal)
                    handled.append(_Handled(index, context.get_current(), effects, carrier))
            with telemetry.runtime_sql():
                committed = iter(uow.commit_all([(h.effects, h.carrier) for h in handled if h.effects is not None]))
        outcomes = {}
        for h in handled:
            if h.effects is None:
                outcomes[h.index] = Outcome(h.context, verdict="duplicate")
                continue
            outcomes[h.index] = Outcome(
                h.context,
                verdict="refused" if h.effects.refusal else "handled",
                publish=[
                    OutgoingMessage(outbox_id, e.message_id, e.type, e.payload, h.carrier)
                    for outbox_id, e in next(committed)
                ],
            )
        for index, delivery in alone:  # after the batch's commit: its neighbours' effects do not wait on it
            outcomes[index] = processor.process(delivery)
        return outcomes
