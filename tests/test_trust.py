"""Who may say what, against the real broker: least-privilege users made by `reportflow topology users`,
the broker's own check of user_id, and a stage that takes decisions only from the publishers it trusts."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pika
import pytest

from reportflow.consumers.bootstrap import build_consumer
from reportflow.producers import ReportflowClient
from reportflow.shared.config import TrustSettings
from reportflow.shared.models import Decision
from reportflow.shared.topology import Topology, declare
from tests.helpers import (
    TEST_AMQP_URL,
    TEST_VHOST,
    count,
    generated_report,
    open_first_stage,
    refusals,
    running,
    settled,
)

CLI = Path(sys.executable).parent / "reportflow"


@pytest.fixture
def users(broker, exchange):
    """The least-privilege users for this test's exchange, as `reportflow topology users --apply` makes
    them (under a prefix of their own); deleted afterwards. name -> AMQP URL with its password."""
    from reportflow import consumers

    declare(broker.channel(), Topology(exchange, retry_delays=(1, 5, 30, 120)), consumers.bindings())
    prefix = f"rft-{uuid.uuid4().hex[:6]}-"
    env = {**os.environ, "REPORTFLOW_AMQP_URL": TEST_AMQP_URL, "REPORTFLOW_EXCHANGE": exchange}
    made = subprocess.run(
        [str(CLI), "topology", "users", "--apply", "--prefix", prefix],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    passwords = dict(line.split(" ", 1) for line in made.stdout.splitlines())
    try:
        yield {
            name.removeprefix(prefix): f"amqp://{name}:{password}@127.0.0.1:5672/{TEST_VHOST}"
            for name, password in passwords.items()
        } | {"prefix": prefix}
    finally:
        for name in passwords:
            subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True, timeout=60, check=False)


def publish_as(url: str, exchange: str, routing_key: str, **properties) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key, b"{}", pika.BasicProperties(**properties))
    finally:
        if connection.is_open:
            connection.close()


def test_an_upstream_user_publishes_only_the_event_types_it_owns(users, exchange):
    publish_as(users["submitter"], exchange, "report.requested")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        publish_as(users["submitter"], exchange, "report.finalized")
    assert refused.value.reply_code == 403
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        publish_as(users["approvals"], exchange, "report.requested")


def test_the_broker_refuses_a_user_id_that_is_not_the_connections_user(users, exchange):
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        publish_as(users["submitter"], exchange, "report.requested", user_id=f"{users['prefix']}approvals")
    assert refused.value.reply_code == 406  # PRECONDITION_FAILED: user_id is the broker's word


def test_a_stage_user_cannot_consume_another_stages_queue(users, exchange):
    connection = pika.BlockingConnection(pika.URLParameters(users["creation"]))
    try:
        channel = connection.channel()
        channel.basic_consume(f"{exchange}.creation", lambda *_: None)  # its own: allowed
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            connection.channel().basic_consume(f"{exchange}.generation", lambda *_: None)
        assert refused.value.reply_code == 403
    finally:
        if connection.is_open:
            connection.close()


def test_approval_as_its_own_user_applies_only_decisions_from_trusted_publishers(
    users, exchange, settings_for, sqlite_url, uow_on, finished_spans
):
    units = uow_on(sqlite_url)
    open_first_stage(units, generated_report(units, "trusted-1"))
    settings = settings_for(
        sqlite_url,
        amqp_url=users["approval"],  # the stage runs with no more than its own permissions
        trust=TrustSettings(publishers=f"approval.decided={users['prefix']}approvals"),
    )
    with running(build_consumer("approval", settings)) as consumer:
        with ReportflowClient(TEST_AMQP_URL, exchange) as anyone:  # guest: a user nobody listed
            anyone.decide("trusted-1", "review", "bob@example.com", approve=False, comment="not mine to say")
        settled(consumer, 1)
        assert count(sqlite_url, Decision) == 0
        (refusal,) = refusals(units)
        assert "not trusted to publish approval.decided" in refusal and "guest" in refusal

        with ReportflowClient(users["approvals"], exchange) as approvals:
            approvals.decide("trusted-1", "review", "bob@example.com", approve=True)
        settled(consumer, 2)
        assert count(sqlite_url, Decision) == 1
        assert len(refusals(units)) == 1
    decided = [s for s in finished_spans() if s.name.startswith(f"process {exchange}:approval.decided")]
    assert sorted(s.attributes["reportflow.publisher"] for s in decided) == ["guest", f"{users['prefix']}approvals"]


def test_a_retry_keeps_its_publisher_and_a_header_from_outside_is_not_believed():
    from reportflow.consumers.runtime.messages import Delivery
    from reportflow.consumers.runtime.trust import keep_publisher, publisher_of
    from reportflow.shared import failures

    forged = pika.BasicProperties(user_id="guest", headers={failures.PUBLISHER: "approvals"})
    from_exchange = Delivery(None, 1, "reportflow", "approval.decided", forged, b"{}", False)
    assert publisher_of(from_exchange) == "guest"  # the broker's word, not the header's
    retried_headers = keep_publisher(dict(forged.headers), from_exchange)
    assert retried_headers[failures.PUBLISHER] == "guest"
    coming_back = Delivery(
        None, 2, "", "rft.approval", pika.BasicProperties(headers=retried_headers), b"{}", False
    )  # through the default exchange, from the retry queue
    assert publisher_of(coming_back) == "guest"
    assert keep_publisher({}, coming_back)[failures.PUBLISHER] == "guest"


def test_trusted_publishers_are_read_from_the_environment_and_the_yaml_files(tmp_path):
    from reportflow.shared.config import Settings

    (tmp_path / "app.yaml").write_text("trust:\n  publishers: approval.decided=approvals\n")
    from_file = Settings.load({"REPORTFLOW_CONFIG_DIR": str(tmp_path)})
    assert from_file.trust.trusted_publishers() == {"approval.decided": frozenset({"approvals"})}
    from_env = Settings.load(
        {"REPORTFLOW_CONFIG_DIR": str(tmp_path), "REPORTFLOW_TRUSTED_PUBLISHERS": "report.requested=a, b;"}
    )
    assert from_env.trust.trusted_publishers() == {"report.requested": frozenset({"a", "b"})}
    assert from_env.masked()["trust.publishers"] == "report.requested=a, b;"
    for wrong in ("report.finalized=x", "approval.decided=", "approval.decided"):
        with pytest.raises(ValueError, match="trust.publishers"):
            TrustSettings(publishers=wrong).trusted_publishers()
