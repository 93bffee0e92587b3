"""The event contract: schemas, and how a delivery is read into an event or a stated reason."""

from __future__ import annotations

import json

import pytest

from reportflow import schemas
from reportflow.shared.events import (
    Event,
    InvalidMessage,
    encode,
    message_properties,
    parse,
    validate,
)
from tests.helpers import example_payloads, sample_request

LIMIT = 1_000_000


def read(body, event_type="report.requested", content_type="application/json", message_id="m-1"):
    """One delivery read as the runtime reads it: parsed, then validated."""
    parsed = parse(event_type, message_id, content_type, body, LIMIT)
    return parsed if isinstance(parsed, InvalidMessage) else validate(parsed)


def test_every_event_in_the_flow_has_a_schema():
    assert set(schemas.event_types()) >= {
        "report.requested",
        "approval.decided",
        "report.created",
        "report.invalid",
        "report.generated",
        "approval.requested",
        "approval.refused",
        "report.approved",
        "report.rejected",
        "report.finalized",
    }


def test_the_example_request_is_valid():
    message = read(json.dumps(sample_request()).encode())
    assert isinstance(message, Event) and message.payload["title"] == "Q3 revenue review"


@pytest.mark.parametrize(
    "body, content_type, event_type, reason",
    [
        (b"{not json", "application/json", "report.requested", "not UTF-8 JSON"),
        (b"\xff\xfe", "application/json", "report.requested", "not UTF-8 JSON"),
        (b"[1, 2]", "application/json", "report.requested", "not a JSON object"),
        (b"{}", "text/plain", "report.requested", "content type 'text/plain'"),
        (b"{}", "application/json", "report.exploded", "unknown event type 'report.exploded'"),
        (b'{"title": 5}', "application/json", "report.requested", "5 is not of type 'string'"),
        (b"x" * (LIMIT + 1), "application/json", "report.requested", "over the limit"),
    ],
)
def test_every_way_a_message_can_be_wrong_is_named(body, content_type, event_type, reason):
    message = read(body, event_type, content_type)
    assert isinstance(message, InvalidMessage)
    assert any(reason in r for r in message.reasons), message.reasons


def test_a_table_over_the_row_limit_is_invalid():
    request = sample_request()
    request["data"]["table"]["rows"] = [["a"] * 5] * 5001
    message = read(json.dumps(request).encode())
    assert isinstance(message, InvalidMessage)
    assert any("data/table/rows" in r for r in message.reasons)


def test_a_message_without_an_id_gets_a_stable_one_so_its_duplicates_are_recognised():
    first = read(b"{nope", message_id=None)
    second = read(b"{nope", message_id=None)
    assert first.message_id == second.message_id and first.message_id.startswith("no-id:")


def test_outgoing_messages_carry_the_contract_properties():
    event = Event("report.created", {"report_id": "r-1"})
    properties = message_properties(event, {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    assert properties["content_type"] == "application/json"
    assert properties["delivery_mode"] == 2
    assert properties["message_id"] == event.message_id and properties["type"] == "report.created"
    assert properties["correlation_id"] == "r-1"
    assert properties["headers"]["schema_version"] == schemas.SCHEMA_VERSION
    assert properties["headers"]["traceparent"].startswith("00-")
    assert json.loads(encode(event)) == {"report_id": "r-1"}


def _mutations(payload: dict):
    """The payload with each field, at any depth, missing, emptied, mistyped or overlong, and with an
    unknown field: the ways a message breaks a schema of the kinds these are."""
    yield payload
    yield {**payload, "unexpected": 1}
    for key, value in payload.items():
        yield {k: v for k, v in payload.items() if k != key}
        for wrong in (None, 12345, -1, 1.5, True, "", "x" * 5000, "no-at-sign", [], [{}], {}):
            yield {**payload, key: wrong}
        if isinstance(value, dict):
            for inner in _mutations(value):
                yield {**payload, key: inner}
        if isinstance(value, list) and value and isinstance(value[0], dict):
            for inner in _mutations(value[0]):
                yield {**payload, key: [inner, *value[1:]]}


def test_the_compiled_check_agrees_with_jsonschema_on_every_verdict():
    """Valid messages take the compiled check alone, so it must never pass what jsonschema refuses."""
    valid = {"report.requested": sample_request(), **example_payloads("rpt-1")}
    checked = 0
    for event_type, payload in valid.items():
        reference = schemas.validator(event_type)
        assert reference.is_valid(payload), event_type
        for variant in _mutations(payload):
            assert (schemas.errors(event_type, variant) == []) == reference.is_valid(variant), (event_type, variant)
            checked += 1
    assert checked > 500


# -- hostile input that once passed creation and failed later ------------------------------------------
def _with_approver(address: str) -> dict:
    return sample_request(approval_stages=[{"name": "review", "approvers": [address]}])


@pytest.mark.parametrize(
    "request_",
    [
        _with_approver("bob@example.com\n"),  # Python's `$` matches before a final newline
        _with_approver("a,b@example.com"),  # two recipients in one header
        _with_approver("bob@[127.0.0.1]"),
        _with_approver("bob@example.com\r\nBcc: evil@example.com"),
        sample_request(report_id="rtnl\n"),  # a storage folder with a newline in its name
        sample_request(title="Q3\u2028Decide here instead: https://evil.example"),
        sample_request(title="Q3\x0bvertical tab"),
        sample_request(title="Q3\x85next line"),
        sample_request(title="Q3\n\nDecide here instead: https://evil.example"),
        sample_request(approval_stages=[{"name": "review\r\nBcc: x@example.com", "approvers": ["bob@example.com"]}]),
    ],
    ids=[
        "newline-after-address",
        "comma",
        "ip-literal",
        "header-injection",
        "report-id-newline",
        "u2028-title",
        "vt-title",
        "nel-title",
        "blank-lines-title",
        "crlf-stage-name",
    ],
)
def test_strings_that_reach_headers_paths_or_subjects_cannot_carry_line_breaks_or_control_characters(request_):
    message = read(json.dumps(request_).encode())
    assert isinstance(message, InvalidMessage), request_
    assert schemas.validator("report.requested").is_valid(request_) is False  # the reference agrees


@pytest.mark.parametrize(
    "address",
    [
        "bob@example.com\n",
        "a,b@example.com",
        "bob@[127.0.0.1]",
        "bob@localhost",
        "b ob@example.com",
        "\u2028bob@example.com",
        "bob@example.com\x85",
    ],
)
def test_the_mailer_and_the_contract_hold_one_address_rule(address):
    from reportflow.shared.mail import InvalidAddress, check_address

    with pytest.raises(InvalidAddress):
        check_address(address)
    assert not schemas.validator("approval.decided").is_valid(
        {"report_id": "r-1", "stage": "s", "approver": {"email": address}, "decision": "approve"}
    )
    assert check_address("o'brien+q3@mail.example.co.uk") == "o'brien+q3@mail.example.co.uk"


def test_every_schema_states_the_address_rule_alike_and_bounds_every_string_and_list():
    unbounded, email_rules = [], set()

    def walk(node, where):
        if isinstance(node, dict):
            types = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
            if "string" in types and "maxLength" not in node:
                unbounded.append(where)
            if "array" in types and "maxItems" not in node:
                unbounded.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    for event_type in schemas.event_types():
        document = schemas.schema(event_type)
        walk(document, event_type)
        if "email" in document.get("$defs", {}):
            email_rules.add(json.dumps(document["$defs"]["email"], sort_keys=True))
    assert unbounded == []
    assert len(email_rules) == 1


def test_a_huge_invalid_message_is_named_in_a_bounded_list_of_reasons():
    request = sample_request()
    request["data"]["table"]["rows"] = [[{"not": "a cell"}] * 3] * 400
    message = read(json.dumps(request).encode())
    assert len(message.reasons) == schemas.MAX_REASONS + 1 and "more problems" in message.reasons[-1]


def test_deeply_nested_json_is_a_stated_reason_not_a_crash():
    message = read(b"[" * 100_000 + b"]" * 100_000)
    assert isinstance(message, InvalidMessage) and "nested too deeply" in message.reasons[0]


@pytest.mark.parametrize(
    "version, readable",
    [(None, True), ("1", True), ("1.4", True), (b"1", True), ("2", False), ("0", False), ("banana", False)],
)
def test_a_major_schema_version_the_consumer_does_not_read_is_a_stated_reason(version, readable):
    from reportflow.shared.events import parse

    parsed = parse("report.requested", "m-1", "application/json", json.dumps(sample_request()).encode(), LIMIT, version)
    assert isinstance(parsed, Event) is readable
    if not readable:
        assert "upgrade the consumers" in parsed.reasons[0]
