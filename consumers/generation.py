"""generation: on report.created, render the draft PDF, store it, emit report.generated;
on report.approved, render the final version (the approved draft and its approval page), store it,
emit report.finalized."""

from __future__ import annotations

from reportflow.consumers.descriptions import describe
from reportflow.consumers.stage import Stage
from reportflow.shared.documents import DocumentRenderer, document_key
from reportflow.shared.events import Event
from reportflow.shared.models import Document, Report
from reportflow.shared.storage import Storage


class ReportNotFound(LookupError):
    pass


def on_report_created(event: Event, uow, renderer: DocumentRenderer, storage: Storage) -> None:
    report = _report(uow, event.report_id)
    document = _store(uow, report, "draft", renderer.render(report), storage)
    report.status = "generated"
    uow.emit("report.generated", {"report_id": report.id, "document": document.as_event()})


def on_report_approved(event: Event, uow, renderer: DocumentRenderer, storage: Storage) -> None:
    report = _report(uow, event.report_id)
    draft = report.document("draft")
    if draft is None:
        raise ReportNotFound(f"report {report.id!r} has no draft to approve")
    final = renderer.final_version(report, storage.get(draft.storage_key), draft.pages, approval_record(report))
    document = _store(uow, report, "final", final, storage)
    report.status = "finalized"
    uow.emit("report.finalized", {"report_id": report.id, "title": report.title, "document": document.as_event()})


def approval_record(report: Report) -> list[dict]:
    """Who approved which stage, when, with what comment: the approval page's content."""
    return [
        {
            "name": stage.name,
            "rule": stage.rule,
            "decisions": [
                {
                    "approver": d.approver_email,
                    "decision": d.decision,
                    "comment": d.comment,
                    "decided_at": d.decided_at.strftime("%Y-%m-%d %H:%M"),
                }
                for d in stage.decisions
            ],
        }
        for stage in report.stages
    ]


def _report(uow, report_id: str | None) -> Report:
    report = uow.report(report_id)
    if report is None:
        raise ReportNotFound(f"report {report_id!r} is not in the database")
    return report


def _store(uow, report: Report, kind: str, rendered, storage) -> Document:
    key = document_key(report.id, kind)
    storage.put(key, rendered.pdf)
    document = report.document(kind)
    if document is None:
        document = Document(kind=kind, storage_key=key, size_bytes=0, sha256="", pages=0)
        report.documents.append(document)
    document.size_bytes, document.sha256, document.pages = rendered.size_bytes, rendered.sha256, rendered.pages
    uow.flush()
    return document


STAGE = Stage(
    name="generation",
    handlers={"report.created": on_report_created, "report.approved": on_report_approved},
    describe=describe,
)
