"""The outbox's other half, on a thread of its own so it never waits behind a handler (a PDF render) on
the worker pool: rows the broker confirmed are marked published, in batches because a mark costs a
commit; rows a crash or a lost confirm left unpublished are published again. One row left unmarked is
only published twice, and the consumer's inbox downstream absorbs the duplicate."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import select, update

from reportflow.consumers.runtime.background import BackgroundLoop
from reportflow.consumers.runtime.messages import OutgoingMessage
from reportflow.shared.models import OutboxMessage, utcnow

log = logging.getLogger("reportflow.consumer")

MARK_PUBLISHED_EVERY_SECONDS = 0.2


class OutboxRelay(BackgroundLoop):
    def __init__(self, stage_name: str, session_factory, relay_every_seconds: float, publish_on_io, waiting=None):
        """publish_on_io(messages) publishes on the connection's thread and returns a future; waiting, a
        gauge, is set to the rows still unpublished at each round."""
        self.stage_name = stage_name
        self._session_factory = session_factory
        self._relay_every = relay_every_seconds
        self._publish_on_io = publish_on_io
        self._waiting = waiting
        self._lock = threading.Lock()
        self._unmarked: list[int] = []
        super().__init__(f"{stage_name}-outbox")

    def stop(self) -> None:
        """End the thread, then mark what is confirmed so far."""
        super().stop()
        self.mark_published()

    def confirmed(self, outbox_ids: list[int]) -> None:
        if outbox_ids:
            with self._lock:
                self._unmarked.extend(outbox_ids)

    def _run(self) -> None:
        next_relay = 0.0  # at start: what the last run of this stage left behind
        while not self._stopping.wait(MARK_PUBLISHED_EVERY_SECONDS):
            self.mark_published()
            if time.monotonic() >= next_relay:
                next_relay = time.monotonic() + self._relay_every
                self.relay()

    def mark_published(self) -> None:
        with self._lock:
            batch, self._unmarked = self._unmarked, []
        if not batch:
            return
        try:
            with suppress_instrumentation(), self._session_factory() as session, session.begin():
                session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(batch)).values(published_at=utcnow()))
        except Exception:
            log.warning(
                "%s: could not mark %d outbox rows published; the relay will resend them",
                self.stage_name,
                len(batch),
                exc_info=True,
            )

    def relay(self) -> None:
        """Publish what a crash left in the outbox. Rows younger than a round may still be on their way out
        through the normal path, so they wait a round."""
        try:
            cutoff = time.time() - self._relay_every
            with suppress_instrumentation(), self._session_factory() as session:
                rows = session.scalars(
                    select(OutboxMessage)
                    .where(OutboxMessage.source == self.stage_name, OutboxMessage.published_at.is_(None))
                    .order_by(OutboxMessage.id)
                    .limit(500)
                ).all()
                stale = [OutgoingMessage.of(r) for r in rows if _timestamp(r.created_at) < cutoff]
            if self._waiting is not None:
                self._waiting.set(len(rows))  # up to the 500 looked at
            if not stale:
                return
            log.warning("%s: relaying %d unpublished outbox messages", self.stage_name, len(stale))
            self._publish_on_io(stale).result()  # marked as their confirms come
        except Exception:
            log.warning("%s: outbox relay failed; will retry", self.stage_name, exc_info=True)


def _timestamp(moment: datetime) -> float:
    # SQLite hands back naive datetimes; they were written in UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
