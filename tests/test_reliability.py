"""Nothing lost, nothing twice, in the runtime: retries, dead letters, bad input, duplicates, replays,
and a database that goes away. Real broker, real databases; consumers run in this process."""

from __future__ import annotations

import json
import subprocess
import threading
from datetime import UTC

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from reportflow.consumers import STAGE_NAMES
from reportflow.consumers.bootstrap import build_consumer, session_factory
from reportflow.consumers.retries import RetryPolicy, TransientError
from reportflow.consumers.runtime import Consumer
from reportflow.consumers.stage import Stage
from reportflow.producers import ReportflowClient
from reportflow.shared.config import Settings
from reportflow.shared.db import UnitOfWork, make_engine
from reportflow.shared.dead_letters import DeadLetterQueue
from reportflow.shared.models import InboxRecord, OutboxMessage, Report
from reportflow.shared.topology import Topology
from tests.helpers import (
    TEST_AMQP_URL,
    TEST_RETRY_TIERS,
    TEST_VHOST,
    count,
    dead_letters,
    example_payloads,
    raw_publish,
    running,
    sample_request,
    settled,
    wait_until,
)
from tests.proxy import TcpProxy

FAST = RetryPolicy(delays=(1, 1))


def stage_consumer(settings, handler, retry_policy=FAST, event_type="report.requested") -> Consumer:
    return Consumer(
        Stage("creation", {event_type: handler}), settings, session_factory(settings), {}, retry_policy=retry_policy
    )


def created_payload(report_id: str) -> dict:
    return {
        "report_id": report_id,
        "title": "t",
        "template": "standard",
        "submitter": {"email": "a@example.com"},
        "stages": ["s"],
    }


def test_a_transient_failure_is_retried_with_backoff_and_applied_once(
    settings_for, sqlite_url, tap, exchange, broker, finished_spans
):
    calls = []

    def flaky(event, uow):
        calls.append(event.message_id)
        if len(calls) < 3:
            raise TransientError("database restarting")
        uow.emit("report.created", created_payload("r-flaky"))

    with running(stage_consumer(settings_for(sqlite_url), flaky)) as consumer:
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            published = client.request_report(sample_request(report_id="r-flaky"))
        tap.wait_for("report.created", timeout=20)
        settled(consumer, 3)
    assert len(calls) == 3 and len(set(calls)) == 1
    assert dead_letters(broker, exchange) == []
    assert len([e for e in tap.drain() if e[0] == "report.created"]) == 1

    spans = [s for s in finished_spans() if format(s.context.trace_id, "032x") == published.trace_id]
    retries = [s for s in spans if s.name == f"retry {exchange}.creation"]
    processes = [s for s in spans if s.name.startswith("process ")]
    assert [r.attributes["reportflow.attempts"] for r in retries] == [1, 2]
    assert len(processes) == 3  # every attempt is in the report's trace
    assert [p.status.is_ok for p in processes] == [False, False, True]


def test_what_keeps_failing_is_dead_lettered_after_its_attempts_and_the_consumer_keeps_serving(
    settings_for, sqlite_url, tap, exchange, broker
):
    def always_down(event, uow):
        if event.payload["report_id"] == "r-doomed":
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        uow.emit("report.created", created_payload(event.payload["report_id"]))

    with running(stage_consumer(settings_for(sqlite_url), always_down)) as consumer:
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            doomed = client.request_report(sample_request(report_id="r-doomed"))
            client.request_report(sample_request(report_id="r-fine"))
        tap.wait_for("report.created")
        settled(consumer, 4)  # 3 attempts + the fine one
    [(headers, _)] = dead_letters(broker, exchange)
    assert headers["x-reportflow-attempt"] == FAST.max_attempts == 3
    assert headers["x-reportflow-stage"] == "creation"
    assert "OperationalError" in headers["x-reportflow-error"] and "connection refused" in headers["x-reportflow-error"]
    assert headers["x-reportflow-first-failure"] < headers["x-reportflow-dead-lettered-at"]
    assert doomed.trace_id in headers["traceparent"]  # kept, so a replay continues the trace


def test_an_emitted_event_no_queue_takes_is_dead_lettered_itself_and_replayed_once_a_queue_is_bound(
    settings_for, sqlite_url, exchange, broker
):
    def emits_unroutable(event, uow):
        uow.emit("report.created", created_payload("r-unroutable"))

    settings = settings_for(sqlite_url)
    # Bound only to its own event: report.created has no queue, so publishing it is refused.
    consumer = stage_consumer(settings, emits_unroutable)
    with running(consumer):
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            request = client.request_report(sample_request(report_id="r-unroutable"))
        settled(consumer, 1)
        [letter] = wait_until(
            lambda: DeadLetterQueue(TEST_AMQP_URL, consumer.topology).list(), 20, what="a dead letter"
        )
    # The event that could not go anywhere waits under its own name; the request was handled and acked.
    assert (letter.event_type, letter.stage) == ("report.created", "creation")
    assert letter.error.startswith("unroutable: no queue takes report.created")
    assert request.trace_id in letter.headers["traceparent"]
    assert broker.channel().queue_declare(f"{exchange}.creation", passive=True).method.message_count == 0
    with session_factory(settings)() as session:  # it left the outbox, so the relay will not send it again
        [published_at] = session.scalars(select(OutboxMessage.published_at)).all()
    assert published_at is not None

    channel = broker.channel()
    channel.queue_declare(f"{exchange}.late-stage", exclusive=True)
    channel.queue_bind(f"{exchange}.late-stage", exchange, routing_key="report.created")
    [replayed] = DeadLetterQueue(TEST_AMQP_URL, consumer.topology).replay()
    assert replayed.message_id == letter.message_id
    method, properties, body = channel.basic_get(f"{exchange}.late-stage", auto_ack=True)
    assert properties.type == "report.created" and json.loads(body)["report_id"] == "r-unroutable"
    assert "x-reportflow-error" not in properties.headers and request.trace_id in properties.headers["traceparent"]


def test_a_permanent_failure_is_dead_lettered_at_once(settings_for, sqlite_url, exchange, broker):
    def buggy(event, uow):
        raise KeyError("no such field")

    with running(stage_consumer(settings_for(sqlite_url), buggy)) as consumer:
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            client.request_report(sample_request())
        settled(consumer, 1)
    [(headers, _)] = dead_letters(broker, exchange)
    assert headers["x-reportflow-attempt"] == 1 and headers["x-reportflow-error"] == "KeyError: 'no such field'"


def oversized_table_request() -> bytes:
    request = sample_request()
    request["data"]["table"]["rows"] = [["x"] * 5] * 5001
    return json.dumps(request).encode()


BAD_INPUTS = {
    "not-json": (dict(content_type="application/json", type="report.requested"), b"{oops", "not UTF-8 JSON"),
    "wrong-content-type": (dict(content_type="text/csv", type="report.requested"), b"a,b", "content type 'text/csv'"),
    "schema-violation": (
        dict(content_type="application/json", type="report.requested"),
        json.dumps({"title": 1}).encode(),
        "is not of type 'string'",
    ),
    "over-size-limit": (
        dict(content_type="application/json", type="report.requested"),
        b" " * 70_000,
        "over the limit of 65536",
    ),
    "table-over-row-limit": (
        dict(content_type="application/json", type="report.requested"),
        oversized_table_request(),
        "data/table/rows",
    ),
}


def test_every_bad_request_ends_in_report_invalid_with_its_reason(settings_for, sqlite_url, tap, exchange, broker):
    settings = settings_for(sqlite_url, max_message_bytes=65536 * 8)
    with running(build_consumer("creation", settings)) as consumer:
        for name, (properties, body, _) in BAD_INPUTS.items():
            limit_test = name == "over-size-limit"
            raw_publish(
                exchange,
                "report.requested",
                body if not limit_test else b" " * (65536 * 8 + 1),
                message_id=name,
                **properties,
            )
        invalid = tap.wait_for("report.invalid", len(BAD_INPUTS))
        settled(consumer, len(BAD_INPUTS))
    reasons = {e[1]["request_message_id"]: " ".join(e[1]["reasons"]) for e in invalid}
    for name, (_, _, expected) in BAD_INPUTS.items():
        expected = "over the limit" if name == "over-size-limit" else expected
        assert expected in reasons[name], (name, reasons[name])
    assert dead_letters(broker, exchange) == []


def test_unknown_event_types_are_dead_lettered_and_bad_trace_headers_do_not_matter(
    settings_for, sqlite_url, tap, exchange, broker
):
    body = json.dumps(sample_request(report_id="r-tp")).encode()
    with running(build_consumer("creation", settings_for(sqlite_url))) as consumer:
        raw_publish(
            exchange,
            "report.requested",
            b"{}",
            content_type="application/json",
            type="report.exploded",
            message_id="unknown-type",
        )
        raw_publish(
            exchange,
            "report.requested",
            body,
            content_type="application/json",
            type="report.requested",
            message_id="garbled",
            headers={"traceparent": "00-zzzz-not-a-trace-01", "uber-trace-id": "::"},
        )
        raw_publish(
            exchange,
            "report.requested",
            json.dumps(sample_request(report_id="r-none")).encode(),
            content_type="application/json",
            type="report.requested",
            message_id="no-headers",
        )
        created = tap.wait_for("report.created", 2)
        settled(consumer, 3)
    assert {e[1]["report_id"] for e in created} == {"r-tp", "r-none"}
    assert all(e[2].headers["traceparent"].startswith("00-") for e in created)  # a new, valid trace each
    [(headers, _)] = dead_letters(broker, exchange)
    assert "unknown event type 'report.exploded'" in headers["x-reportflow-error"]


def test_duplicates_and_a_replayed_dead_letter_apply_once(settings_for, database_url, tap, exchange, broker):
    broken = threading.Event()
    broken.set()

    def sometimes_broken(event, uow):
        if broken.is_set():
            raise ValueError("bug in this version")
        uow.add(
            Report(
                id=event.payload["report_id"],
                title="t",
                template="standard",
                status="created",
                submitter={},
                client={},
                data={},
            )
        )
        uow.emit("report.created", created_payload(event.payload["report_id"]))

    settings = settings_for(database_url)
    with running(stage_consumer(settings, sometimes_broken)) as consumer:
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            client.request_report(sample_request(report_id="r-replay"), message_id="m-replay")
        settled(consumer, 1)
        broken.clear()  # the fix is deployed
        dlq = DeadLetterQueue(TEST_AMQP_URL, Topology(exchange))
        assert [d.message_id for d in dlq.list()] == ["m-replay"]
        assert [d.message_id for d in dlq.replay("m-replay")] == ["m-replay"]
        tap.wait_for("report.created")
        settled(consumer, 2)
        # The same message again, twice: published by a retrying upstream, and replayed by hand.
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            client.request_report(sample_request(report_id="r-replay"), message_id="m-replay")
        raw_publish(
            "",
            f"{exchange}.creation",
            json.dumps(sample_request(report_id="r-replay")).encode(),
            content_type="application/json",
            type="report.requested",
            message_id="m-replay",
        )
        settled(consumer, 4)
    assert len([e for e in tap.drain() if e[0] == "report.created"]) == 1
    assert count(database_url, Report) == 1
    assert count(database_url, InboxRecord) == 1
    assert dlq.list() == []


@pytest.fixture
def postgres_behind_proxy(postgres_url):
    proxy = TcpProxy(5432)
    yield proxy, postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    proxy.close()


@pytest.mark.parametrize("bookkeeping_traced", [False, True], ids=["to-the-driver", "through-sqlalchemy"])
def test_the_inbox_claim_and_the_outbox_row_read_back_as_written_whichever_way_they_went(
    database_url, bookkeeping_traced
):
    """On PostgreSQL the runtime's claim and outbox row go to the driver, below SQLAlchemy's events (unless
    their SQL is to be traced): they must write what the SQLAlchemy path writes, and a duplicate must be seen."""
    engine = make_engine(database_url)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda conn, cursor, statement, *rest: statements.append(statement))
    factory = sessionmaker(engine, expire_on_commit=False)
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "baggage": "tenant=a"}
    payload = example_payloads("r-bookkeeping")["report.generated"]
    try:
        with UnitOfWork(factory, "generation", bookkeeping_traced=bookkeeping_traced) as unit:
            assert unit.claim("m-bookkeeping", "report.created")
            unit.emit("report.generated", payload)
            [(outbox_id, emitted)] = unit.commit(headers)
        with UnitOfWork(factory, "generation", bookkeeping_traced=bookkeeping_traced) as unit:
            assert not unit.claim("m-bookkeeping", "report.created")  # processed before
        with factory() as session:
            row = session.get(OutboxMessage, outbox_id)
            assert (row.message_id, row.event_type, row.payload, row.headers, row.source, row.published_at) == (
                emitted.message_id, "report.generated", payload, headers, "generation", None
            )  # fmt: skip
            assert session.get(InboxRecord, ("generation", "m-bookkeeping")).event_type == "report.created"
        through_sqlalchemy = bookkeeping_traced or engine.dialect.name != "postgresql"
        assert any(s.startswith("INSERT INTO outbox") for s in statements) == through_sqlalchemy, statements
        assert any(s.startswith("INSERT INTO inbox") for s in statements) == through_sqlalchemy, statements
    finally:
        engine.dispose()


def test_a_connection_lost_under_the_drivers_claim_fails_as_sqlalchemy_says_it_and_leaves_the_pool(postgres_url):
    """The claim that goes to the driver must fail as it would through SQLAlchemy: its OperationalError, which
    the retry policy takes as transient, and the dead connection gone from the pool."""
    engine = make_engine(postgres_url)
    factory = sessionmaker(engine, expire_on_commit=False)
    try:
        with UnitOfWork(factory, "generation") as unit:
            backend = unit.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with engine.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
            with pytest.raises(OperationalError) as raised:
                unit.claim("m-lost", "report.created")
        assert raised.value.connection_invalidated and RetryPolicy().is_transient(raised.value)
        with UnitOfWork(factory, "generation") as unit:  # a fresh connection
            assert unit.claim("m-lost", "report.created")
    finally:
        engine.dispose()


def test_a_database_outage_is_retried_through_and_nothing_reaches_the_dead_letter_queue(
    settings_for, postgres_behind_proxy, tap, exchange, broker
):
    import time

    proxy, url = postgres_behind_proxy
    consumer = build_consumer("creation", settings_for(url, retry_delays=TEST_RETRY_TIERS))
    with running(consumer):
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            client.request_report(sample_request(report_id="r-before"))
            tap.wait_for("report.created")
            proxy.cut()
            for n in range(5):
                client.request_report(sample_request(report_id=f"r-outage-{n}"))
            time.sleep(4)
            proxy.restore()
        created = tap.wait_for("report.created", 6, timeout=60)
    assert {e[1]["report_id"] for e in created} == {"r-before", *{f"r-outage-{n}" for n in range(5)}}
    assert dead_letters(broker, exchange) == []
    assert consumer.connections_opened == 1
    assert count(url.replace(f"127.0.0.1:{proxy.port}", "127.0.0.1:5432"), Report) == 6


@pytest.mark.parametrize("locked", ["inbox", "reports"], ids=["the-claim", "the-handlers-own-sql"])
def test_a_statement_the_database_holds_up_fails_within_the_timeout_and_the_broker_connection_stays(
    settings_for, postgres_url, tap, exchange, broker, locked
):
    """Creation is handled on the I/O thread, so a statement that waits sends no heartbeats meanwhile. A
    lock held past the heartbeat timeout must cost the messages a retry, not the consumer its connection;
    and a batch that meets it, at its claim or in a handler, waits it out once, not once for each message."""
    import time

    settings = settings_for(
        postgres_url, retry_delays=TEST_RETRY_TIERS, heartbeat_seconds=2, database_timeout_seconds=1
    )
    consumer = build_consumer("creation", settings)
    assert consumer.worker_threads == 0  # the path this is about
    engine = make_engine(postgres_url)
    try:
        with running(consumer), ReportflowClient(TEST_AMQP_URL, exchange) as client:
            client.request_report(sample_request(report_id="r-before"))
            tap.wait_for("report.created")
            with engine.connect() as holder:
                holder.execute(text(f"LOCK TABLE {locked} IN ACCESS EXCLUSIVE MODE"))
                held = [f"r-held-{n}" for n in range(8)]
                for report_id in held:
                    client.request_report(sample_request(report_id=report_id))
                time.sleep(7)
                holder.rollback()
            created = tap.wait_for("report.created", 1 + len(held), timeout=60)
    finally:
        engine.dispose()
    assert {e[1]["report_id"] for e in created} == {"r-before", *held}
    assert consumer.connections_opened == 1
    assert dead_letters(broker, exchange) == []


def test_a_database_that_accepts_and_never_answers_fails_the_connect_within_the_timeout(
    settings_for, postgres_behind_proxy, tap, exchange, broker
):
    """A server that takes the connection and says nothing (a host going down, a proxy wedged): libpq would
    wait for its greeting forever, on the I/O thread. It must fail as transient, and serve once it answers."""
    import time

    proxy, url = postgres_behind_proxy
    consumer = build_consumer("creation", settings_for(url, retry_delays=TEST_RETRY_TIERS, database_timeout_seconds=2))
    with running(consumer), ReportflowClient(TEST_AMQP_URL, exchange) as client:
        client.request_report(sample_request(report_id="r-before"))
        tap.wait_for("report.created")
        proxy.stall()
        client.request_report(sample_request(report_id="r-stalled"))
        time.sleep(5)
        proxy.restore()
        created = tap.wait_for("report.created", 2, timeout=60)
    assert {e[1]["report_id"] for e in created} == {"r-before", "r-stalled"}
    assert consumer.connections_opened == 1
    assert dead_letters(broker, exchange) == []


def test_only_the_databases_own_failures_count_as_the_database_away(postgres_url):
    """A batch that meets the database away retries every message; one that meets one message's bad data
    handles each alone. The errors here are the server's own."""
    from sqlalchemy.exc import DBAPIError

    from reportflow.consumers.retries import database_away
    from tests.helpers import free_port

    def raised(url: str, sql: str, **engine_options) -> DBAPIError:
        engine = make_engine(url, **engine_options)
        try:
            with pytest.raises(DBAPIError) as caught, engine.begin() as connection:
                connection.execute(text(sql))
            return caught.value
        finally:
            engine.dispose()

    assert database_away(raised(postgres_url, "SELECT pg_sleep(5)", timeout_seconds=0.5))
    closed_port = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{free_port()}")
    assert database_away(raised(closed_port, "SELECT 1"))
    assert not database_away(raised(postgres_url, "SELECT 'not a number'::int"))
    assert not database_away(raised(postgres_url, "SELECT * FROM no_such_table"))


def test_the_timeouts_reach_the_driver_and_a_urls_own_settings_win(postgres_url):
    engine = make_engine(postgres_url + "?keepalives_idle=7", timeout_seconds=3)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar_one() == "3s"
            parameters = {
                option.keyword.decode(): (option.val or b"").decode()
                for option in connection.connection.dbapi_connection.pgconn.info
            }
    finally:
        engine.dispose()
    assert parameters["connect_timeout"] == "3"
    assert parameters["tcp_user_timeout"] == "3000"
    assert parameters["keepalives"] == "1"
    assert parameters["keepalives_idle"] == "7"  # the URL's
    untimed = make_engine(postgres_url)
    try:
        with untimed.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar_one() == "0"
    finally:
        untimed.dispose()


def test_the_relay_publishes_what_a_crash_left_in_the_outbox(settings_for, sqlite_url, tap):
    from datetime import datetime, timedelta

    from reportflow.shared.models import OutboxMessage

    settings = settings_for(sqlite_url, outbox_relay_seconds=1)
    factory = session_factory(settings)
    with factory() as session, session.begin():  # committed, then the process died before publishing
        session.add(
            OutboxMessage(
                message_id="left-behind",
                event_type="report.created",
                payload=created_payload("r-orphan"),
                source="creation",
                headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
                created_at=datetime.now(UTC) - timedelta(minutes=5),
            )
        )
    with running(build_consumer("creation", settings)):
        [(_, payload, properties)] = tap.wait_for("report.created", timeout=20)
    assert payload["report_id"] == "r-orphan" and properties.message_id == "left-behind"
    assert "4bf92f3577b34da6a3ce929d0e0e4736" in properties.headers["traceparent"]  # still the report's trace
    with factory() as session:
        assert session.get(OutboxMessage, 1).published_at is not None


def test_quorum_work_queues_carry_a_delivery_limit_and_serve(settings_for, sqlite_url, tap, exchange, broker):
    with running(build_consumer("creation", settings_for(sqlite_url, queue_type="quorum", delivery_limit=5))):
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            client.request_report(sample_request(report_id="r-quorum"))
        tap.wait_for("report.created")
    listing = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", TEST_VHOST, "name", "type", "arguments", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    types = {line.split("\t")[0]: line for line in listing.splitlines() if line.startswith(f"{exchange}.")}
    assert "x-delivery-limit" in types[f"{exchange}.creation"]
    ours = Topology(exchange, retry_delays=Settings.retry_delays).all_queues(STAGE_NAMES)  # work, tiers, DLQ
    assert set(ours) <= set(types) and all("\tquorum\t" in types[q] for q in ours), types


def test_a_topology_of_another_queue_type_stops_the_process_with_the_reason(tmp_path, exchange, broker, sqlite_url):
    """Classic queues exist; a consumer asked for quorum ones says why it cannot run, and exits."""
    from tests.pipeline import Pipeline

    broker.channel().queue_declare(f"{exchange}.creation", durable=True)
    pipeline = Pipeline(
        tmp_path,
        {
            "REPORTFLOW_AMQP_URL": TEST_AMQP_URL,
            "REPORTFLOW_EXCHANGE": exchange,
            "REPORTFLOW_DATABASE_URL": sqlite_url,
            "REPORTFLOW_QUEUE_TYPE": "quorum",
            "TRACING_ENABLED": "false",
        },
        names=("creation",),
    )
    try:
        pipeline.start()
        wait_until(pipeline.exited, 60, what="the consumer to stop")
        assert pipeline.processes["creation"].returncode == 2
        assert "REPORTFLOW_QUEUE_TYPE=quorum does not match what is there" in pipeline.logs()
    finally:
        pipeline.close()
