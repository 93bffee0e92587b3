"""approval: walks a report through its stages.

- on report.generated, open the current revision's first stage: emit approval.requested, set its
  reminder and deadline timers;
- on approval.decided, record the decision and wait for more, open the next stage, emit report.approved
  after the last, or report.rejected.
Delegation, withdrawal and resubmission are in approval_requests, reminders and deadlines in
approval_timers, and the steps they share in approval_steps. Whatever is not allowed is refused:
recorded, approval.refused emitted, the refusal on the trace."""

from __future__ import annotations

from sqlalchemy import select

from reportflow.consumers.approval_requests import on_approval_delegated, on_report_resubmitted, on_report_withdrawn
from reportflow.consumers.approval_steps import (
    DEADLINE_DUE,
    REMINDER_DUE,
    approve_stage,
    open_stage,
    refuse,
    reject_stage,
)
from reportflow.consumers.approval_timers import on_deadline_due, on_reminder_due
from reportflow.consumers.descriptions import describe
from reportflow.consumers.stage import Stage
from reportflow.shared.events import Event, InvalidMessage
from reportflow.shared.models import Decision, Report

# What each inbound message asks of approval, as its refusal names it.
_ACTIONS = {
    "approval.decided": "decide",
    "approval.delegated": "delegate",
    "report.withdrawn": "withdraw",
    "report.resubmitted": "resubmit",
}


def on_report_generated(event: Event, uow, clock) -> None:
    report = uow.report(event.report_id, for_update=True)
    if report is None or report.status != "generated" or event.payload.get("revision", 1) != report.revision:
        return  # a regeneration after approval began, or an earlier revision's draft, changes nothing here
    open_stage(uow, report, report.stages[0], event.payload["document"], clock)


def on_approval_decided(event: Event, uow, clock) -> None:
    decided = event.payload
    report = uow.report(decided["report_id"], for_update=True)
    approver = decided["approver"]["email"].lower()
    if report is None:
        refuse(uow, event.message_id, decided, "unknown report")
        return
    stage, refused = report.stage_open_to(decided["stage"], approver)
    if refused:
        refuse(uow, event.message_id, decided, refused.reason)
        return

    stage.decisions.append(
        Decision(
            report_id=report.id,
            approver_email=approver,
            approver_id=decided["approver"].get("id"),
            decision=decided["decision"],
            comment=decided.get("comment"),
            on_behalf_of=stage.delegations.get(approver),
            message_id=event.message_id,
        )
    )
    if decided["decision"] == "reject":
        reject_stage(uow, report, stage, clock)
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
    elif stage.complete:
        approve_stage(uow, report, stage, clock)


def on_unreadable_message(message: InvalidMessage, uow) -> None:
    refuse(uow, message.message_id, message.payload or {}, "; ".join(message.reasons), _ACTIONS[message.type])


def report_trace(message, session) -> dict | None:
    """A decision, a delegation, a withdrawal or a resubmission arrives in its sender's trace, maybe days
    later: it belongs in the report's."""
    if message.type not in _ACTIONS:
        return None
    return session.scalar(select(Report.trace_context).where(Report.id == message.report_id))


STAGE = Stage(
    name="approval",
    handlers={
        "report.generated": on_report_generated,
        "approval.decided": on_approval_decided,
        "approval.delegated": on_approval_delegated,
        "report.withdrawn": on_report_withdrawn,
        "report.resubmitted": on_report_resubmitted,
    },
    on_invalid={event_type: on_unreadable_message for event_type in _ACTIONS},
    timers={REMINDER_DUE: on_reminder_due, DEADLINE_DUE: on_deadline_due},
    describe=describe,
    stored_trace=report_trace,
    waits_only_on_database=True,
)
