"""Publishing many events at once, with publisher confirms pipelined: up to `window` messages are
unconfirmed at a time, instead of waiting for each confirm in turn (which caps near 2,000 a second).

Each message still gets its own producer span and trace context, so each report keeps its own trace."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pika
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from reportflow.shared.broker import broker_urls, broker_user
from reportflow.shared.config import Settings
from reportflow.shared.events import Event, encode, message_properties, new_report_id
from reportflow.shared.publishing import ConfirmLedger, publish_span_attributes, publish_span_name
from reportflow.shared.trace_context import carrier_of_current

_tracer = trace.get_tracer("reportflow.producer")


@dataclass
class BulkResult:
    confirmed: int = 0
    nacked: list[str] = field(default_factory=list)  # message ids the broker refused
    unroutable: list[str] = field(default_factory=list)  # message ids no queue took

    @property
    def ok(self) -> bool:
        return not self.nacked and not self.unroutable


class BulkPublisher:
    def __init__(
        self, amqp_url: str | None = None, exchange: str | None = None, window: int = 1000, app_id: str = "upstream"
    ):
        settings = Settings.load()
        self._url = amqp_url or settings.amqp_url
        self._exchange = exchange or settings.exchange
        self._window = window
        self._app_id = app_id

    def publish(self, events: Iterable[Event]) -> BulkResult:
        """Publish every event; returns when the broker has confirmed (or refused) each one."""
        events = iter(events)
        for url in broker_urls(self._url):  # the first node that answers
            run = _Run(events, self._exchange, self._window, self._app_id, broker_user(url))
            connection = pika.SelectConnection(
                pika.URLParameters(url),
                on_open_callback=run.on_open,
                on_open_error_callback=run.on_error,
                on_close_callback=run.on_closed,
            )
            run.connection = connection
            connection.ioloop.start()
            if not (run.error and not run.opened):
                break  # opened: done or failed on this node; not opened: try the next
        if run.error:
            raise run.error
        return run.result

    def requests(self, requests: Iterable[dict]) -> BulkResult:
        return self.publish(
            Event("report.requested", {**r, "report_id": r.get("report_id") or new_report_id()}) for r in requests
        )


class _Run:
    """One bulk publish on an async connection: fill the window, refill on each confirm, close when done."""

    def __init__(self, events, exchange: str, window: int, app_id: str, user_id: str):
        self.events, self.exchange, self.window, self.app_id = events, exchange, window, app_id
        self.user_id = user_id  # the connection's user, which the broker checks: consumers can trust it
        # pika's connection and channel once opened (pika has no type hints: they are Any either way)
        self.connection: Any = None
        self.channel: Any = None
        self.result = BulkResult()
        self.error: Exception | None = None
        self.ledger: ConfirmLedger[str] = ConfirmLedger()  # of message ids
        self.exhausted = False
        self.opened = False

    def on_open(self, connection) -> None:
        self.opened = True
        connection.channel(on_open_callback=self.on_channel)

    def on_error(self, _connection, error) -> None:
        self.error = error if isinstance(error, Exception) else RuntimeError(str(error))
        self.connection.ioloop.stop()

    def on_closed(self, _connection, _reason) -> None:
        self.connection.ioloop.stop()

    def on_channel(self, channel) -> None:
        self.channel = channel
        channel.add_on_return_callback(self.on_return)
        channel.confirm_delivery(self.on_confirm, callback=lambda _frame: self.fill())

    def fill(self) -> None:
        while not self.exhausted and self.ledger.unconfirmed < self.window:
            event = next(self.events, None)
            if event is None:
                self.exhausted = True
                break
            self.send(event)
        self.finish_if_done()

    def send(self, event: Event) -> None:
        body = encode(event)
        with _tracer.start_as_current_span(
            publish_span_name(self.exchange, event.type),
            kind=SpanKind.PRODUCER,
            attributes=publish_span_attributes(
                self.exchange, event.type, message_id=event.message_id, report_id=event.report_id, body_size=len(body)
            ),
        ):
            properties = pika.BasicProperties(
                **message_properties(event, carrier_of_current(), app_id=self.app_id, user_id=self.user_id)
            )
            self.channel.basic_publish(self.exchange, event.type, body, properties, mandatory=True)
        self.ledger.published(event.message_id, event.message_id)

    def on_return(self, _channel, _method, properties, _body) -> None:
        self.ledger.returned(properties.message_id)

    def on_confirm(self, frame) -> None:
        for outcome, message_id in self.ledger.answered(frame.method):
            if outcome == "confirmed":
                self.result.confirmed += 1
            else:
                (self.result.unroutable if outcome == "returned" else self.result.nacked).append(message_id)
        self.fill()

    def finish_if_done(self) -> None:
        if self.exhausted and not self.ledger.unconfirmed and self.connection.is_open:
            self.connection.close()
