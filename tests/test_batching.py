"""Batched commits under a backlog, against the real RabbitMQ and PostgreSQL: waiting deliveries share one
transaction, each keeping its own span, trace and outcome; a failing one is handled alone and its
neighbours' effects stand; an idle consumer handles a single message at once. Each on both paths: a stage that
waits only on the database, handled on the I/O thread, and one the operator gives a worker thread."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import sessionmaker

from reportflow.consumers import creation
from reportflow.consumers.bootstrap import build_consumer, session_factory
from reportflow.consumers.runtime import Consumer
from reportflow.consumers.stage import Stage
from reportflow.producers import ReportflowClient
from reportflow.shared.db import Effects, UnitOfWork, make_engine
from reportflow.shared.events import Event
from reportflow.shared.models import InboxRecord, OutboxMessage, Report
from reportflow.shared.topology import Topology, declare
from tests.helpers import TEST_AMQP_URL, count, dead_letters, running, sample_request, settled

HANDLED_ON = {"the I/O thread": {}, "a worker thread": {"concurrency": 1}}
handled_on = pytest.mark.parametrize("handled_on", HANDLED_ON)


def consumer_for(settings_for, postgres_url, tracer_provider, handler, handled_on: str) -> Consumer:
    settings = settings_for(postgres_url, batch_size=8, **HANDLED_ON[handled_on])
    stage = Stage("creation", {"report.requested": handler}, waits_only_on_database=True)
    sessions = session_factory(settings, tracer_provider)
    consumer = Consumer(stage, settings, sessions, {}, tracer_provider=tracer_provider)
    assert consumer.worker_threads == (0 if handled_on == "the I/O thread" else 1)
    return consumer


def backlog(broker, exchange: str, report_ids: list[str]) -> dict[str, str]:
    """Requests waiting in the stage's queue before its consumer starts; report id -> trace id."""
    declare(broker.channel(), Topology(exchange), {"creation": ["report.requested"]})
    with ReportflowClient(TEST_AMQP_URL, exchange) as client:
        return {r: client.request_report(sample_request(report_id=r)).trace_id for r in report_ids}


def process_spans(finished_spans, exchange: str) -> list:
    return [s for s in finished_spans() if s.name == f"process {exchange}:report.requested:{exchange}.creation"]


@handled_on
def test_a_backlog_is_committed_in_batches_each_message_in_its_own_trace(
    settings_for, postgres_url, tracer_provider, finished_spans, broker, exchange, tap, handled_on
):
    threads = set()

    def on_report_requested(event, uow):
        threads.add(threading.current_thread().name)
        creation.on_report_requested(event, uow)

    traces = backlog(broker, exchange, [f"r-b-{n}" for n in range(20)])
    consumer = consumer_for(settings_for, postgres_url, tracer_provider, on_report_requested, handled_on)
    with running(consumer):
        tap.wait_for("report.created", count=20)
        settled(consumer, 20)
    assert count(postgres_url, Report) == 20 and count(postgres_url, InboxRecord) == 20
    spans = process_spans(finished_spans, exchange)
    assert sorted(format(s.context.trace_id, "032x") for s in spans) == sorted(traces.values())
    sizes = [s.attributes.get("reportflow.batch.size", 1) for s in spans]
    assert max(sizes) > 1, "no batch formed from a backlog"
    on_workers = {name.startswith("creation-worker") for name in threads}
    assert on_workers == {handled_on == "a worker thread"}, threads
    created = {p["report_id"]: props for _, p, props in tap.drain() if _ == "report.created"}
    for report_id, trace_id in traces.items():  # what each emitted carries its own trace on
        assert created[report_id].headers["traceparent"].split("-")[1] == trace_id


@handled_on
def test_a_failing_message_leaves_its_batch_and_its_neighbours_effects_stand(
    settings_for, postgres_url, tracer_provider, finished_spans, broker, exchange, tap, handled_on
):
    def fails_on_bad(event, uow):
        creation.on_report_requested(event, uow)
        if event.payload["report_id"] == "r-bad":
            raise ValueError("this one cannot be stored")

    ids = [f"r-ok-{n}" for n in range(4)] + ["r-bad"] + [f"r-ok-{n}" for n in range(4, 8)]
    backlog(broker, exchange, ids)
    consumer = consumer_for(settings_for, postgres_url, tracer_provider, fails_on_bad, handled_on)
    with running(consumer):
        tap.wait_for("report.created", count=8)
        settled(consumer, 9)
    assert count(postgres_url, Report) == 8 and count(postgres_url, InboxRecord) == 8
    assert {p["report_id"] for t, p, _ in tap.drain() if t == "report.created"} == set(ids) - {"r-bad"}
    [(headers, _)] = dead_letters(broker, exchange)
    assert "this one cannot be stored" in headers["x-reportflow-error"]
    spans = [s for s in process_spans(finished_spans, exchange) if s.attributes.get("report.id") == "r-bad"]
    assert any(e.name == "taken out of its batch" for s in spans for e in s.events)
    assert any(s.status.status_code.name == "ERROR" for s in spans)  # handled alone, its failure on its span


@handled_on
def test_an_idle_consumer_handles_a_single_message_at_once(
    settings_for, postgres_url, tracer_provider, finished_spans, broker, exchange, tap, handled_on
):
    consumer = consumer_for(settings_for, postgres_url, tracer_provider, creation.on_report_requested, handled_on)
    with running(consumer):
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            client.request_report(sample_request(report_id="r-alone"))
        tap.wait_for("report.created")
        settled(consumer, 1)
    [span] = process_spans(finished_spans, exchange)
    assert "reportflow.batch.size" not in span.attributes


def test_a_stage_that_waits_only_on_the_database_batches_on_the_io_thread(settings_for, postgres_url, sqlite_url):
    """A worker thread would only add hand-offs, and a second would split its backlog's batches; a stage
    that waits on SMTP keeps its threads, and the operator's own setting wins over both."""

    def worker_threads(stage_name: str, database_url: str, **overrides) -> int:
        return build_consumer(stage_name, settings_for(database_url, **overrides)).worker_threads

    assert worker_threads("creation", postgres_url) == 0  # none: the I/O thread handles its deliveries
    assert worker_threads("approval", postgres_url) == 0
    assert worker_threads("notification", postgres_url) == 4
    assert worker_threads("creation", postgres_url, concurrency=3) == 3
    assert worker_threads("creation", postgres_url, batch_size=1) == 4  # no batches: threads overlap its waits
    assert worker_threads("creation", sqlite_url) == 1


@pytest.mark.parametrize("bookkeeping_traced", [False, True], ids=["on the driver's cursor", "through SQLAlchemy"])
def test_a_batchs_claims_and_outbox_rows_are_written_alike_on_either_path(postgres_url, bookkeeping_traced):
    """The batch's inbox claim and outbox rows, on psycopg's cursor or (tracing.runtime_sql) through SQLAlchemy:
    the ids not claimed before, and each handler's outbox rows, with their ids in order. Batches of several
    sizes, more of them than psycopg runs before it prepares a statement. On the driver's cursor, SQLAlchemy
    sees neither statement."""
    engine = make_engine(postgres_url)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda conn, cursor, statement, *rest: statements.append(statement))
    sessions = sessionmaker(engine, expire_on_commit=False)
    with UnitOfWork(sessions, "stage", bookkeeping_traced=bookkeeping_traced) as uow:
        assert uow.claim_all([("seen-before", "report.created")]) == {"seen-before"}
        uow.commit_all([])
    committed = []
    for batch in range(7):
        ids = [f"m-{batch}-{n}" for n in range(batch + 1)]
        with UnitOfWork(sessions, "stage", bookkeeping_traced=bookkeeping_traced) as uow:
            claimed = uow.claim_all([(m, "report.created") for m in [*ids, "seen-before"]])
            assert claimed == set(ids)
            handled = [
                (Effects([Event("report.generated", {"n": n, "batch": batch}) for _ in range(n % 3)]), {"n": str(n)})
                for n in range(batch + 1)
            ]
            for (effects, headers), rows in zip(handled, uow.commit_all(handled), strict=True):
                assert [emitted for _, emitted in rows] == effects.emitted
                committed += [(outbox_id, emitted, headers) for outbox_id, emitted in rows]
    with sessions() as session:
        stored = {row.id: row for row in session.scalars(select(OutboxMessage))}
        inbox = session.scalars(select(InboxRecord)).all()
    engine.dispose()
    assert any(s.startswith("INSERT INTO inbox") for s in statements) == bookkeeping_traced, statements
    assert any(s.startswith("INSERT INTO outbox") for s in statements) == bookkeeping_traced, statements
    assert len(stored) == len(committed) == sum(n % 3 for batch in range(7) for n in range(batch + 1))
    for outbox_id, emitted, headers in committed:
        row = stored[outbox_id]
        assert (row.message_id, row.event_type, row.payload, row.headers, row.source) == (
            emitted.message_id,
            emitted.type,
            emitted.payload,
            headers,
            "stage",
        )
        assert row.created_at is not None and row.published_at is None
    assert len(inbox) == 1 + sum(range(1, 8))
    assert {(r.consumer, r.event_type) for r in inbox} == {("stage", "report.created")}
    assert all(r.processed_at is not None for r in inbox)
