"""approval: on report.generated, open the first stage and emit approval.requested;
on approval.decided, refuse what is not allowed (recorded, approval.refused), else record the decision
and wait for more, open the next stage, emit report.approved after the last, or report.rejected."""

from __future__ import annotations

from sqlalchemy import select

from reportflow.consumers.descriptions import describe
from reportflow.consumers.stage import Stage
from reportflow.shared.events import Event, InvalidMessage
from reportflow.shared.mail import InvalidAddress, check_address
from reportflow.shared.models import ApprovalStage, Decision, Refusal, Report, utcnow


def on_report_generated(event: Event, uow) -> None:
    report = uow.report(event.report_id, for_update=True)
    if report is None or report.status != "generated":
        return  # a regeneration after approval began changes nothing here
    _open(uow, report, report.stages[0], event.payload["document"])


def on_approval_decided(event: Event, uow) -> None:
    decided = event.payload
    report = uow.report(decided["report_id"], for_update=True)
    approver = decided["approver"]["email"].lower()
    if report is None:
        _refuse(uow, event.message_id, decided, "unknown report")
        return
    stage, refused = report.stage_open_to(decided["stage"], approver)
    if refused:
        _refuse(uow, event.message_id, decided, refused.reason)
        return

    stage.decisions.append(
        Decision(
            report_id=report.id,
            approver_email=approver,
            approver_id=decided["approver"].get("id"),
            decision=decided["decision"],
            comment=decided.get("comment"),
            message_id=event.message_id,
        )
    )

    if decided["decision"] == "reject":
        _close(stage, "rejected")
        report.status = "rejected"
        uow.emit(
            "report.rejected",
            {
                "report_id": report.id,
                "title": report.title,
                "stage": stage.name,
                "approver": decided["approver"],
                "comment": decided.get("comment"),
            },
        )
        return
    if not _stage_complete(stage):
        return
    _close(stage, "approved")
    following = [s for s in report.stages if s.position > stage.position]
    if following:
        draft = report.document("draft")
        _open(uow, report, following[0], draft.as_event() if draft else None)
        return
    report.status = "approved"
    uow.emit(
        "report.approved",
        {
            "report_id": report.id,
            "stages": [
                {
                    "name": s.name,
                    "decisions": [
                        {"approver": d.approver_email, "decision": d.decision, "comment": d.comment}
                        for d in s.decisions
                    ],
                }
                for s in report.stages
            ],
        },
    )


def on_unreadable_decision(message: InvalidMessage, uow) -> None:
    _refuse(uow, message.message_id, message.payload or {}, "; ".join(message.reasons))


def _stage_complete(stage: ApprovalStage) -> bool:
    approved = {d.approver_email for d in stage.decisions if d.decision == "approve"}
    return bool(approved) if stage.rule == "any" else approved >= set(stage.approvers)


def _open(uow, report: Report, stage: ApprovalStage, document: dict | None) -> None:
    stage.status, stage.opened_at = "open", utcnow()
    report.status = "in_approval"
    requested = {
        "report_id": report.id,
        "title": report.title,
        "stage": {"name": stage.name, "position": stage.position, "rule": stage.rule, "of": len(report.stages)},
        "approvers": list(stage.approvers),
    }
    if document:
        requested["document"] = document
    uow.emit("approval.requested", requested)


def _close(stage: ApprovalStage, outcome: str) -> None:
    stage.status, stage.closed_at = outcome, utcnow()


def _refuse(uow, message_id: str, decided: dict, reason: str) -> None:
    approver: dict = decided["approver"] if isinstance(decided.get("approver"), dict) else {}
    email = _text(approver, "email")
    report_id, stage_name, decision = _text(decided, "report_id"), _text(decided, "stage"), _text(decided, "decision")
    uow.add(
        Refusal(
            report_id=report_id,
            stage_name=stage_name,
            approver_email=email,
            decision=decision,
            reason=reason,
            message_id=message_id,
        )
    )
    uow.emit(
        "approval.refused",
        {
            "report_id": report_id,
            "stage": stage_name,
            "decision": decision,
            "reason": reason,
            "approver": {"email": email} if _is_address(email) else None,
            "decision_message_id": message_id,
        },
    )
    uow.refused(reason)


def _text(record: dict, key: str) -> str | None:
    value = record.get(key)
    return value[:200] if isinstance(value, str) else None


def _is_address(value: str | None) -> bool:
    try:
        check_address(value)
        return True
    except InvalidAddress:
        return False


def report_trace(message, session) -> dict | None:
    """A decision arrives in its approver's trace, maybe days later: it belongs in the report's."""
    if message.type != "approval.decided":
        return None
    return session.scalar(select(Report.trace_context).where(Report.id == message.report_id))


STAGE = Stage(
    name="approval",
    handlers={"report.generated": on_report_generated, "approval.decided": on_approval_decided},
    on_invalid={"approval.decided": on_unreadable_decision},
    describe=describe,
    stored_trace=report_trace,
)
