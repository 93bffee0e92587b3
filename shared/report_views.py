"""Read-only views of a report, for the CLI and operators."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from reportflow.shared.config import Settings
from reportflow.shared.db import make_engine
from reportflow.shared.models import Notification, Refusal, Report


def report_view(report: Report) -> dict:
    """A report as its readers see it (the gateway's JSON, `report show`): status, stages, decisions,
    documents. Where documents are found is the reader's to add."""
    return {
        "report_id": report.id,
        "title": report.title,
        "status": report.status,
        "trace_id": report.trace_id,
        "stages": [
            {
                "position": s.position,
                "name": s.name,
                "rule": s.rule,
                "status": s.status,
                "approvers": s.approvers,
                "decisions": [
                    {
                        "approver": d.approver_email,
                        "decision": d.decision,
                        "comment": d.comment,
                        "decided_at": d.decided_at.isoformat(),
                    }
                    for d in s.decisions
                ],
            }
            for s in report.stages
        ],
        "documents": [
            {"kind": d.kind, "pages": d.pages, "size_bytes": d.size_bytes, "sha256": d.sha256} for d in report.documents
        ],
    }


def report_summary(settings: Settings, report_id: str) -> dict | None:
    engine = make_engine(settings.database_url)
    storage = settings.document_storage()
    try:
        with Session(engine) as session:
            report = session.get(Report, report_id)
            if report is None:
                return None
            notifications = session.scalars(
                select(Notification).where(Notification.report_id == report_id).order_by(Notification.id)
            ).all()
            refusals = session.scalars(select(Refusal).where(Refusal.report_id == report_id)).all()
            view = report_view(report)
            for shown, document in zip(view["documents"], report.documents, strict=True):
                shown["location"] = storage.location(document.storage_key)
            return {
                **view,
                "trace_url": f"{settings.jaeger_ui_url.rstrip('/')}/trace/{report.trace_id}",
                "notifications": [
                    {"recipients": n.recipients, "subject": n.subject, "transport": n.transport, "event": n.event_type}
                    for n in notifications
                ],
                "refusals": [
                    {"approver": r.approver_email, "stage": r.stage_name, "reason": r.reason} for r in refusals
                ],
            }
    finally:
        engine.dispose()


def as_text(summary: dict) -> str:
    lines = [
        f"{summary['report_id']}  {summary['title']}",
        f"  status:   {summary['status']}",
        f"  trace id: {summary['trace_id']}",
        f"  trace:    {summary['trace_url']}",
    ]
    for stage in summary["stages"]:
        lines.append(f"  stage {stage['position']} {stage['name']} ({stage['rule']}): {stage['status']}")
        lines += [
            f"    {d['approver']} {d['decision']}d {d['decided_at']} {d['comment'] or ''}".rstrip()
            for d in stage["decisions"]
        ]
    lines += [
        f"  document {d['kind']}: {d['location']} ({d['pages']} pages, {d['size_bytes']} bytes)"
        for d in summary["documents"]
    ]
    lines += [
        f"  email to {', '.join(n['recipients'])}: {n['subject']} [{n['transport']}]" for n in summary["notifications"]
    ]
    lines += [f"  refused: {r['approver']} on {r['stage']}: {r['reason']}" for r in summary["refusals"]]
    return "\n".join(lines)
