"""The runtime's timer poller on both databases, with no broker: what is due is fired once, in the trace it
was set in; two pollers of a stage never both act on one timer; a failing timer is tried again, then
given up with its reason."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from datetime import timedelta

from opentelemetry import trace
from prometheus_client import REGISTRY
from sqlalchemy import select

from reportflow.consumers.cli import _timer_lines
from reportflow.consumers.retries import RetryPolicy
from reportflow.consumers.runtime import Processor
from reportflow.consumers.runtime.metrics import RuntimeMetrics
from reportflow.consumers.runtime.telemetry import Telemetry
from reportflow.consumers.runtime.timers import TimerPoller
from reportflow.consumers.stage import Stage
from reportflow.shared.config import Settings, TracingSettings
from reportflow.shared.models import Timer, utcnow
from reportflow.shared.trace_context import carrier_of_current

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
STAGE = "stage"


class Published:
    """Where the poller hands what a timer emitted: the broker's side is the consumer's, tested elsewhere."""

    def __init__(self):
        self.messages = []

    def __call__(self, messages) -> Future:
        self.messages += messages
        done: Future = Future()
        done.set_result(None)
        return done


def poller_for(session_factory, handler, tracer_provider=None, retry_delays=(0, 0)) -> tuple[TimerPoller, Published]:
    stage = Stage(STAGE, handlers={}, timers={"stage.ping_due": handler})
    telemetry = Telemetry(stage, TracingSettings(), session_factory, ("127.0.0.1", 5672), tracer_provider)
    processor = Processor(
        stage, session_factory, {}, telemetry, RetryPolicy(()), queue="q", exchange="x", max_message_bytes=1 << 20
    )
    published = Published()
    poller = TimerPoller(
        STAGE,
        session_factory,
        processor,
        telemetry,
        published,
        poll_seconds=0.1,
        lease_seconds=30,
        retry_delays=retry_delays,
        counted=RuntimeMetrics(STAGE).timers,
    )
    return poller, published


def counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("reportflow_timers_total", {"stage": STAGE, "outcome": outcome}) or 0


def set_timer(session_factory, due_in: timedelta = timedelta(0), **state) -> None:
    """A due (or later) timer of the test's stage; state: any other columns, as a poller would have left them."""
    values = {
        "message_id": "timer-1",
        "stage": STAGE,
        "key": "k",
        "event_type": "stage.ping_due",
        "payload": {"report_id": "r-1"},
        "headers": {"traceparent": TRACEPARENT},
        "due_at": utcnow() + due_in,
        "attempts": 0,
    }
    with session_factory() as session, session.begin():
        session.add(Timer(**{**values, **state}))


def the_timer(session_factory) -> Timer:
    with session_factory() as session:
        return session.scalars(select(Timer)).one()


def test_a_due_timer_fires_once_in_the_trace_it_was_set_in(session_factory, tracer_provider, finished_spans):
    contexts = []

    def on_ping(event, uow):
        contexts.append(carrier_of_current())
        uow.emit("report.approved", {"report_id": event.report_id, "stages": []})

    set_timer(session_factory, due_in=timedelta(hours=1))
    poller, published = poller_for(session_factory, on_ping, tracer_provider)
    fired_before = counted("fired")
    assert poller.fire_due() == 0  # not due yet
    with session_factory() as session, session.begin():
        session.scalars(select(Timer)).one().due_at = utcnow()
    assert poller.fire_due() == 1
    assert poller.fire_due() == 0
    assert [m.event_type for m in published.messages] == ["report.approved"]
    assert counted("fired") == fired_before + 1
    assert the_timer(session_factory).fired_at is not None
    [span] = [s for s in finished_spans() if s.name == "timer stage.ping_due"]
    assert format(span.context.trace_id, "032x") == TRACEPARENT.split("-")[1]
    assert span.parent.span_id == int(TRACEPARENT.split("-")[2], 16)
    assert span.kind == trace.SpanKind.INTERNAL
    assert contexts[0]["traceparent"].split("-")[2] == format(span.context.span_id, "016x")


def test_two_pollers_of_a_stage_act_on_a_timer_once(session_factory):
    calls = []
    started, release = threading.Event(), threading.Event()

    def slow_ping(event, uow):
        calls.append(event.message_id)
        started.set()
        release.wait(10)

    set_timer(session_factory)
    first, _ = poller_for(session_factory, slow_ping)
    second, _ = poller_for(session_factory, slow_ping)
    worker = threading.Thread(target=first.fire_due)
    worker.start()
    assert started.wait(10)
    assert second.fire_due() == 0  # leased by the first
    release.set()
    worker.join(10)
    with session_factory() as session, session.begin():  # as if the first's mark were lost: fired again
        timer = session.scalars(select(Timer)).one()
        timer.fired_at, timer.leased_until = None, None
    assert second.fire_due() == 1
    assert calls == ["timer-1"]  # the inbox made the second firing a no-op
    assert the_timer(session_factory).fired_at is not None


def test_a_failing_timer_is_tried_again_then_given_up_with_its_reason(session_factory):
    def broken(event, uow):
        raise RuntimeError("template missing")

    set_timer(session_factory)
    poller, published = poller_for(session_factory, broken, retry_delays=(0,))
    before = {outcome: counted(outcome) for outcome in ("retried", "given_up")}
    assert poller.fire_due() == 1
    timer = the_timer(session_factory)
    assert (timer.attempts, timer.cancelled_at, timer.last_error) == (1, None, "RuntimeError: template missing")
    assert poller.fire_due() == 1
    timer = the_timer(session_factory)
    assert timer.cancelled_at is not None and timer.fired_at is None
    assert timer.last_error == "given up after 2 attempts: RuntimeError: template missing"
    assert poller.fire_due() == 0 and published.messages == []
    assert {outcome: counted(outcome) - before[outcome] for outcome in before} == {"retried": 1, "given_up": 1}


def test_status_counts_each_stages_waiting_due_and_given_up_timers(session_factory, database_url):
    set_timer(session_factory, due_in=timedelta(hours=1))
    given_up = "given up after 5 attempts: boom"
    set_timer(session_factory, message_id="timer-2", attempts=5, cancelled_at=utcnow(), last_error=given_up)
    lines = _timer_lines(Settings(database_url=database_url))
    assert lines == [f"timers of {STAGE:<13} waiting 1  due 0  given up 1", ""]
