"""Timers: messages a stage sends itself later (a reminder, a deadline), kept in the timers table and
written in the transaction that set them. A table, not RabbitMQ: a per-message TTL on one delay queue
blocks behind its head (a three-day reminder would hold up a thirty-second one), the delayed-message plugin
is not on every broker, and a row is cancelled by an UPDATE in the very transaction that closes the stage.

Every poll the stage leases its due timers (SKIP LOCKED on PostgreSQL: two processes of a stage take
different rows) and processes each like a delivery: in a span of the trace it was set in, through the
stage's inbox keyed by the timer's message id, its events through the outbox. Then the timer is marked
fired. A process killed in between leaves its lease to run out; another process fires the timer again and
the inbox makes that a no-op, so a timer fires once in effect."""

from __future__ import annotations

import logging
from datetime import timedelta

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import or_, select, update

from reportflow.consumers.runtime.background import BackgroundLoop
from reportflow.shared.events import Event
from reportflow.shared.models import Timer, utcnow

log = logging.getLogger("reportflow.consumer")

LEASED_PER_POLL = 50
PUBLISH_WAIT_SECONDS = 30


class TimerPoller(BackgroundLoop):
    def __init__(
        self,
        stage_name: str,
        session_factory,
        processor,
        telemetry,
        publish_on_io,
        *,
        poll_seconds: float,
        lease_seconds: int,
        retry_delays: tuple[int, ...],
        counted: dict | None = None,
    ):
        """processor.handle runs a timer's message; publish_on_io(messages) publishes what it emitted;
        counted, outcome -> a counter (fired, retried, given_up)."""
        self.stage_name = stage_name
        self._session_factory = session_factory
        self._processor = processor
        self._telemetry = telemetry
        self._publish_on_io = publish_on_io
        self._poll_seconds = poll_seconds
        self._lease = timedelta(seconds=lease_seconds)
        self._retry_delays = retry_delays
        self._counted = counted or {}
        super().__init__(f"{stage_name}-timers")

    def _run(self) -> None:
        while not self._stopping.wait(self._poll_seconds):
            try:
                self.fire_due()
            except Exception:
                log.warning("%s: could not look for due timers; will try again", self.stage_name, exc_info=True)

    def fire_due(self) -> int:
        """Fire what is due now; return how many timers were taken."""
        leased = self._take_due()
        for timer in leased:
            if self._stopping.is_set():
                break  # its lease runs out, and the next process to look fires it
            self._fire(timer)
        return len(leased)

    def _take_due(self) -> list[Timer]:
        now = utcnow()
        with suppress_instrumentation(), self._session_factory() as session, session.begin():
            due = session.scalars(
                select(Timer)
                .where(
                    Timer.stage == self.stage_name,
                    Timer.due_at <= now,
                    Timer.fired_at.is_(None),
                    Timer.cancelled_at.is_(None),
                    or_(Timer.leased_until.is_(None), Timer.leased_until < now),
                )
                .order_by(Timer.due_at)
                .limit(LEASED_PER_POLL)
                .with_for_update(skip_locked=True)
            ).all()
            for timer in due:
                timer.leased_until, timer.attempts = now + self._lease, timer.attempts + 1
        return list(due)

    def _fire(self, timer: Timer) -> None:
        message = Event(timer.event_type, dict(timer.payload), timer.message_id)
        with self._telemetry.timer(message, timer.headers, timer.due_at) as span:
            try:
                outcome = self._processor.handle(message, timer=True)
                failure = outcome.dead_letter_reason
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
                self._telemetry.failed(span, exc, failure)
        if failure:
            self._failed(timer, failure)
            return
        if outcome.publish:
            try:
                self._publish_on_io(outcome.publish).result(PUBLISH_WAIT_SECONDS)
            except Exception as exc:  # committed in the outbox: the relay publishes it
                log.warning("%s: timer %s: publishing left to the outbox relay (%r)", self.stage_name, timer.id, exc)
        self._set(timer.id, fired_at=utcnow(), last_error=None)
        self._count("fired")

    def _failed(self, timer: Timer, reason: str) -> None:
        """Try again after the retry policy's delays, like a message; past the last, give up, saying why."""
        if timer.attempts <= len(self._retry_delays):
            delay = self._retry_delays[timer.attempts - 1]
            log.warning("%s: timer %s failed (%s); again in %d s", self.stage_name, timer.id, reason, delay)
            self._set(timer.id, leased_until=utcnow() + timedelta(seconds=delay), last_error=reason[:2000])
            self._count("retried")
            return
        log.error("%s: timer %s failed %d times, given up: %s", self.stage_name, timer.id, timer.attempts, reason)
        self._set(
            timer.id, cancelled_at=utcnow(), last_error=f"given up after {timer.attempts} attempts: {reason}"[:2000]
        )
        self._count("given_up")

    def _count(self, outcome: str) -> None:
        if outcome in self._counted:
            self._counted[outcome].inc()

    def _set(self, timer_id: int, **values) -> None:
        with suppress_instrumentation(), self._session_factory() as session, session.begin():
            session.execute(update(Timer).where(Timer.id == timer_id).values(**values))
