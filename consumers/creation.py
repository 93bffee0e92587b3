"""creation: on report.requested, validate and store the report, emit report.created;
a request that cannot be accepted emits report.invalid with the reasons, so the submitter hears why."""

from __future__ import annotations

from reportflow.consumers.descriptions import describe
from reportflow.consumers.stage import Stage
from reportflow.shared.approval_policy import new_stages, stage_violations
from reportflow.shared.documents import TEMPLATES
from reportflow.shared.events import Event, InvalidMessage, new_report_id
from reportflow.shared.mail import InvalidAddress, check_address, one_line
from reportflow.shared.models import Report


def on_report_requested(event: Event, uow) -> None:
    request = event.payload
    report_id = request.get("report_id") or new_report_id()
    reasons = _business_rule_violations(request)
    if uow.report(report_id) is not None:
        reasons.append(f"report_id: a report {report_id!r} already exists")
    if reasons:
        _emit_invalid(uow, report_id, request, reasons, event.message_id)
        return

    report = Report(
        id=report_id,
        title=request["title"],
        template=request["template"],
        status="created",
        submitter=request["submitter"],
        client=request["client"],
        data=request["data"],
        trace_context=dict(event.trace_context),
        request_message_id=event.message_id,
        revision=1,
    )
    report.all_stages.extend(new_stages(request["approval_stages"], revision=1))
    uow.add(report)
    uow.emit(
        "report.created",
        {
            "report_id": report.id,
            "title": report.title,
            "template": report.template,
            "submitter": report.submitter,
            "client": report.client,
            "stages": [s["name"] for s in request["approval_stages"]],
        },
    )


def on_unreadable_request(message: InvalidMessage, uow) -> None:
    payload = message.payload or {}
    report_id = message.report_id
    _emit_invalid(uow, report_id, payload, message.reasons, message.message_id)


def _business_rule_violations(request: dict) -> list[str]:
    """What the schema cannot say: a known template, and the stages' own rules (approval_policy)."""
    reasons = []
    if request["template"] not in TEMPLATES:
        reasons.append(f"template: unknown template {request['template']!r}; known: {', '.join(sorted(TEMPLATES))}")
    return reasons + stage_violations(request["approval_stages"])


def _emit_invalid(uow, report_id, request: dict, reasons: list[str], message_id: str) -> None:
    title = request.get("title")
    uow.emit(
        "report.invalid",
        {
            "report_id": report_id,
            "title": one_line(title)[:200] if isinstance(title, str) else None,
            "submitter": _reachable_person(request.get("submitter")),
            "request_message_id": message_id,
            "reasons": reasons,
        },
    )


def _reachable_person(person) -> dict | None:
    """The submitter of a bad request, if what they sent is enough to write back to them."""
    if not isinstance(person, dict):
        return None
    try:
        reachable = {"email": check_address(person.get("email"))}
    except InvalidAddress:
        return None
    for key in ("id", "name", "role"):
        if isinstance(person.get(key), str):
            reachable[key] = person[key][:100]
    return reachable


STAGE = Stage(
    name="creation",
    handlers={"report.requested": on_report_requested},
    on_invalid={"report.requested": on_unreadable_request},
    describe=describe,
    waits_only_on_database=True,
)
