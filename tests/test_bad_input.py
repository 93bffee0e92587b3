"""Bad input at scale, and hostile data kept inert. Generated and mutated messages of every upstream event type
(hypothesis) go through the runtime's own processing by the thousand and through running consumers on the
real broker: none crashes a handler, none is stuck, each ends in a stated outcome. A hostile request runs
the whole pipeline: its markup and template syntax are printed, its URLs fetch nothing, and CR/LF in its
title never becomes an email header."""

from __future__ import annotations

import copy
import io
import json
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pypdf import PdfReader
from sqlalchemy.orm import Session

from reportflow.consumers.bootstrap import build_consumer
from reportflow.consumers.runtime.messages import Delivery
from reportflow.producers import ReportflowClient
from reportflow.shared.db import make_engine
from reportflow.shared.models import Report
from tests.helpers import (
    TEST_AMQP_URL,
    dead_letters,
    generated_report,
    open_first_stage,
    raw_publish,
    report_status,
    running,
    sample_request,
    settled,
    wait_until,
)
from tests.pipeline import STAGES, AutoApprover, Pipeline, pipeline_environment

DECISION = {
    "report_id": "bad-1",
    "stage": "review",
    "approver": {"email": "bob@example.com", "id": "u-3"},
    "decision": "approve",
    "comment": "fine",
}
BASES = {"report.requested": sample_request(), "approval.decided": DECISION}
STAGE_OF = {"report.requested": "creation", "approval.decided": "approval"}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(["", "bob@example.com\n", "a,b@example.com", "x" * 300, "\u2028", "{{ 7*7 }}", "<b>"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every path into a JSON value, to pick one to mutate."""
    yield prefix
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _paths(inner, (*prefix, index))


def _mutate(base, path, how, new):
    payload = copy.deepcopy(base)
    if not path:
        return new
    parent = payload
    for step in path[:-1]:
        parent = parent[step]
    if how == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return payload


@st.composite
def payloads(draw, event_type: str):
    """The contract's example of event_type, changed in one to three places: a value replaced by any JSON,
    a key dropped, or left as it is."""
    payload = BASES[event_type]
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(list(_paths(payload))))
        how = draw(st.sampled_from(["replace", "drop"] if path else ["replace"]))
        payload = _mutate(payload, path, how, draw(json_values))
    return payload


@st.composite
def deliveries(draw, event_type: str):
    """What a publisher might put on the wire for event_type: the body (mutated JSON, or not JSON at all)
    and the properties (type, content type, message id, contract version)."""
    body = draw(
        st.one_of(
            payloads(event_type).map(lambda p: json.dumps(p).encode()),
            st.binary(max_size=64),
            json_values.map(lambda v: json.dumps(v).encode()),
        )
    )
    properties = pika.BasicProperties(
        content_type=draw(st.sampled_from(["application/json", "application/json", "text/plain", None])),
        message_id=draw(st.one_of(st.just(None), st.uuids().map(str))),
        type=draw(st.sampled_from([event_type, event_type, None, "report.finalized"])),
        headers={"schema_version": draw(st.sampled_from(["1", "1.3", "2", b"\xff", None]))},
    )
    return body, properties


def _check_stated(outcome) -> None:
    """A stated outcome: handled (its effects and events committed), refused (recorded), a duplicate, or the
    dead-letter queue with a reason. Never a handler's crash, never a retry of what can never succeed."""
    assert outcome.failure is None, f"the handler failed: {outcome.failure}"
    assert outcome.retry_after is None
    assert outcome.verdict in ("handled", "refused", "duplicate")
    if outcome.dead_letter_reason is not None:
        assert outcome.dead_letter_reason.strip()


@pytest.mark.parametrize("event_type", sorted(BASES))
def test_thousands_of_generated_messages_each_end_in_a_stated_outcome(event_type, settings_for, sqlite_url, uow_on):
    open_first_stage(uow_on(sqlite_url), generated_report(uow_on(sqlite_url), "bad-1"))
    consumer = build_consumer(STAGE_OF[event_type], settings_for(sqlite_url))
    seen: Counter = Counter()

    @given(deliveries(event_type))
    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def each(delivery):
        body, properties = delivery
        routed = properties.type or event_type
        outcome = consumer.processor.process(Delivery(None, 1, "x", routed, properties, body, False))
        _check_stated(outcome)
        seen.update(m.event_type for m in outcome.publish)
        seen["dead-lettered" if outcome.dead_letter_reason else outcome.verdict] += 1

    each()
    # The generator reaches every path: accepted, answered as invalid or refused, and dead-lettered.
    answered = {"report.requested": ("report.created", "report.invalid"), "approval.decided": ("approval.refused",)}
    for kind in (*answered[event_type], "dead-lettered"):
        assert seen[kind] > 0, seen


def test_generated_messages_through_running_consumers_are_all_settled(
    settings_for, postgres_url, uow_on, broker, exchange
):
    """The same generated messages, published to the real broker: every one is settled, nothing is left in a
    queue, and what went to the dead-letter queue says why."""
    open_first_stage(uow_on(postgres_url), generated_report(uow_on(postgres_url), "bad-1"))
    published = {"creation": 0, "approval": 0}

    with (
        running(build_consumer("creation", settings_for(postgres_url))) as creation,
        running(build_consumer("approval", settings_for(postgres_url))) as approval,
    ):
        drawn: list = []

        @given(st.sampled_from(sorted(BASES)).flatmap(lambda t: st.tuples(st.just(t), deliveries(t))))
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def generate(one):
            drawn.append(one)

        generate()
        for event_type, (body, properties) in drawn:
            properties.message_id = str(uuid.uuid4())  # each once: a duplicate would be settled without a trace
            properties.type = event_type if properties.type == "report.finalized" else properties.type
            raw_publish(exchange, event_type, body, **{k: v for k, v in vars(properties).items() if v is not None})
            published[STAGE_OF[event_type]] += 1
        settled(creation, published["creation"], timeout=120)
        settled(approval, published["approval"], timeout=120)
        channel = broker.channel()
        for stage in ("creation", "approval"):
            assert channel.queue_declare(f"{exchange}.{stage}", passive=True).method.message_count == 0
    for headers, _ in dead_letters(broker, exchange):
        assert headers["x-reportflow-error"].strip()


class RecordingServer:
    """A loopback HTTP server that records every request: what the renderer must never call."""

    def __init__(self):
        self.paths: list[str] = []
        recorded = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                recorded.paths.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.e2e
def test_hostile_report_data_stays_inert_from_request_to_email(tmp_path, postgres_url, exchange, broker, smtp):
    watcher = RecordingServer()
    hostile = sample_request(
        report_id="hostile-1",
        title="Q3 <b>bold</b> {{ config }}",
        approval_stages=[{"name": "review", "approvers": ["bob@example.com"]}],
    )
    hostile["data"]["summary"] = (
        f'<img src="{watcher.url}/img.png"><link rel="stylesheet" href="{watcher.url}/x.css">'
        f'<style>@import url("{watcher.url}/import.css");</style> http://169.254.169.254/latest/meta-data '
        '<img src="file:///etc/passwd"> {{ 7*7 }} {% for x in range(3) %}loop{% endfor %}'
    )
    hostile["data"]["sections"] = [{"heading": "<script>alert(1)</script>", "body": f"@import '{watcher.url}/b.css';"}]
    injected = sample_request(report_id="hostile-2", title="Q3\r\nBcc: evil@example.com\r\n\r\nDecide here instead")
    pipeline = Pipeline(
        tmp_path,
        pipeline_environment(
            tmp_path,
            exchange,
            postgres_url,
            REPORTFLOW_SMTP_URL=smtp.url,
            REPORTFLOW_ENV="test",
            REPORTFLOW_SECRET_KEY="test-secret-key-for-approval-links-0123456789",
            TRACING_ENABLED="false",
        ),
    )
    approver = AutoApprover(exchange)
    try:
        pipeline.start()
        pipeline.wait_consuming(broker, exchange, stages=STAGES)
        approver.start()
        with ReportflowClient(TEST_AMQP_URL, exchange, validate=False) as client:
            client.request_report(hostile)
            client.request_report(injected)
        wait_until(
            lambda: report_status(postgres_url, "hostile-1") == "finalized", 120, what="the hostile report finalized"
        )
        # The approver's request, the invalid notice to hostile-2's submitter, the approved PDF to submitter and client.
        wait_until(lambda: len(smtp.messages) >= 3, 60, what="the emails")
    finally:
        approver.stop()
        pipeline.close()

    assert watcher.paths == []  # no URL in the data was fetched
    final = _document(postgres_url, tmp_path, "hostile-1", "final")
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(final)).pages)
    for literal in (
        "{{ 7*7 }}",
        "{% for x in range(3) %}",
        "<script>alert(1)</script>",
        "169.254.169.254",
        "{{ config }}",
    ):
        assert literal in text, literal  # printed as written, not run
    assert "looploop" not in text  # the loop in the data did not run
    for sent in smtp.messages:
        message = sent["message"]
        assert message["Bcc"] is None and "evil@example.com" not in sent["envelope_to"]
        assert "\n" not in str(message["Subject"]) and "\r" not in str(message["Subject"])
    assert report_status(postgres_url, "hostile-2") is None  # refused at creation, the submitter told why


def _document(database_url: str, tmp_path, report_id: str, kind: str) -> bytes:
    from reportflow.shared.storage import FolderStorage

    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            document = session.get(Report, report_id).document(kind)
            return FolderStorage(tmp_path / "storage").get(document.storage_key)
    finally:
        engine.dispose()
