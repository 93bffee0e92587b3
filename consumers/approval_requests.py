"""What approvers and submitters ask of approval besides deciding:
- on approval.delegated, put the delegate in the approver's place: approval.reassigned, and
  approval.requested for the delegate;
- on report.withdrawn, end the approval: status withdrawn, timers cancelled, approval.withdrawn;
- on report.resubmitted, of a rejected report: revision N+1 with its stages, emit report.revised
  (generation renders it, and approval starts again from the first stage).
Who may ask is the report's rule (Report.stage_open_to, Report.submitters_refusal); anything else is
refused."""

from __future__ import annotations

from reportflow.consumers.approval_steps import ask, close_stage, record_step, refuse
from reportflow.shared.approval_policy import new_stages, stage_violations
from reportflow.shared.events import Event
from reportflow.shared.models import Report


def on_approval_delegated(event: Event, uow, clock) -> None:
    delegated = event.payload
    report = uow.report(delegated["report_id"], for_update=True)
    approver, delegate = delegated["approver"]["email"].lower(), delegated["delegate"]["email"].lower()
    if report is None:
        refuse(uow, event.message_id, delegated, "unknown report", "delegate")
        return
    stage, refused = report.stage_open_to(delegated["stage"], approver)
    if refused:
        refuse(uow, event.message_id, delegated, refused.reason, "delegate")
        return
    if delegate in stage.approvers or delegate in stage.delegations.values():
        refuse(uow, event.message_id, delegated, f"{delegate} already has a part in stage {stage.name!r}", "delegate")
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
    record_step(uow, report, stage, "delegated", approver, delegate=delegate, comment=delegated.get("comment"))
    ask(uow, report, stage, [delegate], "delegated")


def on_report_withdrawn(event: Event, uow, clock) -> None:
    withdrawn = event.payload
    report = _submitters_report(uow, event, "withdraw")
    if report is None:
        return
    open_stage = next((s for s in report.stages if s.status == "open"), None)
    still_asked = open_stage.undecided if open_stage else []
    if open_stage:
        close_stage(uow, open_stage, "withdrawn", clock)
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
    record_step(uow, report, open_stage, "withdrawn", withdrawn["submitter"]["id"], reason=withdrawn.get("reason"))


def on_report_resubmitted(event: Event, uow, clock) -> None:
    resubmitted = event.payload
    report = _submitters_report(uow, event, "resubmit")
    if report is None:
        return
    # What the revision leaves out stays as it was: the stages as the previous revision defined them.
    definitions = resubmitted.get("approval_stages") or [s.definition for s in report.stages]
    violations = stage_violations(definitions)
    if violations:
        refuse(uow, event.message_id, resubmitted, "; ".join(violations), "resubmit")
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
    record_step(uow, report, None, "resubmitted", resubmitted["submitter"]["id"], comment=resubmitted.get("comment"))


def _submitters_report(uow, event: Event, action: str) -> Report | None:
    """The report its submitter asks to withdraw or resubmit, locked; None, with the refusal, otherwise."""
    report = uow.report(event.payload["report_id"], for_update=True)
    refused = (
        "unknown report" if report is None else report.submitters_refusal(event.payload["submitter"]["id"], action)
    )
    if refused:
        refuse(uow, event.message_id, event.payload, refused, action)
        return None
    return report
