"""End to end: the Procfile's four processes, real RabbitMQ, a real database, a real SMTP server, and
the spans they export over OTLP/HTTP, decoded from protobuf as a collector would."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import pika
import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.instrumentation.pika import PikaInstrumentor
from pypdf import PdfReader

from reportflow.producers import ReportflowClient
from tests.helpers import TEST_AMQP_URL, report_status, sample_request, wait_until
from tests.pipeline import STAGES, traced_pipeline

pytestmark = pytest.mark.e2e


@pytest.fixture
def pipeline(database_url, exchange, broker, smtp, otlp, tmp_path):
    """The four processes of the Procfile, configured for this test's vhost, exchange, database and servers."""
    with traced_pipeline(tmp_path, exchange, database_url, broker, smtp, otlp) as pipeline:
        yield pipeline


def requested_for(tap, report_id: str, stage: str):
    def found():
        return next(
            (
                e
                for e in tap.drain()
                if e[0] == "approval.requested" and e[1]["report_id"] == report_id and e[1]["stage"]["name"] == stage
            ),
            None,
        )

    return wait_until(found, 60, what=f"approval.requested for {report_id} {stage}")


def pika_upstream_publish(exchange: str, request: dict, tracer_provider) -> None:
    """An upstream that uses plain pika with the OpenTelemetry pika instrumentation."""
    connection = pika.BlockingConnection(pika.URLParameters(TEST_AMQP_URL))
    channel = connection.channel()
    channel.confirm_delivery()
    PikaInstrumentor.instrument_channel(channel, tracer_provider=tracer_provider)
    channel.basic_publish(
        exchange,
        "report.requested",
        json.dumps(request).encode(),
        pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id="pika-upstream-1",
            type="report.requested",
            headers={"schema_version": "1"},
        ),
        mandatory=True,
    )
    connection.close()


def test_reports_go_from_request_to_approved_pdf_and_emails_in_one_trace_each(
    pipeline, database_url, exchange, tap, smtp, otlp, tmp_path, tracer_provider, finished_spans
):
    tracer = trace.get_tracer("upstream-test")
    with ReportflowClient(TEST_AMQP_URL, exchange) as client:
        a = client.request_report(sample_request(report_id="rep-a", title="Q3 revenue review"))
        with tracer.start_as_current_span("upstream pika request") as pika_root:
            pika_upstream_publish(exchange, sample_request(report_id="rep-b", title="Q3 cost review"), tracer_provider)
        c = client.request_report(sample_request(report_id="rep-c", title="Q3 forecast"))
        bad = client.publish("report.requested", sample_request(report_id="rep-bad", template="glossy"))

        # Stage 1 of A: bob decides from inside the trace the request reached him in, as an upstream
        # consumer of approval.requested would; mallory, who is no approver, is refused.
        _, _, props = requested_for(tap, "rep-a", "review")
        token = context.attach(propagate.extract(props.headers))
        try:
            client.decide("rep-a", "review", "bob@example.com", approve=True, comment="Numbers check out")
        finally:
            context.detach(token)
        requested_for(tap, "rep-a", "sign-off")
        mallory = client.decide("rep-a", "sign-off", "mallory@example.com", approve=True)
        tap.wait_for("approval.refused")  # before carol completes the stage, so the reason is about mallory
        # Stage 2 of A arrives later, from another system in another trace.
        late = client.decide("rep-a", "sign-off", "carol@example.com", approve=True, comment="Signed")

        requested_for(tap, "rep-b", "review")
        client.decide("rep-b", "review", "bob@example.com", approve=True)
        requested_for(tap, "rep-b", "sign-off")
        client.decide("rep-b", "sign-off", "dan@example.com", approve=True)

        requested_for(tap, "rep-c", "review")
        client.decide("rep-c", "review", "bob@example.com", approve=False, comment="Wrong quarter")

    for report_id in ("rep-a", "rep-b"):
        wait_until(
            lambda report_id=report_id: report_status(database_url, report_id) == "finalized",
            90,
            what=f"{report_id} finalized",
        )
    wait_until(lambda: report_status(database_url, "rep-c") == "rejected", 60, what="rep-c rejected")
    wait_until(lambda: len(smtp.messages) >= 12, 60, what="all emails")
    exit_codes = pipeline.stop()
    assert exit_codes == {name: 0 for name in exit_codes}, pipeline.logs()

    # -- the approved PDF: valid, with its title and the approval page ---------------------------------
    final_a = tmp_path / "storage" / "reports" / "rep-a" / "final.pdf"
    text = "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(final_a.read_bytes())).pages)
    assert "Q3 revenue review" in text
    assert "Approval" in text and "bob@example.com" in text and "carol@example.com" in text
    assert "Numbers check out" in text and "Signed" in text

    # -- the emails, as the SMTP server received them ------------------------------------------------------
    subjects = sorted((m["envelope_to"][0], m["message"]["Subject"]) for m in smtp.messages)
    assert subjects == sorted(
        [
            ("bob@example.com", "Approval needed: Q3 revenue review (stage 1 of 2: review)"),
            ("bob@example.com", "Approval needed: Q3 cost review (stage 1 of 2: review)"),
            ("bob@example.com", "Approval needed: Q3 forecast (stage 1 of 2: review)"),
            ("carol@example.com", "Approval needed: Q3 revenue review (stage 2 of 2: sign-off)"),
            ("dan@example.com", "Approval needed: Q3 revenue review (stage 2 of 2: sign-off)"),
            ("carol@example.com", "Approval needed: Q3 cost review (stage 2 of 2: sign-off)"),
            ("dan@example.com", "Approval needed: Q3 cost review (stage 2 of 2: sign-off)"),
            ("ann@example.com", "Report approved: Q3 revenue review"),
            ("ann@example.com", "Report approved: Q3 cost review"),
            ("ann@example.com", "Report rejected: Q3 forecast"),
            ("ann@example.com", "Report request not accepted: Q3 revenue review"),
            ("mallory@example.com", "Decision not applied: Q3 revenue review"),
        ]
    )
    [approved_a] = [m for m in smtp.messages if m["message"]["Subject"] == "Report approved: Q3 revenue review"]
    assert approved_a["envelope_to"] == ["ann@example.com", "cfo@client.example"]
    attachment = next(approved_a["message"].iter_attachments())
    assert attachment.get_content_type() == "application/pdf"
    assert hashlib.sha256(attachment.get_content()).digest() == hashlib.sha256(final_a.read_bytes()).digest()
    [invalid] = [
        m["message"] for m in smtp.messages if m["message"]["Subject"].startswith("Report request not accepted")
    ]
    assert "unknown template 'glossy'" in invalid.get_content()
    [rejected] = [m["message"] for m in smtp.messages if m["message"]["Subject"].startswith("Report rejected")]
    assert "Wrong quarter" in rejected.get_content()

    # -- the trace: one per report, one tree, all four services, the late decision linked -----------------
    wait_until(lambda: otlp.spans, 10, what="exported spans")
    exported = otlp.spans
    upstream = {format(s.context.span_id, "016x"): s for s in finished_spans()}
    trace_of = {
        "rep-a": a.trace_id,
        "rep-b": format(pika_root.get_span_context().trace_id, "032x"),
        "rep-c": c.trace_id,
        "rep-bad": bad.trace_id,
    }
    assert {s["trace_id"] for s in exported} == set(trace_of.values()), "spans outside the reports' traces"

    spans_a = [s for s in exported if s["trace_id"] == a.trace_id]
    assert {s["service"] for s in spans_a} == {f"reportflow-{stage}" for stage in STAGES}
    known = {s["span_id"] for s in spans_a} | {
        i for i, s in upstream.items() if format(s.context.trace_id, "032x") == a.trace_id
    }
    orphans = [s["name"] for s in spans_a if s["parent_id"] not in known]
    assert orphans == [], f"spans whose parent is not in the trace: {orphans}"
    names = {s["name"] for s in spans_a}
    assert {
        f"process {exchange}:report.requested:{exchange}.creation",
        "render pdf",
        "smtp send",
        f"publish {exchange}:report.finalized",
        f"process {exchange}:approval.decided:{exchange}.approval",
    } <= names
    decisions = [s for s in spans_a if s["name"].startswith(f"process {exchange}:approval.decided")]
    assert len(decisions) == 3  # bob in-trace, mallory refused, carol late
    linked = [s for s in decisions if s["links"]]
    assert {link["trace_id"] for s in linked for link in s["links"]} == {mallory.trace_id, late.trace_id}
    [refused] = [s for s in decisions if "refused" in s["events"]]
    assert "not an approver" in refused["attributes"]["reportflow.refused"]

    process_span = next(s for s in spans_a if s["name"].startswith(f"process {exchange}:report.requested"))
    assert process_span["kind"] == 5  # SPAN_KIND_CONSUMER
    assert process_span["attributes"]["messaging.system"] == "rabbitmq"
    assert process_span["attributes"]["messaging.message.conversation_id"] == "rep-a"
    assert process_span["resource"]["service.namespace"] == "reportflow"
    assert process_span["resource"]["deployment.environment.name"] == "test"
    assert process_span["parent_id"] in upstream  # the upstream's publish span

    sql = [s for s in spans_a if s["attributes"].get("db.system") or s["attributes"].get("db.system.name")]
    assert sql and all(s["parent_id"] in known for s in sql)  # each statement, under its process span

    publishes = Counter(s["attributes"].get("messaging.message.id") for s in exported if s["kind"] == 4)
    assert publishes and max(publishes.values()) == 1  # SPAN_KIND_PRODUCER: one span per publish
    by_id = {s["span_id"]: s for s in spans_a}
    emitted = [s for s in spans_a if s["kind"] == 4]
    assert emitted and all(  # each under the span that emitted it, though it is published after that one ends
        by_id[s["parent_id"]]["name"].split(" ")[0] in {"process", "timer", "retry", "dead-letter"} for s in emitted
    ), [(s["name"], by_id.get(s["parent_id"], {}).get("name")) for s in emitted]
    instances = {s["resource"]["service.instance.id"] for s in exported}
    assert len(instances) == 4 and all(s["resource"]["service.version"] for s in exported)

    spans_b = [s for s in exported if s["trace_id"] == trace_of["rep-b"]]
    assert {s["service"] for s in spans_b} == {f"reportflow-{stage}" for stage in STAGES}
