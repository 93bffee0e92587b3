"""Processing one delivery: read it, run the stage's handler in a unit of work (inbox claim, state change,
outbox) inside its process span, and say what is to become of it. Nothing here talks to the broker, so
a delivery can be processed on its own: by a worker thread, a test or a benchmark."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace

from opentelemetry import context, trace

from reportflow.consumers.retries import RetryPolicy
from reportflow.consumers.runtime.messages import Delivery, Outcome, OutgoingMessage
from reportflow.consumers.runtime.telemetry import Telemetry
from reportflow.consumers.runtime.trust import PublisherTrust, publisher_of
from reportflow.consumers.stage import Stage, dependency_names
from reportflow.shared import failures
from reportflow.shared.db import UnitOfWork
from reportflow.shared.events import Event, InvalidMessage, parse, validate
from reportflow.shared.trace_context import carrier_of_current

log = logging.getLogger("reportflow.consumer")


class Processor:
    def __init__(
        self,
        stage: Stage,
        session_factory,
        dependencies: dict,
        telemetry: Telemetry,
        retry_policy: RetryPolicy,
        *,
        queue: str,
        exchange: str,
        max_message_bytes: int,
        trust: PublisherTrust | None = None,
    ):
        self.stage = stage
        self._session_factory = session_factory
        self._handler_kwargs = {h: _injected(h, dependencies) for h in stage.all_handlers}
        self._telemetry = telemetry
        self._retry_policy = retry_policy
        self._queue, self._exchange = queue, exchange
        self._max_message_bytes = max_message_bytes
        self._trust = trust or PublisherTrust({})
        # The runtime's inbox and outbox statements where the SQL instrumentation sees them (tracing.runtime_sql)
        self._bookkeeping_traced = telemetry.settings.runtime_sql

    def read(self, delivery: Delivery) -> Event | InvalidMessage:
        """The delivery as a message of its type, screened for who published it."""
        props = delivery.properties
        message = parse(
            props.type or delivery.routing_key,
            props.message_id,
            props.content_type,
            delivery.body,
            self._max_message_bytes,
            (props.headers or {}).get("schema_version"),
        )
        return self._trust.screen(message, publisher_of(delivery))

    @contextmanager
    def span(self, delivery: Delivery, message, *, in_report_trace: bool = True):
        """The process span of a delivery (telemetry's), with who published it. in_report_trace: False keeps
        it in the message's own trace, without asking the database where the report's lives."""
        exchange = delivery.exchange or self._exchange  # retries come back through the default exchange
        with self._telemetry.process(
            delivery, message, exchange, self._queue, publisher_of(delivery), in_report_trace=in_report_trace
        ) as span:
            yield span

    def batchable(self, delivery: Delivery) -> Event | None:
        """The delivery as a valid event this stage handles, which may share a transaction; else None."""
        try:
            message = self.read(delivery)
            message = validate(message) if isinstance(message, Event) else message
        except Exception:
            return None  # process() says what is wrong with it, alone
        return message if isinstance(message, Event) and message.type in self.stage.handlers else None

    def run_handler(self, message: Event, uow: UnitOfWork) -> None:
        """The stage's handler for a readable message, its own writes flushed (traced as its SQL)."""
        handler = self.stage.handlers[message.type]
        handler(message, uow, **self._handler_kwargs[handler])
        uow.flush()

    def note_refusal(self, span, message, refusal: str | None) -> None:
        if refusal:
            span.set_attribute("reportflow.refused", refusal)
            span.add_event("refused", {"reason": refusal})
            log.warning("%s: refused %s %s: %s", self.stage.name, message.type, message.message_id, refusal)

    def process(self, delivery: Delivery) -> Outcome:
        """Handle one delivery; whatever happens, say what is to become of it."""
        message = self.read(delivery)
        with self.span(delivery, message) as span:
            try:
                if isinstance(message, Event):
                    message = validate(message)  # an invalid one says why on this span (handle)
                return self.handle(message)
            except Exception as exc:
                return self._failed(delivery, message, span, exc)

    def fail(self, delivery: Delivery, exc: Exception) -> Outcome:
        """A delivery that met a failure outside it (the database away, met by its batch): its span and its
        retry, with no try of its own, which would only wait out the same timeout again."""
        message = self.read(delivery)
        with self.span(delivery, message, in_report_trace=False) as span:
            return self._failed(delivery, message, span, exc)

    def handle(self, message: Event | InvalidMessage, *, timer: bool = False) -> Outcome:
        """Run the stage's handler on a message already read, in the current trace context: inbox claim,
        handler, outbox, one commit. A handler's exception is raised to the caller. timer: the message is
        one of the stage's timers, handled by Stage.timers (a timer's type is never taken off the broker)."""
        span = trace.get_current_span()
        carrier = carrier_of_current()  # the process span's: what the handler stores, and its events carry
        if isinstance(message, InvalidMessage):
            span.set_attribute("reportflow.invalid_reasons", message.reasons[:20])
            handler = self.stage.on_invalid.get(message.type)
            if handler is None:
                self._telemetry.error(span, "InvalidMessage", "unreadable message")
                return Outcome(context.get_current(), dead_letter_reason="; ".join(message.reasons))
        else:
            handler = (self.stage.timers if timer else self.stage.handlers).get(message.type)
            if handler is None:
                return Outcome(
                    context.get_current(),
                    dead_letter_reason=f"stage {self.stage.name} has no handler for {message.type}",
                )
            message = replace(message, trace_context=carrier)

        with UnitOfWork(self._session_factory, self.stage.name, bookkeeping_traced=self._bookkeeping_traced) as uow:
            with self._telemetry.runtime_sql(uow.bookkeeping_in_sqlalchemy()):
                claimed = uow.claim(message.message_id, message.type)
            if not claimed:
                span.set_attribute("reportflow.duplicate", True)
                log.info(
                    "%s: %s %s was processed before; acknowledged without effect",
                    self.stage.name,
                    message.type,
                    message.message_id,
                )
                return Outcome(context.get_current(), verdict="duplicate")
            handler(message, uow, **self._handler_kwargs[handler])
            uow.flush()  # the handler's own writes, traced as its SQL; the bookkeeping below is the runtime's
            self.note_refusal(span, message, uow.refusal)
            with self._telemetry.runtime_sql(uow.bookkeeping_in_sqlalchemy()):
                committed = uow.commit(carrier)
            return Outcome(
                context.get_current(),
                verdict="refused" if uow.refusal else "handled",
                publish=[
                    OutgoingMessage(outbox_id, e.message_id, e.type, e.payload, carrier) for outbox_id, e in committed
                ],
            )

    def _failed(self, delivery: Delivery, message, span, exc: Exception) -> Outcome:
        reason = f"{type(exc).__name__}: {exc}"
        self._telemetry.failed(span, exc, reason)
        failed_so_far = failures.failures(delivery.properties) + 1
        delay = self._retry_policy.delay_after(failed_so_far) if self._retry_policy.is_transient(exc) else None
        if delay is not None:
            log.warning("%s: handling %s %s failed (%s)", self.stage.name, message.type, message.message_id, reason)
            return Outcome(context.get_current(), retry_after=delay, failure=reason)
        log.exception("%s: handling %s %s failed for good", self.stage.name, message.type, message.message_id)
        return Outcome(context.get_current(), dead_letter_reason=reason, failure=reason)


def _injected(handler, dependencies: dict) -> dict:
    """The dependencies a handler names after (message, uow), looked up by parameter name."""
    names = dependency_names(handler)
    missing = [n for n in names if n not in dependencies]
    if missing:
        raise TypeError(f"{handler.__qualname__} needs {missing}, which the bootstrap does not provide")
    return {n: dependencies[n] for n in names}
