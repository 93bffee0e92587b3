"""Tracing to the standard: checked on the OTLP wire (a receiver decoding protobuf) against consumer
processes started as the Procfile starts them, and the pieces that make it up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import StatusCode

from reportflow.consumers import creation
from reportflow.shared import tracing
from reportflow.shared.cli import main as cli
from reportflow.shared.config import TracingSettings
from reportflow.shared.events import Event
from reportflow.shared.traces import load_from_files, spans_from_otlp_json, waterfall
from tests.helpers import (
    TEST_AMQP_URL,
    TWO_STAGES,
    free_port,
    handle,
    open_first_stage,
    raw_publish,
    sample_request,
    wait_until,
)
from tests.pipeline import Pipeline

DATA = Path(__file__).parent / "data"
UPSTREAM_TRACE = "80f198ee56343ba864fe8b2a57d3eff7"
UPSTREAM_SPAN = "e457b5a2e4d86bd1"


@pytest.fixture
def stage_process(tmp_path, exchange, broker, otlp):
    """Start one stage as its Procfile line does, exporting to this test's OTLP receiver."""
    pipelines = []

    def start(stage: str, database_url: str, **env) -> Pipeline:
        pipeline = Pipeline(
            tmp_path,
            {
                "REPORTFLOW_AMQP_URL": TEST_AMQP_URL,
                "REPORTFLOW_EXCHANGE": exchange,
                "REPORTFLOW_DATABASE_URL": database_url,
                "REPORTFLOW_STORAGE_DIR": str(tmp_path / "storage"),
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                **env,
            },
        )
        pipeline.start(stage)
        pipelines.append(pipeline)
        wait_until(lambda: _consumers(broker, f"{exchange}.{stage}") or pipeline.exited(), 60, what=stage)
        assert not pipeline.exited(), pipeline.logs()
        return pipeline

    yield start
    for pipeline in pipelines:
        pipeline.close()


def _consumers(broker, queue: str) -> int:
    channel = broker.channel()
    try:
        return channel.queue_declare(queue, passive=True).method.consumer_count
    except Exception:
        return 0
    finally:
        if channel.is_open:
            channel.close()


def publish_request(exchange: str, report_id: str, headers: dict) -> None:
    raw_publish(
        exchange,
        "report.requested",
        json.dumps(sample_request(report_id=report_id)).encode(),
        content_type="application/json",
        type="report.requested",
        message_id=f"m-{report_id}",
        headers=headers,
    )


def process_span(otlp, report_id: str) -> dict:
    return wait_until(
        lambda: next(
            (
                s
                for s in otlp.spans
                if s["name"].startswith("process ") and s["attributes"].get("report.id") == report_id
            ),
            None,
        ),
        30,
        what=f"the process span of {report_id}",
    )


# -- propagation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {"b3": f"{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-1"},
        {"X-B3-TraceId": UPSTREAM_TRACE, "X-B3-SpanId": UPSTREAM_SPAN, "X-B3-Sampled": "1"},
        {"uber-trace-id": f"{UPSTREAM_TRACE}:{UPSTREAM_SPAN}:0:1"},
    ],
    ids=["b3-single", "b3-multi", "jaeger"],
)
def test_b3_and_jaeger_upstreams_continue_into_one_w3c_trace(stage_process, sqlite_url, exchange, otlp, tap, headers):
    stage_process("creation", sqlite_url)
    publish_request(exchange, "r-prop", headers)
    span = process_span(otlp, "r-prop")
    assert (span["trace_id"], span["parent_id"]) == (UPSTREAM_TRACE, UPSTREAM_SPAN)
    [(_, _, properties)] = tap.wait_for("report.created")
    assert properties.headers["traceparent"].startswith(f"00-{UPSTREAM_TRACE}-")  # published as W3C
    assert "b3" not in properties.headers and "uber-trace-id" not in properties.headers


def test_an_unsampled_upstream_yields_no_spans_downstream(stage_process, sqlite_url, exchange, otlp, tap):
    pipeline = stage_process("creation", sqlite_url)
    publish_request(exchange, "r-unsampled", {"traceparent": f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-00"})
    publish_request(exchange, "r-sampled", {"traceparent": f"00-{'1' * 32}-{UPSTREAM_SPAN}-01"})
    [(_, _, first), _] = tap.wait_for("report.created", 2)
    process_span(otlp, "r-sampled")
    assert pipeline.stop() == {"creation": 0}  # flushes
    assert first.headers["traceparent"].endswith("-00") and UPSTREAM_TRACE in first.headers["traceparent"]
    assert not [s for s in otlp.spans if s["trace_id"] == UPSTREAM_TRACE]


@pytest.mark.parametrize("runtime_sql", [False, True], ids=["default", "runtime_sql"])
def test_the_runtimes_own_sql_is_traced_only_when_asked(stage_process, postgres_url, exchange, otlp, tap, runtime_sql):
    """The handler's statements are the operator's business and always traced; the inbox and outbox are
    reportflow's plumbing, traced with tracing.runtime_sql. Validation is no span of its own."""
    pipeline = stage_process("creation", postgres_url, REPORTFLOW_TRACING_RUNTIME_SQL=str(runtime_sql).lower())
    publish_request(exchange, "r-sql", {"traceparent": f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"})
    tap.wait_for("report.created")
    process_span(otlp, "r-sql")
    assert pipeline.stop() == {"creation": 0}  # flushes
    ours = [s for s in otlp.spans if s["trace_id"] == UPSTREAM_TRACE]
    statements = [
        str(s["attributes"].get("db.statement") or s["attributes"].get("db.query.text") or "")
        for s in ours
        if s["attributes"].get("db.system") or s["attributes"].get("db.system.name")
    ]
    assert any("INSERT INTO reports" in q for q in statements), statements  # the handler's own
    bookkeeping = [q for q in statements if "inbox" in q or "outbox" in q]
    assert bool(bookkeeping) == runtime_sql, statements
    assert not [s for s in ours if s["name"] == "validate"]


def test_tracing_disabled_exports_nothing_and_installs_no_exporter(stage_process, sqlite_url, exchange, otlp, tap):
    pipeline = stage_process("creation", sqlite_url, TRACING_ENABLED="false")
    publish_request(exchange, "r-off", {"traceparent": f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"})
    [(_, _, properties)] = tap.wait_for("report.created")
    assert pipeline.stop() == {"creation": 0}
    assert otlp.spans == [] and otlp.requests == 0
    assert "tracing is off: no tracer provider, no exporter" in pipeline.logs()
    # The context still passes through, so the traces of upstream and downstream stay whole.
    assert UPSTREAM_TRACE in properties.headers["traceparent"]
    with tracing.switched(tracing.enabled()):  # setup_tracing below turns this process's switch
        try:
            assert tracing.setup_tracing("x", TracingSettings(enabled=False)) is None
            assert tracing.enabled() is False
            os.environ["OTEL_SDK_DISABLED"] = "true"
            assert tracing.setup_tracing("x", TracingSettings(enabled=True)) is None
        finally:
            os.environ.pop("OTEL_SDK_DISABLED", None)


# -- late decisions -----------------------------------------------------------------------------------
@pytest.fixture
def report_in_approval(postgres_url, uow_on):
    unit = uow_on(postgres_url)
    handle(
        unit,
        creation.on_report_requested,
        Event(
            "report.requested",
            sample_request(report_id="r-late", approval_stages=TWO_STAGES),
            trace_context={"traceparent": f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"},
        ),
    )
    with unit() as work:
        work.report("r-late").status = "generated"
        work.session.commit()
    open_first_stage(unit, "r-late")
    return postgres_url


@pytest.mark.parametrize("mode", ["continue", "link"])
def test_a_late_decision_in_another_trace_is_linked_both_ways(stage_process, report_in_approval, exchange, otlp, mode):
    stage_process("approval", report_in_approval, REPORTFLOW_TRACING_LATE_MESSAGES=mode)
    decision_trace, decision_span = "d" * 32, "c" * 16
    raw_publish(
        exchange,
        "approval.decided",
        json.dumps(
            {
                "report_id": "r-late",
                "stage": "review",
                "approver": {"email": "bob@example.com", "id": "u-3"},
                "decision": "approve",
            }
        ).encode(),
        content_type="application/json",
        type="approval.decided",
        message_id="late-1",
        headers={"traceparent": f"00-{decision_trace}-{decision_span}-01"},
    )
    span = process_span(otlp, "r-late")
    [link] = span["links"]
    if mode == "continue":
        assert span["trace_id"] == UPSTREAM_TRACE and span["parent_id"] == UPSTREAM_SPAN
        assert (link["trace_id"], link["span_id"]) == (decision_trace, decision_span)
    else:
        assert span["trace_id"] == decision_trace and span["parent_id"] == decision_span
        assert (link["trace_id"], link["span_id"]) == (UPSTREAM_TRACE, UPSTREAM_SPAN)
    assert span["attributes"]["approval.stage"] == "review" and span["attributes"]["approval.decision"] == "approve"
    assert span["attributes"]["enduser.id"] == "u-3" and span["attributes"]["enduser.role"] == "approver"
    assert "user.email" not in span["attributes"]  # PII stays out unless tracing.record_emails


# -- errors and logs ----------------------------------------------------------------------------------------
def test_errors_are_recorded_with_status_and_the_log_lines_carry_the_ids(stage_process, sqlite_url, exchange, otlp):
    pipeline = stage_process("generation", sqlite_url, REPORTFLOW_LOG_FORMAT="json")
    raw_publish(
        exchange,
        "report.created",
        json.dumps(
            {
                "report_id": "r-ghost",
                "title": "t",
                "template": "standard",
                "submitter": {"email": "a@example.com"},
                "stages": ["s"],
            }
        ).encode(),
        content_type="application/json",
        type="report.created",
        message_id="ghost",
        headers={"traceparent": f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"},
    )
    span = process_span(otlp, "r-ghost")
    pipeline.stop()
    assert span["status"] == StatusCode.ERROR.value
    assert span["attributes"]["error.type"] == "ReportNotFound"
    assert "exception" in span["events"]
    dead_letter = next(s for s in otlp.spans if s["name"] == f"dead-letter {exchange}.generation")
    assert dead_letter["parent_id"] == span["span_id"]
    lines = [
        json.loads(line)
        for line in (pipeline.folder / "generation.log").read_text().splitlines()
        if line.startswith("{")
    ]
    failed = [line for line in lines if "failed for good" in line["message"]]
    assert failed and failed[0]["trace_id"] == UPSTREAM_TRACE and failed[0]["span_id"] == span["span_id"]
    assert failed[0]["service"] == "reportflow-generation" and "ReportNotFound" in failed[0]["exception"]


def test_an_unreachable_collector_costs_spans_not_service(stage_process, sqlite_url, exchange, tap, tmp_path):
    pipeline = stage_process(
        "creation",
        sqlite_url,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        OTEL_EXPORTER_OTLP_TIMEOUT="1",
    )
    for n in range(20):
        publish_request(exchange, f"r-nocollector-{n}", {})
    tap.wait_for("report.created", 20, timeout=60)

    def failures():
        files = list((tmp_path / "storage" / "status").glob("creation-*.json"))
        status = json.loads(files[0].read_text()) if files else {}
        return (status.get("spans") or {}).get("export_failures")

    wait_until(failures, 30, what="export failures in the status file")
    assert pipeline.stop() == {"creation": 0}


def test_spans_also_travel_over_otlp_grpc(stage_process, sqlite_url, exchange, tap):
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import (
        trace_service_pb2,
        trace_service_pb2_grpc,
    )

    received = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.extend(span.name for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        stage_process(
            "creation",
            sqlite_url,
            OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
            OTEL_EXPORTER_OTLP_INSECURE="true",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        )
        publish_request(exchange, "r-grpc", {})
        tap.wait_for("report.created")
        wait_until(lambda: any(n.startswith("process ") for n in received), 30, what="spans over gRPC")
    finally:
        server.stop(None)


# -- the pieces ---------------------------------------------------------------------------------------------
def test_resource_attributes_follow_the_standard_variables(monkeypatch):
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=staging,team=reports")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "reports-generation")
    with tracing.switched(tracing.enabled()):
        provider = tracing.setup_tracing("reportflow-generation", TracingSettings(sampling_ratio=0.5), "test")
    attributes = provider.resource.attributes
    assert attributes["service.name"] == "reports-generation"
    assert attributes["deployment.environment.name"] == "staging" and attributes["team"] == "reports"
    assert attributes["service.namespace"] == "reportflow" and attributes["service.version"]
    assert "0.5" in provider.sampler.get_description() and "ParentBased" in provider.sampler.get_description()


def test_decorators_record_errors_and_cost_nothing_when_tracing_is_off(finished_spans):
    @tracing.trace_external_call("smtp", "send")
    def send(fail: bool):
        if fail:
            raise ConnectionError("refused")
        return "ok"

    @tracing.trace_function
    def plain():
        return 1

    assert send(False) == "ok" and plain() == 1
    with pytest.raises(ConnectionError):
        send(True)
    spans = {s.name: s for s in finished_spans()}
    assert spans["smtp send"].kind == trace.SpanKind.CLIENT
    assert spans["smtp send"].status.status_code == StatusCode.ERROR
    assert spans["smtp send"].events[0].name == "exception"
    traced = spans["test_decorators_record_errors_and_cost_nothing_when_tracing_is_off.<locals>.plain"]
    assert traced.attributes["code.function.name"].endswith("plain") and traced.status.is_ok
    with tracing.switched(False):
        before = len(finished_spans())
        assert send(False) == "ok"
        assert len(finished_spans()) == before


# -- from a report to its trace -------------------------------------------------------------------------------
def test_the_waterfall_renders_from_a_local_trace_file(tmp_path):
    provider = TracerProvider(resource=Resource({"service.name": "reportflow-test"}))
    provider.add_span_processor(SimpleSpanProcessor(tracing.JsonLinesExporter(tmp_path, "reportflow-test")))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("process reportflow:report.created:reportflow.generation") as root:
        with tracer.start_as_current_span("render pdf"):
            time.sleep(0.01)
        try:
            with tracer.start_as_current_span("store document"):
                raise OSError("disk full")
        except OSError:
            pass
    trace_id = format(root.get_span_context().trace_id, "032x")
    rows = load_from_files(tmp_path, trace_id)
    text = waterfall(rows)
    lines = text.splitlines()
    assert lines[0].startswith(f"trace {trace_id}: 3 spans")
    assert lines[2].endswith("reportflow-test  process reportflow:report.created:reportflow.generation")
    assert lines[3].endswith("reportflow-test    render pdf")  # indented under its parent
    assert "store document  [error: OSError: disk full]" in lines[4]


class _RecordedJaeger:
    def __init__(self, document: dict, trace_id: str):
        self.paths = []
        recorded = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                recorded.paths.append(self.path)
                ok = self.path == f"/api/v3/traces/{trace_id}"
                body = json.dumps(document if ok else {"error": {"message": "trace not found"}}).encode()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_reportflow_trace_renders_a_recorded_jaeger_api_v3_response(sqlite_url, uow_on, tmp_path):
    document = json.loads((DATA / "jaeger-api-v3-trace.json").read_text())
    trace_id = "5b8efff798038103d269b633813fc60c"
    jaeger = _RecordedJaeger(document, trace_id)
    handle(
        uow_on(sqlite_url),
        creation.on_report_requested,
        Event(
            "report.requested",
            sample_request(report_id="r-jaeger"),
            trace_context={"traceparent": f"00-{trace_id}-{'1' * 16}-01"},
        ),
    )
    try:
        result = CliRunner().invoke(
            cli,
            ["trace", "r-jaeger"],
            env={
                "REPORTFLOW_DATABASE_URL": sqlite_url,
                "JAEGER_QUERY_URL": jaeger.url,
                "REPORTFLOW_CONFIG_DIR": str(tmp_path),
            },
        )
    finally:
        jaeger.server.shutdown()
    assert result.exit_code == 0, result.output
    assert jaeger.paths == [f"/api/v3/traces/{trace_id}"]
    lines = result.output.splitlines()
    assert lines[0] == f"trace {trace_id}: 5 spans over 0.910 s"
    assert "upstream-crm" in lines[2] and lines[2].endswith("publish reportflow:report.requested")
    assert lines[3].endswith("  process reportflow:report.requested:reportflow.creation")
    assert lines[5].endswith("      render pdf  [error: RenderTimeout: render took longer than 300s]")
    assert lines[6].endswith("  process reportflow:approval.decided:reportflow.approval  [1 link(s)]")
    assert len(spans_from_otlp_json(document)) == 5


def test_reportflow_publish_starts_the_reports_trace_and_flushes_it_on_exit(tmp_path, exchange, tap, otlp):
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps(sample_request(report_id="r-cli")))
    env = {
        **os.environ,
        "REPORTFLOW_AMQP_URL": TEST_AMQP_URL,
        "REPORTFLOW_EXCHANGE": exchange,
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
    }
    run = subprocess.run(
        [str(Path(sys.executable).parent / "reportflow"), "publish", "request", str(request_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    published = json.loads(run.stdout)
    [(_, _, properties)] = tap.wait_for("report.requested")
    assert properties.headers["traceparent"].split("-")[1] == published["trace_id"]
    [span] = [s for s in otlp.spans if s["trace_id"] == published["trace_id"]]  # exported before it exited
    assert (span["service"], span["name"]) == ("reportflow-cli", f"publish {exchange}:report.requested")


@pytest.mark.parametrize(
    "stored, sampled",
    [
        ({"traceparent": f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"}, True),
        ({"traceparent": f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-00"}, False),
        ({"b3": f"{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-1"}, True),  # OTEL_PROPAGATORS=b3 stores this instead
        ({"b3": f"{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-0"}, False),
        ({}, False),
    ],
)
def test_a_stored_context_is_read_as_sampled_or_not_in_any_format(stored, sampled):
    from reportflow.consumers.runtime.telemetry import sampled as is_sampled

    assert is_sampled(stored) is sampled


def test_an_unsampled_messages_sql_meets_no_instrumentation(sqlite_url, tracer_provider):
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from reportflow.consumers.bootstrap import session_factory
    from reportflow.shared.config import Settings

    sessions = session_factory(Settings(database_url=sqlite_url), tracer_provider)
    plain, traced = sessions.kw["bind"], sessions.always_traced.kw["bind"]
    assert plain is not traced and plain.pool is traced.pool  # one pool: a view of the engine, not a second
    assert len(plain.dispatch.before_cursor_execute) == 0  # nothing for a statement to ask
    # nor for a transaction: the instrumentation's pool listeners feed an OpenTelemetry metric nobody reads
    pool_listeners = [*plain.pool.dispatch.checkout, *plain.pool.dispatch.checkin, *plain.pool.dispatch.connect]
    assert not any("opentelemetry" in getattr(listener, "__module__", "") for listener in pool_listeners)
    unsampled = NonRecordingSpan(SpanContext(int(UPSTREAM_TRACE, 16), int(UPSTREAM_SPAN, 16), False, TraceFlags(0)))
    with trace.use_span(unsampled), sessions() as session:
        assert session.get_bind() is plain
    with tracer_provider.get_tracer("tests").start_as_current_span("sampled"), sessions() as session:
        assert session.get_bind() is traced
    with sessions() as session:  # outside any span: the runtime's own bookkeeping
        assert session.get_bind() is plain
    plain.dispose()


def _delivery_in(traceparent: str | None):
    """A report.created delivery that arrives in the given upstream trace (or none), and its event."""
    import pika

    from reportflow.consumers.runtime import Delivery
    from reportflow.shared.events import encode, message_properties
    from tests.helpers import first_event

    event = Event("report.created", first_event("r-unsampled-upstream"))
    properties = pika.BasicProperties(**message_properties(event, {"traceparent": traceparent} if traceparent else {}))
    return Delivery(None, 1, "test", event.type, properties, encode(event), False), event


def _process_span_of(traceparent: str | None, provider, describe=None):
    """What a stage's process span is for a delivery in that trace (None: with no trace context): whether it
    records, whether instrumentation may run inside it, and the trace headers its events would carry."""
    from opentelemetry.instrumentation.utils import is_instrumentation_enabled

    from reportflow.consumers.runtime.telemetry import Telemetry
    from reportflow.consumers.stage import Stage
    from reportflow.shared.trace_context import carrier_of_current

    stage = Stage("generation", {}, describe=describe)
    telemetry = Telemetry(stage, TracingSettings(), None, ("127.0.0.1", 5672), provider)
    delivery, event = _delivery_in(traceparent)
    with telemetry.process(delivery, event, "test", "test.generation") as span:
        return span.is_recording(), is_instrumentation_enabled(), carrier_of_current()


def test_a_message_in_an_unsampled_trace_carries_its_context_on_and_makes_no_span(tracer_provider, finished_spans):
    unsampled = f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-00"
    recording, instrumented, carried = _process_span_of(unsampled, tracer_provider)
    assert not recording and not instrumented
    assert carried["traceparent"] == unsampled  # as it came: no span of reportflow's stands between
    assert not finished_spans()

    sampled = f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"
    recording, instrumented, carried = _process_span_of(sampled, tracer_provider)
    assert recording and instrumented
    assert carried["traceparent"] != sampled and carried["traceparent"].startswith(f"00-{UPSTREAM_TRACE}-")
    [process] = finished_spans()
    assert format(process.parent.span_id, "016x") == UPSTREAM_SPAN


def test_a_sampler_named_in_the_environment_is_asked_even_in_an_unsampled_trace(monkeypatch):
    """OTEL_TRACES_SAMPLER may keep what its upstream did not (always_on): then every message asks it."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    with tracing.switched(tracing.enabled()):
        provider = tracing.setup_tracing("reportflow-generation", TracingSettings(), "test")
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    recording, instrumented, _ = _process_span_of(f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-00", provider)
    assert recording and instrumented
    [process] = memory.get_finished_spans()
    assert process.context.trace_id == int(UPSTREAM_TRACE, 16)


class _DescribeCalls:
    """A stage's describe that counts how often the runtime asks it for a span's attributes."""

    def __init__(self):
        self.calls = 0

    def __call__(self, message) -> dict:
        self.calls += 1
        return {"report.template": message.payload["template"]}


def test_a_hop_builds_its_spans_attributes_only_when_it_records(monkeypatch):
    """With reportflow's own sampler (a ratio of the trace id), an unsampled hop that starts its trace builds
    no attributes, and carries its new context on; a sampled one gets them all. Tracing off builds none."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import NoOpTracerProvider

    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    with tracing.switched(tracing.enabled()):
        provider = tracing.setup_tracing("reportflow-generation", TracingSettings(sampling_ratio=0.0), "test")
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    describe = _DescribeCalls()

    recording, instrumented, carried = _process_span_of(None, provider, describe)
    assert not recording and not instrumented and describe.calls == 0
    _, trace_id, _, flags = carried["traceparent"].split("-")
    assert trace_id != UPSTREAM_TRACE and not int(flags, 16) & 1  # a new trace, carried on unsampled
    _process_span_of(None, NoOpTracerProvider(), describe)
    assert describe.calls == 0

    recording, _, _ = _process_span_of(f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01", provider, describe)
    assert recording and describe.calls == 1
    [process] = memory.get_finished_spans()
    assert process.attributes["report.template"] == "standard"
    assert process.attributes["report.id"] == "r-unsampled-upstream"
    assert process.attributes["messaging.operation.type"] == "process"


def test_a_sampler_that_may_read_attributes_sees_them_at_span_start(monkeypatch):
    """A sampler named by OTEL_TRACES_SAMPLER may decide on attributes: it is given them all, at start."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler

    class SeesAttributes(Sampler):
        seen: list = []

        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None):
            self.seen.append(dict(attributes or {}))
            return ALWAYS_ON.should_sample(parent_context, trace_id, name, kind, attributes, links)

        def get_description(self) -> str:
            return "SeesAttributes"

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    with tracing.switched(tracing.enabled()):
        named = tracing.setup_tracing("reportflow-generation", TracingSettings(), "test")
    assert named.sampler_reads_attributes
    sampler = SeesAttributes()
    provider = tracing.ReportflowTracerProvider(sampler=sampler, sampler_reads_attributes=True)
    describe = _DescribeCalls()
    recording, _, _ = _process_span_of(None, provider, describe)
    assert recording
    [seen] = sampler.seen
    assert seen["report.template"] == "standard" and seen["report.id"] == "r-unsampled-upstream"
