"""generation: on report.created (and report.revised, a resubmission), render the current revision's draft
PDF, store it, emit report.generated; on report.approved, render the final version (the approved draft
and its approval page), store it, emit report.finalized. A report withdrawn meanwhile goes no further."""

from __future__ import annotations

from sqlalchemy import update

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
    if report.status != "created":
        return  # withdrawn before its draft was made, or this revision's draft exists already
    document = _store(uow, report, "draft", renderer.render(report), storage)
    if _moved_on(uow, report, "created", "generated"):
        payload = {"report_id": report.id, "document": document.as_event(), "revision": report.revision}
        uow.emit("report.generated", payload)


def on_report_approved(event: Event, uow, renderer: DocumentRenderer, storage: Storage) -> None:
    report = _report(uow, event.report_id)
    draft = report.document("draft")
    if draft is None:
        raise ReportNotFound(f"report {report.id!r} has no draft to approve")
    final = renderer.final_version(report, storage.get(draft.storage_key), draft.pages, approval_record(report))
    document = _store(uow, report, "final", final, storage)
    if not _moved_on(uow, report, "approved", "finalized"):
        return
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
                    "on_behalf_of": d.on_behalf_of,
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


def _moved_on(uow, report: Report, expected: str, status: str) -> bool:
    """Set the report's status if it is still what this message found: a render takes a while, and the
    submitter may withdraw the report meanwhile (approval sets that, holding the row)."""
    moved = uow.session.execute(
        update(Report).where(Report.id == report.id, Report.status == expected).values(status=status)
    ).rowcount
    uow.session.expire(report, ["status"])
    return moved == 1


def _store(uow, report: Report, kind: str, rendered, storage) -> Document:
    key = document_key(report.id, kind, report.revision)
    storage.put(key, rendered.pdf)
    document = report.document(kind)
    if document is None:
        document = Document(revision=report.revision, kind=kind, storage_key=key, size_bytes=0, sha256="", pages=0)
        report.documents.append(document)
    document.size_bytes, document.sha256, document.pages = rendered.size_bytes, rendered.sha256, rendered.pages
    uow.flush()
    return document


STAGE = Stage(
    name="generation",
    handlers={
        "report.created": on_report_created,
        "report.revised": on_report_created,
        "report.approved": on_report_approved,
    },
    describe=describe,
    batch=False,  # a render takes seconds to minutes: each commits on its own
)
