"""A report's history: every step in order, with its time and actor, read from where each step is
recorded: the request and its revisions, documents, stages opening and closing, decisions, refusals,
approval steps (reminders, escalations, delegations, deadlines, withdrawal) and each email."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from reportflow.shared.models import ApprovalStep, Notification, Refusal, Report


def report_history(session: Session, report_id: str) -> list[dict] | None:
    """The steps of a report, oldest first; None when there is no such report."""
    report = session.get(Report, report_id)
    if report is None:
        return None
    steps: list[dict] = []

    def step(at: datetime | None, kind: str, actor: str | None = None, revision: int | None = None, **detail):
        if at is not None:
            shown = {k: v for k, v in detail.items() if v not in (None, [], {})}
            steps.append({"at": _utc(at), "step": kind, "actor": actor, "revision": revision, **shown})

    step(report.created_at, "requested", _who(report.submitter), 1, title=report.title)
    for document in report.documents:
        kind = "finalized" if document.kind == "final" else "generated"
        step(document.created_at, kind, None, document.revision, pages=document.pages, sha256=document.sha256)
    for stage in report.all_stages:
        step(stage.opened_at, "stage opened", None, stage.revision, stage=stage.name, deadline=stage.deadline_at)
        for decision in stage.decisions:
            step(
                decision.decided_at,
                decision.decision + "d",
                decision.approver_email,
                stage.revision,
                stage=stage.name,
                on_behalf_of=decision.on_behalf_of,
                comment=decision.comment,
            )
        if stage.status in ("approved", "rejected", "withdrawn"):
            step(stage.closed_at, f"stage {stage.status}", None, stage.revision, stage=stage.name)
    for recorded in session.scalars(select(ApprovalStep).where(ApprovalStep.report_id == report_id)):
        step(
            recorded.at, recorded.kind, recorded.actor, recorded.revision, stage=recorded.stage_name, **recorded.detail
        )
    for refusal in session.scalars(select(Refusal).where(Refusal.report_id == report_id)):
        step(
            refusal.refused_at,
            "refused",
            refusal.approver_email,
            None,
            stage=refusal.stage_name,
            asked=refusal.decision,
            reason=refusal.reason,
        )
    for email in session.scalars(select(Notification).where(Notification.report_id == report_id)):
        step(email.created_at, "email", None, None, to=email.recipients, subject=email.subject, status=email.status)
    steps.sort(key=lambda s: s["at"])  # stable: steps at the same moment keep the order above
    for shown in steps:
        shown["at"] = shown["at"].isoformat()
        if isinstance(shown.get("deadline"), datetime):
            shown["deadline"] = _utc(shown["deadline"]).isoformat()
    return steps


def as_text(steps: list[dict]) -> str:
    lines = []
    for s in steps:
        rest = {k: v for k, v in s.items() if k not in ("at", "step", "actor", "revision")}
        detail = "  ".join(f"{k}={', '.join(v) if isinstance(v, list) else v}" for k, v in rest.items())
        revision = f" r{s['revision']}" if s["revision"] and s["revision"] > 1 else ""
        lines.append(
            f"{s['at'][:19]}  {s['step']}{revision}{'  by ' + s['actor'] if s['actor'] else ''}  {detail}".rstrip()
        )
    return "\n".join(lines)


def _who(person: dict) -> str | None:
    return person.get("email") or person.get("id")


def _utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
