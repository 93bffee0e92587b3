"""What the tests share: where the test services are, waiting, sample requests and events, running a
handler as the runtime does, and running a consumer in a thread. Test modules import from here (and use
the fixtures in conftest.py), never from each other."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pika
from opentelemetry import context
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from reportflow.consumers import approval, creation
from reportflow.consumers.retries import RetryPolicy
from reportflow.consumers.runtime import Consumer, Processor
from reportflow.consumers.runtime.telemetry import Telemetry
from reportflow.consumers.stage import Stage, dependency_names
from reportflow.shared.config import TracingSettings
from reportflow.shared.db import make_engine
from reportflow.shared.events import Event, InvalidMessage
from reportflow.shared.models import Refusal, Report, Timer, utcnow
from reportflow.shared.trace_context import context_from

ROOT = Path(__file__).resolve().parents[1]
# The tests are an environment of their own: no config/<environment>.yaml applies to what they start
# (without this, a process run from the repository would read config/production.yaml).
os.environ["REPORTFLOW_ENV"] = "test"
TEST_VHOST = os.environ.get("REPORTFLOW_TEST_VHOST", "reportflow-test")
TEST_AMQP_URL = os.environ.get("REPORTFLOW_TEST_AMQP_URL", f"amqp://guest:guest@127.0.0.1:5672/{TEST_VHOST}")
TEST_PG_URL = os.environ.get("REPORTFLOW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/reportflow_test")


# The retry tiers tests set (besides the default ones): the broker fixture removes their queues.
TEST_RETRY_TIERS = (1, 2, 4, 8)


# Ports for servers a test starts come from below the kernel's ephemeral range: a port the kernel hands out
# (bind to 0) is one it may give, before the server binds it, to an outgoing connection of the many a test
# opens (cluster nodes, pools), and the server then fails with "address already in use".
_TEST_PORTS = range(27000, 32000)  # clear of the local cluster's ports (infra/rabbitmq-cluster.sh)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, and not one this process handed out before."""
    for port in random.sample(_TEST_PORTS, 200):
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_TEST_PORTS}")


def wait_until(condition, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sample_request(**overrides) -> dict:
    request = json.loads((ROOT / "producers" / "examples" / "q3-revenue.json").read_text())
    request.update(overrides)
    return request


# -- events and handlers, as the runtime runs them -----------------------------------------------
TWO_STAGES = [
    {"name": "review", "approvers": ["bob@example.com", "eve@example.com"], "rule": "all"},
    {"name": "sign-off", "approvers": ["carol@example.com", "dan@example.com"], "rule": "any"},
]


def handle(units, handler, message: Event | InvalidMessage, **dependencies) -> list[Event]:
    """Run one handler through the runtime's own processing (inbox claim, handler, outbox, one commit), in
    the message's trace context; the events it emitted are returned, an exception is raised. A handler that
    asks for a clock gets the real one unless the test gives its own."""
    if "clock" in dependency_names(handler):
        dependencies.setdefault("clock", utcnow)
    stage = Stage(
        _stage_name(handler),
        **(
            {"handlers": {}, "on_invalid": {message.type: handler}}
            if isinstance(message, InvalidMessage)
            else {"handlers": {message.type: handler}}
        ),
    )
    telemetry = Telemetry(stage, TracingSettings(), units.session_factory, ("127.0.0.1", 5672))
    processor = Processor(
        stage,
        units.session_factory,
        dependencies,
        telemetry,
        RetryPolicy(()),
        queue=f"test.{stage.name}",
        exchange="test",
        max_message_bytes=1_048_576,
    )
    carried = isinstance(message, Event) and message.trace_context
    token = context.attach(context_from(message.trace_context)) if carried else None
    try:
        outcome = processor.handle(message)
    finally:
        if token is not None:
            context.detach(token)
    assert outcome.dead_letter_reason is None, outcome.dead_letter_reason
    return [Event(m.event_type, m.payload, m.message_id) for m in outcome.publish]


def _stage_name(handler) -> str:
    """The stage that runs this handler (its inbox, its timers), whichever of the stage's modules has it."""
    from reportflow.consumers import STAGES

    for name, stage in STAGES.items():
        if handler in stage.all_handlers:
            return name
    return handler.__module__.rsplit(".", 1)[-1]


def request_event(**overrides) -> Event:
    return Event(
        "report.requested",
        sample_request(**overrides),
        trace_context={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )


def decide(report_id, stage, email, decision="approve", comment=None) -> Event:
    payload = {"report_id": report_id, "stage": stage, "approver": {"email": email}, "decision": decision}
    if comment:
        payload["comment"] = comment
    return Event("approval.decided", payload)


def generated_report(units, report_id: str, **overrides) -> str:
    """A report stored by creation, its draft generated: what approval starts from."""
    handle(units, creation.on_report_requested, request_event(report_id=report_id, **overrides))
    with units() as unit:
        unit.report(report_id).status = "generated"
        unit.session.commit()
    return report_id


def open_first_stage(uow, report_id: str) -> list[Event]:
    document = {"id": 1, "kind": "draft", "storage_key": "k", "size_bytes": 10, "sha256": "0" * 64, "pages": 1}
    return handle(
        uow, approval.on_report_generated, Event("report.generated", {"report_id": report_id, "document": document})
    )


DOCUMENT = {"id": 1, "kind": "draft", "storage_key": "bench", "size_bytes": 1, "sha256": "0" * 64, "pages": 1}


def first_event(report_id: str) -> dict:
    return {
        "report_id": report_id,
        "title": "t",
        "template": "standard",
        "submitter": {"email": "a@example.com"},
        "stages": ["s"],
    }


def example_payloads(report_id: str) -> dict[str, dict]:
    """A valid payload of every event type reportflow emits, for contract and benchmark chains."""
    return {
        "report.created": first_event(report_id),
        "report.generated": {"report_id": report_id, "document": DOCUMENT},
        "report.approved": {"report_id": report_id, "stages": []},
        "report.finalized": {"report_id": report_id, "title": "t", "document": DOCUMENT},
        "report.invalid": {"report_id": report_id, "submitter": None, "reasons": ["end"]},
    }


# -- a consumer in a thread ----------------------------------------------------------------------------
@contextmanager
def running(consumer: Consumer):
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    assert consumer.ready.wait(15), "consumer did not start"
    try:
        yield consumer
    finally:
        consumer.stop()
        thread.join(30)
        assert not thread.is_alive(), "consumer did not stop"


def settled(consumer: Consumer, count: int, timeout: float = 30):
    wait_until(lambda: consumer.messages_settled >= count, timeout, what=f"{count} settled messages")


def raw_publish(exchange: str, routing_key: str, body: bytes, **properties) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(TEST_AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(**properties))
    finally:
        connection.close()


def dead_letters(broker, exchange: str) -> list[tuple[dict, bytes]]:
    channel = broker.channel()
    found = []
    while True:
        method, properties, body = channel.basic_get(f"{exchange}.dead-letter", auto_ack=True)
        if method is None:
            return found
        found.append((properties.headers, body))


def report_status(database_url: str, report_id: str) -> str | None:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            report = session.get(Report, report_id)
            return report.status if report else None
    finally:
        engine.dispose()


def refusals(units) -> list[str]:
    """The reasons of every refusal recorded, in the database these units of work use."""
    with units() as unit:
        return [r.reason for r in unit.session.scalars(select(Refusal))]


def register_key(database_url: str, key: str, name: str, scopes: list[str]) -> None:
    """An API key as `reportflow apikey create` stores it (its digest), for a key the test chose."""
    from reportflow.shared.api_keys import digest
    from reportflow.shared.models import ApiKey

    engine = make_engine(database_url)
    try:
        with Session(engine) as session, session.begin():
            session.merge(ApiKey(name=name, key_sha256=digest(key), scopes=scopes))
    finally:
        engine.dispose()


def count(database_url: str, model, *where) -> int:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            return session.scalar(select(func.count()).select_from(model).where(*where))
    finally:
        engine.dispose()


class Clock:
    """A clock a test moves by hand: handlers that set timers are given it instead of the real one."""

    def __init__(self, now=None):
        self.now = now or utcnow()

    def __call__(self):
        return self.now

    def advance(self, **delta) -> None:
        self.now += timedelta(**delta)


def fire_due_timers(units, stage_handlers: dict, clock: Clock, **dependencies) -> list[Event]:
    """What the stage's timer poller does, with no broker: each timer due by the clock, not cancelled or
    fired, handled in due order and marked fired; the events they emitted are returned."""
    emitted = []
    while True:
        with units() as unit:
            timer = unit.session.scalars(
                select(Timer)
                .where(Timer.due_at <= clock(), Timer.fired_at.is_(None), Timer.cancelled_at.is_(None))
                .order_by(Timer.due_at, Timer.id)
            ).first()
            if timer is None:
                return emitted
            message = Event(timer.event_type, dict(timer.payload), timer.message_id)
            timer.fired_at = clock()
            unit.session.commit()
        emitted += handle(units, stage_handlers[message.type], message, clock=clock, **dependencies)
