"""The spans' wire encoding (shared/otlp_wire.py) against the SDK's own encoder: for any spans the SDK
makes, the bytes parse to the very message the SDK's encoder builds; and the exporter that uses it sends
a collector what the SDK's would."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from reportflow.shared.otlp_wire import SpanEncoder, http_exporter
from tests.helpers import free_port

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_SCALARS = [st.text(max_size=30), st.booleans(), _INT64, st.floats(allow_nan=False)]
_VALUES = st.one_of(*_SCALARS, *(st.lists(s, max_size=4) for s in _SCALARS))
_ATTRIBUTES = st.dictionaries(st.sampled_from(["a", "b", "messaging.system", "report.id", "ünï", ""]), _VALUES)
_IDS = st.tuples(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1))


@st.composite
def _span_plans(draw) -> dict:
    return {
        "name": draw(st.text(max_size=40)),
        "kind": draw(st.sampled_from(list(SpanKind))),
        "attributes": draw(_ATTRIBUTES),
        "parent": draw(st.none() | st.tuples(_IDS, st.booleans())),  # (ids, remote)
        "trace_state": draw(st.sampled_from([None, [("vendor", "x1")], [("a", "1"), ("b", "2")]])),
        "events": draw(st.lists(st.tuples(st.text(max_size=10), _ATTRIBUTES), max_size=2)),
        "links": draw(st.lists(st.tuples(_IDS, _ATTRIBUTES, st.booleans()), max_size=2)),
        "status": draw(st.sampled_from([None, (StatusCode.OK, None), (StatusCode.ERROR, "it broke: ß")])),
    }


def _made(plans: list[dict], resource_attributes: dict) -> list:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(resource_attributes))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracers = [provider.get_tracer("one"), provider.get_tracer("two", "1.2", schema_url="https://x/s")]
    for n, plan in enumerate(plans):
        parent = None
        if plan["parent"] is not None:
            (trace_id, span_id), remote = plan["parent"]
            state = TraceState(plan["trace_state"]) if plan["trace_state"] else None
            context = SpanContext(trace_id, span_id, remote, TraceFlags(TraceFlags.SAMPLED), state)
            parent = set_span_in_context(NonRecordingSpan(context))
        links = [
            Link(SpanContext(t, s, remote, TraceFlags(TraceFlags.SAMPLED)), attributes)
            for (t, s), attributes, remote in plan["links"]
        ]
        span = tracers[n % 2].start_span(
            plan["name"], context=parent, kind=plan["kind"], attributes=plan["attributes"], links=links
        )
        for name, attributes in plan["events"]:
            span.add_event(name, attributes)
        if plan["status"] is not None:
            span.set_status(Status(*plan["status"]))
        span.end()
    return list(exporter.get_finished_spans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_span_plans(), min_size=1, max_size=5), _ATTRIBUTES.filter(lambda a: "" not in a))
def test_any_spans_encode_to_the_message_the_sdk_builds(plans, resource_attributes):
    spans = _made(plans, resource_attributes)
    encoder = SpanEncoder()
    for _ in range(2):  # the second time from the attributes it kept
        assert ExportTraceServiceRequest.FromString(encoder.request(spans)) == encode_spans(spans)


def test_a_kept_attribute_is_its_own_type_and_field():
    # True == 1 == 1.0 as dict keys, and a span's attribute and an event's are different fields.
    spans = _made(
        [
            {
                "name": "s",
                "kind": SpanKind.INTERNAL,
                "attributes": {"v": value},
                "parent": None,
                "trace_state": None,
                "events": [("e", {"v": value})],
                "links": [],
                "status": None,
            }
            for value in (True, 1, 1.0, "1", -1, math.inf)
        ],
        {},
    )
    encoder = SpanEncoder()
    for _ in range(2):
        assert ExportTraceServiceRequest.FromString(encoder.request(spans)) == encode_spans(spans)


def _one_span() -> list:
    return _made(
        [
            {
                "name": "process x",
                "kind": SpanKind.CONSUMER,
                "attributes": {"messaging.system": "rabbitmq", "report.id": "r-1"},
                "parent": None,
                "trace_state": None,
                "events": [("refused", {"reason": "not an approver"})],
                "links": [],
                "status": (StatusCode.ERROR, "refused"),
            }
        ],
        {"service.name": "wire-test"},
    )


def test_the_exporter_sends_a_collector_the_spans(otlp):
    spans = _one_span()
    exporter = http_exporter(otlp.endpoint + "/v1/traces")
    try:
        assert exporter.export(spans).name == "SUCCESS"
    finally:
        exporter.shutdown()
    (received,) = otlp.spans
    assert received["service"] == "wire-test"
    assert received["name"] == "process x" and received["kind"] == SpanKind.CONSUMER.value + 1
    assert received["attributes"] == {"messaging.system": "rabbitmq", "report.id": "r-1"}
    assert received["events"] == ["refused"] and received["status"] == StatusCode.ERROR.value
    assert received["trace_id"] == format(spans[0].context.trace_id, "032x")


def test_a_batch_above_the_request_limit_is_dropped_as_the_sdks_exporter_drops_it(otlp):
    exporter = http_exporter(otlp.endpoint + "/v1/traces", max_request_size=64)
    try:
        assert exporter.export(_one_span()).name == "FAILURE"
    finally:
        exporter.shutdown()
    assert otlp.requests == 0


def test_the_exporter_sends_by_urllib3_unless_the_environment_asks_for_what_only_requests_does(otlp, monkeypatch):
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "NO_PROXY",
                     "no_proxy"):  # fmt: skip
        monkeypatch.delenv(variable, raising=False)
    direct = http_exporter(otlp.endpoint + "/v1/traces")
    try:
        assert type(direct._client._transport).__module__.endswith("_urllib3")
        assert direct.export(_one_span()).name == "SUCCESS"
    finally:
        direct.shutdown()
    assert otlp.requests == 1

    # A proxy in the environment: requests is kept, and sends through it (the receiver stands in for the
    # proxy). The collector named in the endpoint is not listening, so a direct send would fail.
    monkeypatch.setenv("HTTP_PROXY", otlp.endpoint)
    proxied = http_exporter(f"http://127.0.0.1:{free_port()}/v1/traces", timeout=5)
    try:
        assert proxied.export(_one_span()).name == "SUCCESS"
    finally:
        proxied.shutdown()
    assert otlp.requests == 2
