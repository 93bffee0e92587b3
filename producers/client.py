"""A kombu-based client for upstream Python systems: publishes report.requested, approval.decided and
the approval's other inbound events (approval.delegated, report.withdrawn, report.resubmitted) with
publisher confirms, as persistent messages, with the current trace context in the headers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import amqp.exceptions
import kombu
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from reportflow import schemas
from reportflow.shared.broker import broker_urls, broker_user
from reportflow.shared.config import Settings
from reportflow.shared.events import Event, encode, message_properties, new_report_id, oversize
from reportflow.shared.publishing import publish_span_attributes, publish_span_name
from reportflow.shared.trace_context import carrier_of_current

_tracer = trace.get_tracer("reportflow.producer")


class InvalidEvent(ValueError):
    def __init__(self, event_type: str, reasons: list[str]):
        super().__init__(f"invalid {event_type}: " + "; ".join(reasons))
        self.reasons = reasons


class MessageTooLarge(InvalidEvent):
    """Larger than REPORTFLOW_MAX_MESSAGE_BYTES: the consumers would refuse it, so it is not sent."""


class Unroutable(RuntimeError):
    """The broker had no queue for the message: reportflow's topology is not declared on this vhost."""


@dataclass(frozen=True)
class PublishedEvent:
    event_type: str
    message_id: str
    report_id: str | None
    trace_id: str | None


class ReportflowClient:
    def __init__(
        self,
        amqp_url: str | None = None,
        exchange: str | None = None,
        app_id: str = "upstream",
        validate: bool = True,
        max_message_bytes: int | None = None,
    ):
        settings = Settings.load()
        # kombu fails over between the nodes of a cluster given as alternates, one node per retry. A node
        # that is down answers at once, so the next is tried at once, not after kombu's 2, 4, 6 s waits.
        urls = broker_urls(amqp_url or settings.amqp_url)
        self._user_id = broker_user(urls[0])  # the broker vouches for it: consumers can trust who sent what
        self._retry_policy = {
            "max_retries": 2 * len(urls) + 1,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 2,
        }
        self._connection = kombu.Connection(
            urls, failover_strategy="round-robin", transport_options={"confirm_publish": True, **self._retry_policy}
        )
        self._exchange = kombu.Exchange(exchange or settings.exchange, type="topic", durable=True)
        self._app_id = app_id
        self._validate = validate
        self._max_bytes = max_message_bytes or settings.max_message_bytes
        self._returned: list[str] = []
        # Not declared from here: declaring needs the broker's configure permission, which an upstream's
        # least-privilege user does not have (docs/security.md). `reportflow topology declare` makes it.
        self._producer = kombu.Producer(
            self._connection, exchange=self._exchange, on_return=self._on_return, auto_declare=False
        )

    def __enter__(self) -> ReportflowClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._connection.release()

    def request_report(self, request: dict, message_id: str | None = None) -> PublishedEvent:
        """Ask for a report. A report_id is chosen here when the request has none, so the caller knows it."""
        request = {**request, "report_id": request.get("report_id") or new_report_id()}
        return self.publish("report.requested", request, message_id)

    def decide(
        self,
        report_id: str,
        stage: str,
        approver_email: str,
        approve: bool,
        comment: str | None = None,
        approver_id: str | None = None,
        message_id: str | None = None,
    ) -> PublishedEvent:
        approver = {"email": approver_email, **({"id": approver_id} if approver_id else {})}
        decided = {
            "report_id": report_id,
            "stage": stage,
            "approver": approver,
            "decision": "approve" if approve else "reject",
        }
        if comment:
            decided["comment"] = comment
        return self.publish("approval.decided", decided, message_id)

    def delegate(
        self,
        report_id: str,
        stage: str,
        approver_email: str,
        delegate_email: str,
        delegate_name: str | None = None,
        comment: str | None = None,
        message_id: str | None = None,
    ) -> PublishedEvent:
        """Hand an approver's decision on the open stage to a delegate."""
        delegate = {"email": delegate_email, **({"name": delegate_name} if delegate_name else {})}
        delegated = {
            "report_id": report_id,
            "stage": stage,
            "approver": {"email": approver_email},
            "delegate": delegate,
        }
        if comment:
            delegated["comment"] = comment
        return self.publish("approval.delegated", delegated, message_id)

    def withdraw(self, report_id: str, submitter_id: str, reason: str | None = None) -> PublishedEvent:
        withdrawn = {"report_id": report_id, "submitter": {"id": submitter_id}}
        if reason:
            withdrawn["reason"] = reason
        return self.publish("report.withdrawn", withdrawn)

    def resubmit(self, report_id: str, submitter_id: str, **revision) -> PublishedEvent:
        """Send a revision of a rejected report: any of title, data, approval_stages, comment."""
        return self.publish(
            "report.resubmitted", {"report_id": report_id, "submitter": {"id": submitter_id}, **revision}
        )

    def publish(self, event_type: str, payload: dict, message_id: str | None = None) -> PublishedEvent:
        if self._validate:
            reasons = schemas.errors(event_type, payload)
            if reasons:
                raise InvalidEvent(event_type, reasons)
        event = Event(event_type, payload, message_id or str(uuid.uuid4()))
        body = encode(event)
        too_large = oversize(body, self._max_bytes)
        if too_large:
            raise MessageTooLarge(event_type, [too_large])
        exchange = self._exchange.name
        with _tracer.start_as_current_span(
            publish_span_name(exchange, event_type),
            kind=SpanKind.PRODUCER,
            attributes=publish_span_attributes(
                exchange, event_type, message_id=event.message_id, report_id=event.report_id, body_size=len(body)
            ),
        ) as span:
            properties = message_properties(event, carrier_of_current(), app_id=self._app_id, user_id=self._user_id)
            headers = properties.pop("headers")
            self._returned.clear()
            try:
                self._producer.publish(
                    body,
                    routing_key=event_type,
                    headers=headers,
                    mandatory=True,
                    retry=True,
                    retry_policy=self._retry_policy,
                    **properties,
                )
            except amqp.exceptions.NotFound as missing:
                raise Unroutable(
                    f"exchange {exchange!r} does not exist on this vhost; run `reportflow topology declare`"
                ) from missing
            if event.message_id in self._returned:
                raise Unroutable(
                    f"no queue is bound for {event_type} on exchange {self._exchange.name!r}; "
                    "run `reportflow topology declare`"
                )
            span_context = span.get_span_context()
            trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else None
            return PublishedEvent(event_type, event.message_id, event.report_id, trace_id)

    def _on_return(self, exception, exchange, routing_key, message) -> None:
        self._returned.append(message.properties.get("message_id"))
