"""Fault tests with real processes: kill -9 at random moments, a RabbitMQ restart. Every report still
ends approved, with exactly the rows and emails it should have."""

from __future__ import annotations

import random
import subprocess
import time

import pytest

from reportflow.producers.bulk import BulkPublisher
from reportflow.shared.events import Event
from tests.helpers import TEST_AMQP_URL, TEST_RETRY_TIERS, wait_until
from tests.outcomes import (
    check_everything_arrived_once,
    missing_emails,
    small_request,
    statuses,
)
from tests.pipeline import STAGES, AutoApprover, Pipeline, pipeline_environment

pytestmark = pytest.mark.fault


@pytest.fixture
def faulty_pipeline(postgres_url, exchange, broker, smtp, tmp_path):
    pipeline = Pipeline(
        tmp_path,
        pipeline_environment(
            tmp_path,
            exchange,
            postgres_url,
            REPORTFLOW_SMTP_URL=smtp.url,
            REPORTFLOW_OUTBOX_RELAY_SECONDS="2",
            REPORTFLOW_RETRY_DELAYS=",".join(map(str, TEST_RETRY_TIERS)),
            REPORTFLOW_HEARTBEAT_SECONDS="10",
        ),
    )
    approver = AutoApprover(exchange)
    try:
        pipeline.start()
        pipeline.wait_consuming(broker, exchange)
        approver.start()
        yield pipeline, approver
    finally:
        approver.stop()
        pipeline.close()


def test_kill_9_at_random_moments_loses_nothing_and_repeats_nothing(
    faulty_pipeline, postgres_url, exchange, smtp, broker, record_property
):
    pipeline, _ = faulty_pipeline
    report_ids = [f"rep-{n:02d}" for n in range(50)]
    result = BulkPublisher(TEST_AMQP_URL, exchange).publish(
        Event("report.requested", small_request(r)) for r in report_ids
    )
    assert result.ok and result.confirmed == 50

    # Four rounds; each round kills every stage once, in a random order, at random moments.
    chaos = random.Random(20261124)
    victims = [stage for _ in range(4) for stage in chaos.sample(STAGES, len(STAGES))]
    for victim in victims:
        if statuses(postgres_url)["finalized"] == 50:
            break
        time.sleep(chaos.uniform(0.3, 1.0))
        pipeline.kill(victim)
        time.sleep(chaos.uniform(0, 0.3))
        pipeline.start(victim)
    wait_until(lambda: statuses(postgres_url)["finalized"] == 50, 120, what="50 finalized reports")
    try:
        wait_until(lambda: len({m["message"]["Message-ID"] for m in smtp.messages}) >= 200, 60, what="200 emails")
    except AssertionError:
        raise AssertionError(missing_emails(postgres_url, report_ids, smtp) + "\n" + pipeline.logs()) from None
    time.sleep(3)  # let any late duplicate arrive, so it is counted
    figures = check_everything_arrived_once(postgres_url, report_ids, smtp, pipeline.kills["notification"])
    record_property("fault_figures", {"kills": dict(pipeline.kills), **figures})
    print(f"\nkill -9 run: kills={pipeline.kills} figures={figures}")
    from reportflow.shared.dead_letters import DeadLetterQueue
    from reportflow.shared.topology import Topology

    letters = DeadLetterQueue(TEST_AMQP_URL, Topology(exchange)).list()
    assert [(d.stage, d.event_type, d.error) for d in letters] == []


def test_a_rabbitmq_restart_mid_run_loses_nothing(faulty_pipeline, postgres_url, exchange, smtp):
    pipeline, _ = faulty_pipeline
    report_ids = [f"rmq-{n:02d}" for n in range(12)]
    assert (
        BulkPublisher(TEST_AMQP_URL, exchange)
        .publish(Event("report.requested", small_request(r)) for r in report_ids)
        .ok
    )
    wait_until(lambda: statuses(postgres_url)["finalized"] >= 2, 120, what="the run to be under way")
    try:
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
        time.sleep(3)
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
        subprocess.run(["rabbitmqctl", "await_startup"], capture_output=True, timeout=120)
    wait_until(lambda: statuses(postgres_url)["finalized"] == 12, 180, what="12 finalized reports")
    wait_until(lambda: len({m["message"]["Message-ID"] for m in smtp.messages}) >= 48, 60, what="48 emails")
    check_everything_arrived_once(postgres_url, report_ids, smtp, notification_kills=0)
    assert not pipeline.exited(), "a consumer exited instead of reconnecting"
