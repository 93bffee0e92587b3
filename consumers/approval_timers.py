"""approval's timers: when a stage's reminder is due, emit approval.reminded for those who have not
decided and set the next; when its deadline passes, escalate, reject or approve (approval.deadline_passed).
A timer for a stage that has moved on (closed, another revision, escalated since) does nothing."""

from __future__ import annotations

from reportflow.consumers.approval_steps import (
    approve_stage,
    ask,
    record_step,
    reject_stage,
    remind_later,
    set_timers,
    stage_ref,
    timer_round,
)
from reportflow.shared.approval_policy import after, on_deadline
from reportflow.shared.events import Event
from reportflow.shared.models import ApprovalStage, Report


def on_reminder_due(event: Event, uow, clock) -> None:
    found = _timed_stage(uow, event.payload)
    if found is None or not found[1].undecided:
        return
    report, stage = found
    reminded = {
        "report_id": report.id,
        "title": report.title,
        "stage": stage_ref(report, stage),
        "approvers": stage.undecided,
        "revision": report.revision,
    }
    if stage.deadline_at:
        reminded["deadline_at"] = stage.deadline_at.isoformat()
    uow.emit("approval.reminded", reminded)
    record_step(uow, report, stage, "reminded", None, approvers=stage.undecided)
    remind_later(uow, stage, clock(), event.payload)


def on_deadline_due(event: Event, uow, clock) -> None:
    found = _timed_stage(uow, event.payload)
    if found is None:
        return
    report, stage = found
    undecided = stage.undecided
    policy = on_deadline(stage.definition)
    if policy == "escalate":
        outcome = "rejected" if stage.escalated else "escalated"  # a deadline passed twice rejects
    else:
        outcome = {"reject": "rejected", "approve": "approved"}[policy]
    uow.emit(
        "approval.deadline_passed",
        {
            "report_id": report.id,
            "title": report.title,
            "stage": stage.name,
            "outcome": outcome,
            "undecided": undecided,
        },
    )
    record_step(uow, report, stage, "deadline_passed", None, outcome=outcome, undecided=undecided)
    if outcome == "escalated":
        _escalate(uow, report, stage, undecided, clock)
    elif outcome == "approved":
        approve_stage(uow, report, stage, clock)
    else:
        reject_stage(uow, report, stage, clock)


def _timed_stage(uow, due: dict) -> tuple[Report, ApprovalStage] | None:
    """The report and stage a timer is for, if it still applies: same revision, stage open, same round."""
    report = uow.report(due["report_id"], for_update=True)
    stage = report.stage_named(due["stage"]) if report and report.revision == due["revision"] else None
    if report is None or stage is None or stage.status != "open" or timer_round(stage) != due["round"]:
        return None
    return report, stage


def _escalate(uow, report: Report, stage: ApprovalStage, undecided: list[str], clock) -> None:
    """The escalation approvers replace those who have not decided; the rule stays; the deadline runs
    once more, from now."""
    now = clock()
    decided = [a for a in stage.approvers if a not in undecided]
    escalate_to = [a for a in stage.definition["escalate_to"] if a not in decided]
    stage.approvers = decided + escalate_to
    stage.escalated = True
    stage.deadline_at = after(now, stage.definition["deadline"])
    uow.cancel_timers(stage.timer_key)
    set_timers(uow, stage, now)
    uow.emit(
        "approval.escalated",
        {
            "report_id": report.id,
            "stage": stage.name,
            "replaced": undecided,
            "escalate_to": escalate_to,
            "deadline_at": stage.deadline_at.isoformat(),
        },
    )
    record_step(uow, report, stage, "escalated", None, replaced=undecided, escalate_to=escalate_to)
    if escalate_to:
        ask(uow, report, stage, escalate_to, "escalated")
