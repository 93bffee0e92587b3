"""approval: walks a report through its stages.

- on report.generated, open the current revision's first stage: emit approval.requested, set its
  reminder and deadline timers;
- on approval.decided, record the decision and wait for more, open the next stage, emit report.approved
  after the last, or report.rejected;
- on approval.delegated, put the delegate in the approver's place: approval.reassigned, and
  approval.requested for the delegate;
- on report.withdrawn, end the approval: status withdrawn, timers cancelled, approval.withdrawn;
- on report.resubmitted, of a rejected report: revision N+1 with its stages, emit report.revised (generation
  renders it, and approval starts again from the first stage);
- when a stage's reminder is due, emit approval.reminded for those who have not decided; when its deadline
  passes, escalate, reject or approve (approval.deadline_passed).
Whatever is not allowed is refused: recorded, approval.refused emitted, the refusal on the trace."""

from __future__ import annotations

from sqlalchemy import select

from reportflow.consumers.descriptions import describe
from reportflow.consumers.stage import Stage
from reportflow.shared.approval_policy import after, new_stages, on_deadline, stage_violations
from reportflow.shared.events import Event, InvalidMessage
from reportflow.shared.mail import InvalidAddress, check_address
from reportflow.shared.models import ApprovalStage, ApprovalStep, Decision, Refusal, Report

REMINDER_DUE, DEADLINE_DUE = "approval.reminder_due", "approval.deadline_due"


# -- the stages, one after another -------------------------------------------------------------------
def on_report_generated(event: Event, uow, clock) -> None:
    report = uow.report(event.report_id, for_update=True)
    if report is None or report.status != "generated" or event.payload.get("revision", 1) != report.revision:
        return  # a regeneration after approval began, or an earlier revision's draft, changes nothing here
    _open(uow, report, report.stages[0], event.payload["document"], clock)


def on_approval_decided(event: Event, uow, clock) -> None:
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
            on_behalf_of=stage.delegations.get(approver),
            message_id=event.message_id,
        )
    )
    if decided["decision"] == "reject":
        _reject(uow, report, stage, clock)
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
    elif _stage_complete(stage):
        _approve(uow, report, stage, clock)


def _stage_complete(stage: ApprovalStage) -> bool:
    approved = {d.approver_email for d in stage.decisions if d.decision == "approve"}
    return bool(approved) if stage.rule == "any" else approved >= set(stage.approvers)


def _open(uow, report: Report, stage: ApprovalStage, document: dict | None, clock) -> None:
    now = clock()
    stage.status, stage.opened_at = "open", now
    stage.deadline_at = after(now, stage.definition["deadline"]) if stage.definition.get("deadline") else None
    report.status = "in_approval"
    _ask(uow, report, stage, stage.approvers, "opened", document)
    _set_timers(uow, stage, now)


def _ask(uow, report: Report, stage: ApprovalStage, approvers: list[str], reason: str, document=None) -> None:
    requested = {
        "report_id": report.id,
        "title": report.title,
        "stage": _stage_ref(report, stage),
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


def _approve(uow, report: Report, stage: ApprovalStage, clock) -> None:
    """The stage is approved: open the next, or, after the last, approve the report."""
    _close(uow, stage, "approved", clock)
    following = [s for s in report.stages if s.position > stage.position]
    if following:
        _open(uow, report, following[0], None, clock)
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


def _reject(uow, report: Report, stage: ApprovalStage, clock) -> None:
    _close(uow, stage, "rejected", clock)
    report.status = "rejected"


def _close(uow, stage: ApprovalStage, outcome: str, clock) -> None:
    stage.status, stage.closed_at = outcome, clock()
    uow.cancel_timers(stage.timer_key)


# -- timers: reminders and deadlines --------------------------------------------------------------------
def _set_timers(uow, stage: ApprovalStage, now) -> None:
    """The stage's deadline, and its first reminder if that comes before the deadline."""
    due = {"report_id": stage.report_id, "revision": stage.revision, "stage": stage.name, "round": _round(stage)}
    if stage.deadline_at:
        uow.schedule(DEADLINE_DUE, due, stage.deadline_at, stage.timer_key)
    _remind_later(uow, stage, now, due)


def _remind_later(uow, stage: ApprovalStage, now, due: dict) -> None:
    every = stage.definition.get("remind_every")
    if every and (stage.deadline_at is None or after(now, every) < stage.deadline_at):
        uow.schedule(REMINDER_DUE, due, after(now, every), stage.timer_key)


def _round(stage: ApprovalStage) -> int:
    """Which deadline a timer belongs to: the first (0) or the one after an escalation (1)."""
    return 1 if stage.escalated else 0


def _timed_stage(uow, due: dict) -> tuple[Report, ApprovalStage] | None:
    """The report and stage a timer is for, if it still applies: same revision, stage open, same round."""
    report = uow.report(due["report_id"], for_update=True)
    stage = report.stage_named(due["stage"]) if report and report.revision == due["revision"] else None
    if report is None or stage is None or stage.status != "open" or _round(stage) != due["round"]:
        return None
    return report, stage


def on_reminder_due(event: Event, uow, clock) -> None:
    found = _timed_stage(uow, event.payload)
    if found is None or not found[1].undecided:
        return
    report, stage = found
    reminded = {
        "report_id": report.id,
        "title": report.title,
        "stage": _stage_ref(report, stage),
        "approvers": stage.undecided,
        "revision": report.revision,
    }
    if stage.deadline_at:
        reminded["deadline_at"] = stage.deadline_at.isoformat()
    uow.emit("approval.reminded", reminded)
    _step(uow, report, stage, "reminded", None, approvers=stage.undecided)
    _remind_later(uow, stage, clock(), event.payload)


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
    _step(uow, report, stage, "deadline_passed", None, outcome=outcome, undecided=undecided)
    if outcome == "escalated":
        _escalate(uow, report, stage, undecided, clock)
    elif outcome == "approved":
        _approve(uow, report, stage, clock)
    else:
        _reject(uow, report, stage, clock)


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
    _set_timers(uow, stage, now)
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
    _step(uow, report, stage, "escalated", None, replaced=undecided, escalate_to=escalate_to)
    if escalate_to:
        _ask(uow, report, stage, escalate_to, "escalated")


# -- what approvers and submitters ask besides deciding ------------------------------------------------
def on_approval_delegated(event: Event, uow, clock) -> None:
    delegated = event.payload
    report = uow.report(delegated["report_id"], for_update=True)
    approver, delegate = delegated["approver"]["email"].lower(), delegated["delegate"]["email"].lower()
    if report is None:
        _refuse(uow, event.message_id, delegated, "unknown report", "delegate")
        return
    stage, refused = report.stage_open_to(delegated["stage"], approver)
    if refused:
        _refuse(uow, event.message_id, delegated, refused.reason, "delegate")
        return
    if delegate in stage.approvers or delegate in stage.delegations.values():
        _refuse(uow, event.message_id, delegated, f"{delegate} already has a part in stage {stage.name!r}", "delegate")
        return
    stage.approvers = [delegate if a == approver else a for a in stage.approvers]
    stage.delegations = {**stage.delegations, delegate: approver}
    uow.emit(
        "approval.reassigned",
        {
            "report_id": report.id,
            "stage": stage.name,
            "approver": delegated["approver"],
            "delegate": delegated["delegate"],
            "comment": delegated.get("comment"),
        },
    )
    _step(uow, report, stage, "delegated", approver, delegate=delegate, comment=delegated.get("comment"))
    _ask(uow, report, stage, [delegate], "delegated")


def on_report_withdrawn(event: Event, uow, clock) -> None:
    withdrawn = event.payload
    report = uow.report(withdrawn["report_id"], for_update=True)
    refused = _not_the_submitters(report, withdrawn) or _not_withdrawable(report)
    if refused:
        _refuse(uow, event.message_id, withdrawn, refused, "withdraw")
        return
    open_stage = next((s for s in report.stages if s.status == "open"), None)
    still_asked = open_stage.undecided if open_stage else []
    if open_stage:
        _close(uow, open_stage, "withdrawn", clock)
    report.status = "withdrawn"
    uow.emit(
        "approval.withdrawn",
        {
            "report_id": report.id,
            "title": report.title,
            "stage": open_stage.name if open_stage else None,
            "approvers": still_asked,
            "reason": withdrawn.get("reason"),
        },
    )
    _step(uow, report, open_stage, "withdrawn", withdrawn["submitter"]["id"], reason=withdrawn.get("reason"))


def on_report_resubmitted(event: Event, uow, clock) -> None:
    resubmitted = event.payload
    report = uow.report(resubmitted["report_id"], for_update=True)
    refused = _not_the_submitters(report, resubmitted)
    if not refused and report.status != "rejected":
        refused = f"only a rejected report can be resubmitted; this one is {report.status}"
    # What the revision leaves out stays as it was: the stages as the previous revision defined them.
    definitions = resubmitted.get("approval_stages") or ([s.definition for s in report.stages] if report else [])
    if not refused and stage_violations(definitions):
        refused = "; ".join(stage_violations(definitions))
    if refused:
        _refuse(uow, event.message_id, resubmitted, refused, "resubmit")
        return
    report.revision += 1
    report.title = resubmitted.get("title", report.title)
    report.data = resubmitted.get("data", report.data)
    report.status = "created"
    report.all_stages.extend(new_stages(definitions, report.revision))
    uow.emit(
        "report.revised",
        {
            "report_id": report.id,
            "revision": report.revision,
            "title": report.title,
            "comment": resubmitted.get("comment"),
        },
    )
    _step(uow, report, None, "resubmitted", resubmitted["submitter"]["id"], comment=resubmitted.get("comment"))


def _not_the_submitters(report: Report | None, asked: dict) -> str | None:
    if report is None:
        return "unknown report"
    if asked["submitter"]["id"] != report.submitter.get("id"):
        return "only the report's submitter may do this"
    return None


def _not_withdrawable(report: Report) -> str | None:
    if report.status == "withdrawn":
        return "the report was already withdrawn"
    if report.status in ("approved", "finalized"):
        return "the report's approval is complete"
    return None


# -- records --------------------------------------------------------------------------------------------
def on_unreadable_decision(message: InvalidMessage, uow) -> None:
    _refuse(uow, message.message_id, message.payload or {}, "; ".join(message.reasons), _ACTIONS[message.type])


_ACTIONS = {
    "approval.decided": "decide",
    "approval.delegated": "delegate",
    "report.withdrawn": "withdraw",
    "report.resubmitted": "resubmit",
}


def _step(uow, report: Report, stage: ApprovalStage | None, kind: str, actor: str | None, **detail) -> None:
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


def _stage_ref(report: Report, stage: ApprovalStage) -> dict:
    return {"name": stage.name, "position": stage.position, "rule": stage.rule, "of": len(report.stages)}


def _draft(report: Report) -> dict | None:
    draft = report.document("draft")
    return draft.as_event() if draft else None


def _refuse(uow, message_id: str, asked: dict, reason: str, action: str = "decide") -> None:
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


# Messages from outside about a report, which may arrive in another trace (an approver's system, days later).
_ABOUT_A_REPORT = frozenset(_ACTIONS)


def report_trace(message, session) -> dict | None:
    """A decision, a delegation, a withdrawal or a resubmission arrives in its sender's trace, maybe days
    later: it belongs in the report's."""
    if message.type not in _ABOUT_A_REPORT:
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
    on_invalid={event_type: on_unreadable_decision for event_type in _ACTIONS},
    timers={REMINDER_DUE: on_reminder_due, DEADLINE_DUE: on_deadline_due},
    describe=describe,
    stored_trace=report_trace,
)
