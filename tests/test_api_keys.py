"""Per-client API keys at the gateway, on PostgreSQL and the real broker: made and revoked by the command,
kept as digests only, scoped (a key reads only what it submitted unless it may read all), and failed
attempts logged without the key, counted and slowed down per address."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from reportflow import consumers
from reportflow.shared.config import Settings
from reportflow.shared.db import make_engine
from reportflow.shared.topology import Topology, declare
from tests.helpers import TEST_AMQP_URL, generated_report, sample_request

CLI = Path(sys.executable).parent / "reportflow"
SECRET = "test-secret-key-for-approval-links-0123456789"


def apikey(database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "REPORTFLOW_DATABASE_URL": database_url}
    return subprocess.run([str(CLI), "apikey", *args], capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.fixture
def app(postgres_url, broker, exchange, tmp_path):
    from reportflow.producers.gateway import create_app

    declare(broker.channel(), Topology(exchange), consumers.bindings())
    settings = Settings(
        amqp_url=TEST_AMQP_URL,
        exchange=exchange,
        database_url=postgres_url,
        secret_key=SECRET,
        environment="test",
        storage_dir=tmp_path,
        gateway_auth_failures="3/minute",
    )
    return create_app(settings)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_a_key_is_shown_once_kept_as_its_digest_listed_without_it_and_revoked(postgres_url, app):
    made = apikey(postgres_url, "create", "portal", "--scope", "submit", "--scope", "read")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("rfk_") and len(key) > 40
    engine = make_engine(postgres_url)
    with engine.connect() as connection:
        stored = " ".join(str(v) for row in connection.execute(text("SELECT * FROM api_keys")) for v in row)
    engine.dispose()
    assert key not in stored and key[4:] not in stored  # only its digest
    listed = apikey(postgres_url, "list")
    assert "portal" in listed.stdout and "read,submit" in listed.stdout and key not in listed.stdout
    assert apikey(postgres_url, "create", "portal").returncode != 0  # names are unique

    client = app.test_client()
    assert client.get("/reports/nothing-here", headers=bearer(key)).status_code == 404  # known key, no report
    assert apikey(postgres_url, "revoke", "portal").returncode == 0
    assert client.get("/reports/nothing-here", headers=bearer(key)).status_code == 401


def test_a_key_reads_only_the_reports_it_submitted_unless_it_may_read_all(postgres_url, app, uow_on, tap):
    portal = apikey(postgres_url, "create", "portal").stdout.strip()  # submit, read
    other = apikey(postgres_url, "create", "other", "--scope", "submit", "--scope", "read").stdout.strip()
    operator = apikey(postgres_url, "create", "operator", "--scope", "read-all").stdout.strip()
    client = app.test_client()

    accepted = client.post("/reports", json=sample_request(report_id="portal-1"), headers=bearer(portal))
    assert accepted.status_code == 202, accepted.json
    tap.wait_for("report.requested")
    generated_report(uow_on(postgres_url), "portal-1")  # as creation would store it

    assert client.get("/reports/portal-1", headers=bearer(portal)).status_code == 200
    assert client.get("/reports/portal-1", headers=bearer(other)).status_code == 404  # as if it did not exist
    assert client.get("/reports/portal-1/document", headers=bearer(other)).status_code == 404
    assert client.get("/reports/portal-1", headers=bearer(operator)).status_code == 200
    # Another key cannot take the id over; a key without submit cannot submit.
    taken = client.post("/reports", json=sample_request(report_id="portal-1"), headers=bearer(other))
    assert taken.status_code == 409
    assert client.post("/reports", json=sample_request(), headers=bearer(operator)).status_code == 403


def test_failed_attempts_are_logged_without_the_key_counted_and_slowed_down(postgres_url, app, caplog):
    good = apikey(postgres_url, "create", "portal").stdout.strip()
    client = app.test_client()
    before = REGISTRY.get_sample_value("reportflow_gateway_auth_failures_total", {"reason": "unknown"}) or 0
    guess = "rfk_" + "x" * 43
    here, elsewhere = {"REMOTE_ADDR": "127.0.0.9"}, {"REMOTE_ADDR": "127.0.0.10"}
    with caplog.at_level(logging.WARNING, logger="reportflow.gateway"):
        for _ in range(3):
            assert client.get("/reports/r", headers=bearer(guess), environ_base=here).status_code == 401
    assert REGISTRY.get_sample_value("reportflow_gateway_auth_failures_total", {"reason": "unknown"}) == before + 3
    assert "unknown or revoked" in caplog.text and guess not in caplog.text and guess[4:12] not in caplog.text
    # Past the limit, this address waits, even with a good key; another address does not.
    limited = client.get("/reports/r", headers=bearer(good), environ_base=here)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert client.get("/reports/r", headers=bearer(good), environ_base=elsewhere).status_code == 404
