"""The consumer runtime against the real RabbitMQ (own vhost) and both databases."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pika
import pytest

from reportflow.consumers.bootstrap import build_consumer, session_factory
from reportflow.consumers.confirms import PipelinedConfirms
from reportflow.consumers.runtime import Consumer
from reportflow.consumers.stage import Stage
from reportflow.producers import ReportflowClient, Unroutable
from reportflow.producers.client import InvalidEvent
from reportflow.shared.models import InboxRecord, OutboxMessage, Report
from reportflow.shared.startup_heap import freeze_startup_objects
from tests.helpers import (
    TEST_AMQP_URL,
    count,
    dead_letters,
    free_port,
    raw_publish,
    running,
    sample_request,
    settled,
)


def test_a_request_is_stored_and_report_created_published_after_the_commit(settings_for, database_url, tap, exchange):
    settings = settings_for(database_url)
    with running(build_consumer("creation", settings)) as consumer:
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            published = client.request_report(sample_request(report_id="r-rt-1"))
        [(_, created, properties)] = tap.wait_for("report.created")
        settled(consumer, 1)
    assert created["report_id"] == "r-rt-1"
    assert properties.delivery_mode == 2 and properties.content_type == "application/json"
    assert properties.correlation_id == "r-rt-1" and properties.type == "report.created"
    assert published.trace_id in properties.headers["traceparent"]
    assert count(database_url, Report) == 1
    assert count(database_url, OutboxMessage, OutboxMessage.published_at.is_(None)) == 0
    assert count(database_url, InboxRecord, InboxRecord.consumer == "creation") == 1


def test_a_duplicated_message_id_has_one_effect(settings_for, database_url, tap, exchange):
    settings = settings_for(database_url)
    with running(build_consumer("creation", settings)) as consumer:
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            for _ in range(3):
                client.request_report(sample_request(report_id="r-rt-2"), message_id="same-message")
        settled(consumer, 3)
    assert len([e for e in tap.drain() if e[0] == "report.created"]) == 1
    assert not [e for e in tap.drain() if e[0] == "report.invalid"]
    assert count(database_url, Report) == 1


def test_each_ack_reaches_the_broker_while_the_consumer_keeps_running(settings_for, database_url, broker, exchange):
    # With a prefetch window of one, the broker gives the next delivery only once the last one's ack has
    # arrived: five settled in turn means each ack went out, though none is flushed on its own.
    settings = settings_for(database_url, prefetch=1, concurrency=1)
    with running(build_consumer("creation", settings)) as consumer:
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            for n in range(5):
                client.request_report(sample_request(report_id=f"r-rt-ack-{n}"))
        settled(consumer, 5)
    assert broker.channel().queue_declare(f"{exchange}.creation", passive=True).method.message_count == 0


def test_malformed_requests_become_report_invalid_and_the_consumer_keeps_serving(
    settings_for, sqlite_url, tap, exchange
):
    with running(build_consumer("creation", settings_for(sqlite_url))) as consumer:
        raw_publish(
            exchange,
            "report.requested",
            b"{definitely not json",
            content_type="application/json",
            message_id="bad-1",
            type="report.requested",
        )
        raw_publish(
            exchange,
            "report.requested",
            json.dumps({"title": "No submitter"}).encode(),
            content_type="application/json",
            message_id="bad-2",
            type="report.requested",
        )
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            client.request_report(sample_request(report_id="r-rt-3"))
        invalid = tap.wait_for("report.invalid", 2)
        tap.wait_for("report.created")
        settled(consumer, 3)
    reasons = {e[1]["request_message_id"]: e[1]["reasons"] for e in invalid}
    assert "not UTF-8 JSON" in reasons["bad-1"][0]
    assert any("'submitter' is a required property" in r for r in reasons["bad-2"])


def test_a_request_in_a_contract_version_this_consumer_does_not_read_is_answered(
    settings_for, sqlite_url, tap, exchange
):
    with running(build_consumer("creation", settings_for(sqlite_url))) as consumer:
        raw_publish(
            exchange,
            "report.requested",
            json.dumps(sample_request(report_id="r-v2")).encode(),
            content_type="application/json",
            message_id="v2-1",
            type="report.requested",
            headers={"schema_version": "2"},
        )
        [(_, invalid, _)] = tap.wait_for("report.invalid")
        settled(consumer, 1)
    assert invalid["report_id"] == "r-v2" and "schema_version '2'" in invalid["reasons"][0]


def test_what_no_handler_can_read_or_handle_is_dead_lettered_with_its_reason(
    settings_for, sqlite_url, broker, exchange
):
    with running(build_consumer("generation", settings_for(sqlite_url))) as consumer:
        raw_publish(
            exchange,
            "report.created",
            b"\x00garbage",
            content_type="application/json",
            message_id="poison-1",
            type="report.created",
        )
        raw_publish(
            exchange,
            "report.created",
            json.dumps(
                {
                    "report_id": "nobody",
                    "title": "t",
                    "template": "standard",
                    "submitter": {"email": "a@example.com"},
                    "stages": ["s"],
                }
            ).encode(),
            content_type="application/json",
            message_id="orphan-1",
            type="report.created",
        )
        settled(consumer, 2)
    letters = {h["x-reportflow-error"].split(":")[0]: h for h, _ in dead_letters(broker, exchange)}
    assert set(letters) == {"body is not UTF-8 JSON", "ReportNotFound"}
    for headers in letters.values():
        assert headers["x-reportflow-stage"] == "generation"
        assert headers["x-reportflow-queue"] == f"{exchange}.generation"


def test_a_render_longer_than_the_heartbeat_keeps_the_connection(settings_for, sqlite_url, tap, exchange):
    calls = []

    def slow(event, uow):
        calls.append(event.message_id)
        time.sleep(7)  # > 2 heartbeat intervals of 2 s: the broker would drop a starved connection
        uow.emit(
            "report.created",
            {
                "report_id": "slow",
                "title": "t",
                "template": "standard",
                "submitter": {"email": "a@example.com"},
                "stages": ["s"],
            },
        )

    settings = settings_for(sqlite_url, heartbeat_seconds=2)
    consumer = Consumer(Stage("creation", {"report.requested": slow}), settings, session_factory(settings), {})
    with running(consumer):
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            client.request_report(sample_request(report_id="r-rt-5"))
        tap.wait_for("report.created", timeout=30)
        settled(consumer, 1)
        time.sleep(3)
    assert consumer.connections_opened == 1
    assert len(calls) == 1


def test_stop_finishes_the_message_in_hand_and_leaves_the_rest_queued(settings_for, sqlite_url, broker, exchange):
    started = threading.Event()

    def slow(event, uow):
        started.set()
        time.sleep(2)

    settings = settings_for(sqlite_url)
    consumer = Consumer(Stage("creation", {"report.requested": slow}), settings, session_factory(settings), {})
    with running(consumer):
        with ReportflowClient(TEST_AMQP_URL, exchange) as client:
            for n in range(3):
                client.request_report(sample_request(report_id=f"r-rt-6-{n}"))
        assert started.wait(10)
        consumer.stop()
    assert consumer.messages_settled == 1
    assert count(sqlite_url, InboxRecord) == 1
    left = broker.channel().queue_declare(f"{exchange}.creation", passive=True).method.message_count
    assert left == 2


def test_the_client_refuses_invalid_events_and_reports_unroutable_ones(exchange, broker):
    with ReportflowClient(TEST_AMQP_URL, exchange) as client:
        with pytest.raises(InvalidEvent) as invalid:
            client.request_report({"title": "no template"})
        assert any("'template' is a required property" in r for r in invalid.value.reasons)
        with pytest.raises(Unroutable):  # nothing is bound to this fresh exchange yet
            client.request_report(sample_request())


def test_pipelined_confirms_sort_every_publish_into_taken_or_returned(broker, exchange):
    channel = broker.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.queue_declare(f"{exchange}.confirms", exclusive=True)
    channel.queue_bind(f"{exchange}.confirms", exchange, routing_key="bound")
    confirms = PipelinedConfirms(broker)
    for n in range(200):  # a burst, so the broker answers some with one multiple ack
        confirms.publish(
            exchange,
            "bound" if n != 57 else "nowhere",
            b"{}",
            pika.BasicProperties(message_id=f"m-{n}", delivery_mode=2),
            item=n,
        )
    assert confirms.unconfirmed == 200  # nothing waited for
    answered = ([], [], [])
    deadline = time.monotonic() + 20
    while confirms.unconfirmed and time.monotonic() < deadline:
        broker.process_data_events(time_limit=0.1)
        for collected, new in zip(answered, confirms.take(), strict=True):
            collected.extend(new)
    confirmed, returned, refused = answered
    assert sorted(confirmed) == [n for n in range(200) if n != 57] and returned == [57] and refused == []
    assert channel.queue_declare(f"{exchange}.confirms", passive=True).method.message_count == 199


def test_the_bulk_publisher_sorts_confirms_alike(broker, exchange):
    from reportflow.producers.bulk import BulkPublisher
    from reportflow.shared.events import Event
    from tests.helpers import example_payloads

    channel = broker.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.queue_declare(f"{exchange}.confirms", exclusive=True)
    channel.queue_bind(f"{exchange}.confirms", exchange, routing_key="report.created")
    events = [Event("report.created", example_payloads(f"r-{n}")["report.created"]) for n in range(300)]
    events.insert(123, Event("report.generated", example_payloads("r-nowhere")["report.generated"]))
    result = BulkPublisher(TEST_AMQP_URL, exchange, window=50).publish(events)
    assert (result.confirmed, result.unroutable, result.nacked) == (300, [events[123].message_id], [])
    assert not result.ok


def test_a_connection_that_closed_under_the_loop_is_reopened_not_fatal():
    """When the broker drops the connection while a callback runs inside process_data_events, the callback
    gets the error and the loop's next call fails on the closed connection (pika raises ValueError there).
    That is a lost connection like any other: the consumer reconnects instead of dying."""
    from reportflow.consumers.runtime.connection import BrokerConnection

    broker_connection, stopping, served = (
        BrokerConnection(TEST_AMQP_URL, 10, "test-closed-under-loop"),
        threading.Event(),
        [],
    )

    def serve(connection):
        served.append(connection)
        if len(served) == 1:
            connection.close()
            connection.process_data_events(time_limit=0.1)
        stopping.set()

    thread = threading.Thread(target=broker_connection.run, args=(serve, stopping), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and len(served) == 2 and broker_connection.opened == 2


def test_a_delivery_whose_channel_closed_is_left_to_its_redelivery_not_dead_lettered(
    settings_for, sqlite_url, broker, exchange
):
    """A broker node goes away while a message's handler runs: the consumer reconnects, but the delivery
    can no longer be acknowledged on the channel it came on, and the broker gives it again. Dead-lettering
    it from the new connection (as a failed settle did) left a dead letter beside the redelivery."""
    from opentelemetry import context

    from reportflow.consumers.runtime.connection import ConnectionLost
    from reportflow.consumers.runtime.messages import Delivery, Outcome
    from reportflow.shared.topology import declare

    consumer = build_consumer("generation", settings_for(sqlite_url))
    declare(broker.channel(), consumer.topology, {"generation": consumer.stage.event_types})
    consumer.settler.open_channels(broker)
    raw_publish(exchange, "report.created", b"{}", content_type="application/json", message_id="m-1")
    old_channel = broker.channel()
    method, properties, body = old_channel.basic_get(consumer.queue)
    delivery = Delivery(old_channel, method.delivery_tag, exchange, method.routing_key, properties, body, False)
    old_channel.close()  # as a node's shutdown closes it: the broker requeues the delivery

    with pytest.raises(ConnectionLost):
        consumer.settler.settle(delivery, Outcome(context.get_current(), dead_letter_reason="a handler's verdict"))
    assert dead_letters(broker, exchange) == []
    again, _, _ = broker.channel().basic_get(consumer.queue, auto_ack=True)
    assert again is not None and again.redelivered


def test_what_a_stage_process_built_to_start_is_left_out_of_full_collections(settings_for, sqlite_url):
    """A full collection walking the whole startup heap was a stage's p99 (docs/performance.md): once the
    process is built, the oldest generation holds only what was made after."""
    build_consumer("creation", settings_for(sqlite_url))
    before = len(gc.get_objects(generation=2))
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > before / 2
        assert len(gc.get_objects(generation=2)) < before / 100
    finally:
        gc.unfreeze()  # this is the test process, not a stage's


def test_sigterm_while_the_broker_is_away_stops_the_consumer_within_its_backoff(tmp_path):
    """Between tries to reach the broker the consumer waits up to 30 s; a stop must not wait with it."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REPORTFLOW_")}
    environment.update(
        REPORTFLOW_ENV="development",
        REPORTFLOW_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",  # nothing listens there
        REPORTFLOW_DATABASE_URL=f"sqlite:///{tmp_path / 'reportflow.db'}",
        REPORTFLOW_STORAGE_DIR=str(tmp_path / "storage"),
        TRACING_ENABLED="false",
    )
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "reportflow"), "consume", "creation"],
        env=environment,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = threading.Timer(60, process.kill)
    deadline.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "reconnecting in 5s" in line:  # the third try failed: a 5 s wait begins
                break
        assert lines and "reconnecting in 5s" in lines[-1], "".join(lines)
        process.terminate()
        stopped_within = time.monotonic() + 2.5
        output, _ = process.communicate(timeout=10)
        assert time.monotonic() < stopped_within, "the stop waited for the backoff"
    finally:
        deadline.cancel()
        process.kill()
    assert process.returncode == 0 and "creation: stopped" in output, (process.returncode, output)
