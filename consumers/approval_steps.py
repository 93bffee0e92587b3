"""What approval does to a report, step by step, for its handlers (approval, approval_requests,
approval_timers): open a stage and ask its approvers, set the stage's timers, approve or reject it, close
it, record a step of the report's history, refuse what is not allowed."""

from __future__ import annotations

from reportflow.shared.approval_policy import after
from reportflow.shared.mail import InvalidAddress, check_address
from reportflow.shared.models import ApprovalStage, ApprovalStep, Refusal, Report

REMINDER_DUE, DEADLINE_DUE = "approval.reminder_due", "approval.deadline_due"


def open_stage(uow, report: Report, stage: ApprovalStage, document: dict | None, clock) -> None:
    now = clock()
    stage.status, stage.opened_at = "open", now
    stage.deadline_at = after(now, stage.definition["deadline"]) if stage.definition.get("deadline") else None
    report.status = "in_approval"
    ask(uow, report, stage, stage.approvers, "opened", document)
    set_timers(uow, stage, now)


def ask(uow, report: Report, stage: ApprovalStage, approvers: list[str], reason: str, document=None) -> None:
    requested = {
        "report_id": report.id,
        "title": report.title,
        "stage": stage_ref(report, stage),
        "approvers": list(approvers),
        "reason": reason,
        "revision": report.revision,
    }
    if stage.deadline_at:
        requested["deadline_at"] = stage.deadline_at.isoformat()
    document = document or _draft(report)
    if document:
        requested["document"] = document
    uow.emit("approval.requested", requested)


def approve_stage(uow, report: Report, stage: ApprovalStage, clock) -> None:
    """The stage is approved: open the next, or, after the last, approve the report."""
    close_stage(uow, stage, "approved", clock)
    following = [s for s in report.stages if s.position > stage.position]
    if following:
        open_stage(uow, report, following[0], None, clock)
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


def reject_stage(uow, report: Report, stage: ApprovalStage, clock) -> None:
    close_stage(uow, stage, "rejected", clock)
    report.status = "rejected"


def close_stage(uow, stage: ApprovalStage, outcome: str, clock) -> None:
    stage.status, stage.closed_at = outcome, clock()
    uow.cancel_timers(stage.timer_key)


def set_timers(uow, stage: ApprovalStage, now) -> None:
    """The stage's deadline, and its first reminder if that comes before the deadline."""
    due = {"report_id": stage.report_id, "revision": stage.revision, "stage": stage.name, "round": timer_round(stage)}
    if stage.deadline_at:
        uow.schedule(DEADLINE_DUE, due, stage.deadline_at, stage.timer_key)
    remind_later(uow, stage, now, due)


def remind_later(uow, stage: ApprovalStage, now, due: dict) -> None:
    every = stage.definition.get("remind_every")
    if every and (stage.deadline_at is None or after(now, every) < stage.deadline_at):
        uow.schedule(REMINDER_DUE, due, after(now, every), stage.timer_key)


def timer_round(stage: ApprovalStage) -> int:
    """Which deadline a timer belongs to: the first (0) or the one after an escalation (1)."""
    return 1 if stage.escalated else 0


def record_step(uow, report: Report, stage: ApprovalStage | None, kind: str, actor: str | None, **detail) -> None:
    """A step of the report's history that has no row of its own elsewhere (models.ApprovalStep)."""
    uow.add(
        ApprovalStep(
            report_id=report.id,
            revision=report.revision,
            stage_name=stage.name if stage else None,
            kind=kind,
            actor=actor,
            detail={k: v for k, v in detail.items() if v is not None},
        )
    )


def stage_ref(report: Report, stage: ApprovalStage) -> dict:
    return {"name": stage.name, "position": stage.position, "rule": stage.rule, "of": len(report.stages)}


def _draft(report: Report) -> dict | None:
    draft = report.document("draft")
    return draft.as_event() if draft else None


def refuse(uow, message_id: str, asked: dict, reason: str, action: str = "decide") -> None:
    """Record what was not applied and why, emit approval.refused, and say so to the runtime (the span)."""
    person: dict = next((asked[k] for k in ("approver", "submitter") if isinstance(asked.get(k), dict)), {})
    email = _text(person, "email")
    report_id, stage_name = _text(asked, "report_id"), _text(asked, "stage")
    decision = _text(asked, "decision") if action == "decide" else action
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
            "action": action,
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
