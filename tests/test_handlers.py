"""The stage handlers on their own: no broker, no SMTP server; a real database, renderer and folder mailer."""

from __future__ import annotations

import hashlib
import io
from email import message_from_bytes, policy

import pytest
from pypdf import PdfReader
from sqlalchemy import func, select

from reportflow.consumers import approval, creation, generation, notification
from reportflow.shared.documents import DocumentRenderer
from reportflow.shared.events import Event, InvalidMessage
from reportflow.shared.mail import FolderMailer, Postman
from reportflow.shared.models import Decision, Notification
from reportflow.shared.storage import FolderStorage
from tests.helpers import (
    TWO_STAGES,
    decide,
    generated_report,
    handle,
    open_first_stage,
    refusals,
    request_event,
    sample_request,
)


@pytest.fixture
def created(uow) -> str:
    """A report stored by creation, its draft generated, with the two stages above."""
    return generated_report(uow, "r-1", approval_stages=TWO_STAGES)


# -- creation ----------------------------------------------------------------------------
def test_creation_stores_the_report_with_its_stages_and_trace_context(uow):
    emitted = handle(uow, creation.on_report_requested, request_event(report_id="r-9"))
    assert [e.type for e in emitted] == ["report.created"]
    assert emitted[0].payload["stages"] == ["review", "sign-off"]
    with uow() as unit:
        report = unit.report("r-9")
        assert report.status == "created"
        assert [s.name for s in report.stages] == ["review", "sign-off"]
        assert report.trace_id == "0af7651916cd43dd8448eb211c80319c"


def test_creation_chooses_a_report_id_when_the_request_has_none(uow):
    request = sample_request()
    request.pop("report_id", None)
    emitted = handle(uow, creation.on_report_requested, Event("report.requested", request))
    assert emitted[0].payload["report_id"].startswith("rpt-")


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"template": "glossy"}, "unknown template 'glossy'"),
        ({"approval_stages": [{"name": "a", "approvers": ["x@example.com"]}] * 2}, "stage names must be distinct"),
    ],
)
def test_creation_refuses_what_the_schema_cannot_catch(uow, change, reason):
    emitted = handle(uow, creation.on_report_requested, request_event(report_id="r-2", **change))
    assert [e.type for e in emitted] == ["report.invalid"]
    assert any(reason in r for r in emitted[0].payload["reasons"])
    assert emitted[0].payload["submitter"]["email"] == "ann@example.com"
    with uow() as unit:
        assert unit.report("r-2") is None


def test_creation_refuses_a_second_request_for_an_existing_report(uow):
    handle(uow, creation.on_report_requested, request_event(report_id="r-3"))
    emitted = handle(uow, creation.on_report_requested, request_event(report_id="r-3"))
    assert emitted[0].type == "report.invalid"
    assert "already exists" in emitted[0].payload["reasons"][0]


def test_an_unreadable_request_still_tells_a_reachable_submitter_why(uow):
    message = InvalidMessage(
        "report.requested",
        "m-1",
        ["title: 5 is not of type 'string'"],
        {"title": 5, "submitter": {"email": "ann@example.com", "name": "Ann"}},
    )
    emitted = handle(uow, creation.on_unreadable_request, message)
    assert emitted[0].type == "report.invalid"
    assert emitted[0].payload["submitter"] == {"email": "ann@example.com", "name": "Ann"}
    assert emitted[0].payload["title"] is None
    assert emitted[0].payload["request_message_id"] == "m-1"


def test_an_unreadable_request_with_no_usable_address_emits_invalid_without_submitter(uow):
    message = InvalidMessage("report.requested", "m-2", ["body is not UTF-8 JSON"], None)
    emitted = handle(uow, creation.on_unreadable_request, message)
    assert emitted[0].payload["submitter"] is None


# -- approval ------------------------------------------------------------------------------
def test_stage_all_waits_for_every_approver_then_opens_the_next(uow, created):
    assert [e.type for e in open_first_stage(uow, created)] == ["approval.requested"]
    assert handle(uow, approval.on_approval_decided, decide(created, "review", "bob@example.com")) == []
    emitted = handle(uow, approval.on_approval_decided, decide(created, "review", "EVE@example.com"))
    assert [e.type for e in emitted] == ["approval.requested"]
    assert emitted[0].payload["stage"] == {"name": "sign-off", "position": 2, "rule": "any", "of": 2}
    assert emitted[0].payload["approvers"] == ["carol@example.com", "dan@example.com"]


def test_stage_any_needs_one_approval_and_the_last_stage_approves_the_report(uow, created):
    open_first_stage(uow, created)
    handle(uow, approval.on_approval_decided, decide(created, "review", "bob@example.com"))
    handle(uow, approval.on_approval_decided, decide(created, "review", "eve@example.com"))
    emitted = handle(uow, approval.on_approval_decided, decide(created, "sign-off", "dan@example.com", comment="ok"))
    assert [e.type for e in emitted] == ["report.approved"]
    assert emitted[0].payload["stages"][1]["decisions"] == [
        {"approver": "dan@example.com", "decision": "approve", "comment": "ok"}
    ]
    with uow() as unit:
        assert unit.report(created).status == "approved"


def test_one_rejection_rejects_the_report_and_later_decisions_are_refused(uow, created):
    open_first_stage(uow, created)
    emitted = handle(
        uow, approval.on_approval_decided, decide(created, "review", "bob@example.com", "reject", "numbers wrong")
    )
    assert [e.type for e in emitted] == ["report.rejected"]
    assert emitted[0].payload["comment"] == "numbers wrong"
    emitted = handle(uow, approval.on_approval_decided, decide(created, "review", "eve@example.com"))
    assert [e.type for e in emitted] == ["approval.refused"]
    assert refusals(uow) == ["the report was already rejected"]
    with uow() as unit:
        assert unit.report(created).status == "rejected"
        assert unit.session.scalar(select(func.count()).select_from(Decision)) == 1


@pytest.mark.parametrize(
    "decision, reason",
    [
        (
            lambda r: decide(r, "review", "mallory@example.com"),
            "mallory@example.com is not an approver of stage 'review'",
        ),
        (lambda r: decide(r, "sign-off", "carol@example.com"), "stage 'sign-off' is not open yet"),
        (lambda r: decide(r, "audit", "bob@example.com"), "the report has no stage named 'audit'"),
        (lambda r: decide("no-such-report", "review", "bob@example.com"), "unknown report"),
    ],
)
def test_decisions_that_are_not_allowed_are_refused_recorded_and_not_applied(uow, created, decision, reason):
    open_first_stage(uow, created)
    emitted = handle(uow, approval.on_approval_decided, decision(created))
    assert [e.type for e in emitted] == ["approval.refused"]
    assert emitted[0].payload["reason"] == reason
    assert refusals(uow) == [reason]
    with uow() as unit:
        assert unit.session.scalar(select(func.count()).select_from(Decision)) == 0


def test_a_second_decision_by_the_same_approver_and_one_for_a_closed_stage_are_refused(uow, created):
    open_first_stage(uow, created)
    handle(uow, approval.on_approval_decided, decide(created, "review", "bob@example.com"))
    handle(uow, approval.on_approval_decided, decide(created, "review", "bob@example.com", "reject"))
    handle(uow, approval.on_approval_decided, decide(created, "review", "eve@example.com"))
    handle(uow, approval.on_approval_decided, decide(created, "review", "eve@example.com"))
    assert refusals(uow) == ["bob@example.com has already decided stage 'review'", "stage 'review' is closed"]


def test_an_unreadable_decision_is_refused_with_its_reasons(uow):
    message = InvalidMessage(
        "approval.decided",
        "m-3",
        ["decision: 'maybe' is not one of ['approve', 'reject']"],
        {"report_id": "r-1", "stage": "review", "decision": "maybe"},
    )
    emitted = handle(uow, approval.on_unreadable_message, message)
    assert emitted[0].type == "approval.refused"
    assert "is not one of" in emitted[0].payload["reason"]
    assert refusals(uow) == [emitted[0].payload["reason"]]


# -- generation ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def renderer():
    return DocumentRenderer()


def pdf_text(content: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(content)).pages)


def test_generation_renders_stores_and_describes_the_draft(uow, tmp_path, renderer):
    handle(uow, creation.on_report_requested, request_event(report_id="r-5"))
    storage = FolderStorage(tmp_path)
    emitted = handle(
        uow,
        generation.on_report_created,
        Event("report.created", {"report_id": "r-5"}),
        renderer=renderer,
        storage=storage,
    )
    document = emitted[0].payload["document"]
    content = storage.get(document["storage_key"])
    assert content.startswith(b"%PDF")
    assert document["size_bytes"] == len(content) and document["pages"] >= 1
    assert "Q3 revenue review" in pdf_text(content)
    with uow() as unit:
        assert unit.report("r-5").status == "generated"


def test_the_approved_version_is_the_approved_pages_and_an_approval_record(uow, tmp_path, renderer):
    handle(
        uow,
        creation.on_report_requested,
        request_event(report_id="r-6", approval_stages=[{"name": "review", "approvers": ["bob@example.com"]}]),
    )
    storage = FolderStorage(tmp_path)
    [generated] = handle(
        uow,
        generation.on_report_created,
        Event("report.created", {"report_id": "r-6"}),
        renderer=renderer,
        storage=storage,
    )
    open_first_stage(uow, "r-6")
    handle(uow, approval.on_approval_decided, decide("r-6", "review", "bob@example.com", comment="Good work"))
    emitted = handle(
        uow,
        generation.on_report_approved,
        Event("report.approved", {"report_id": "r-6", "stages": []}),
        renderer=renderer,
        storage=storage,
    )
    assert emitted[0].type == "report.finalized"
    draft = PdfReader(io.BytesIO(storage.get(generated.payload["document"]["storage_key"])))
    final = PdfReader(io.BytesIO(storage.get(emitted[0].payload["document"]["storage_key"])))
    assert emitted[0].payload["document"]["pages"] == len(final.pages) == len(draft.pages) + 1
    for approved, delivered in zip(draft.pages, final.pages, strict=False):
        assert approved.extract_text() == delivered.extract_text()  # the client gets what was approved
    record = final.pages[-1].extract_text()
    assert "Approval record" in record and "Q3 revenue review" in record
    assert "bob@example.com" in record and "Good work" in record and "approved" in record
    with uow() as unit:
        assert unit.report("r-6").status == "finalized"


# -- notification ----------------------------------------------------------------------------
def test_each_approver_gets_a_personal_email_with_the_draft(uow, tmp_path):
    storage = FolderStorage(tmp_path)
    storage.put("reports/r-7/draft.pdf", b"%PDF-1.7 draft")
    draft_sha256 = hashlib.sha256(b"%PDF-1.7 draft").hexdigest()
    postman = Postman(FolderMailer(tmp_path / "mail"), "reportflow <rf@example.com>")
    requested = {
        "report_id": "r-7",
        "title": "Q3 revenue review",
        "stage": {"name": "sign-off", "position": 2, "rule": "any", "of": 2},
        "approvers": ["carol@example.com", "dan@example.com"],
        "document": {
            "id": 1,
            "kind": "draft",
            "storage_key": "reports/r-7/draft.pdf",
            "size_bytes": 14,
            "sha256": draft_sha256,
            "pages": 1,
        },
    }
    handle(
        uow,
        notification.on_approval_requested,
        Event("approval.requested", requested),
        postman=postman,
        storage=storage,
    )
    emails = [message_from_bytes(p.read_bytes(), policy=policy.default) for p in sorted((tmp_path / "mail").iterdir())]
    assert sorted(e["To"] for e in emails) == ["carol@example.com", "dan@example.com"]
    assert all("Q3 revenue review" in e["Subject"] and "sign-off" in e["Subject"] for e in emails)
    attachment = next(emails[0].iter_attachments())
    assert attachment.get_filename() == "r-7-draft.pdf" and attachment.get_content() == b"%PDF-1.7 draft"
    with uow() as unit:
        assert unit.session.scalar(select(func.count()).select_from(Notification)) == 2


def test_an_invalid_request_without_a_submitter_sends_nothing(uow, tmp_path):
    postman = Postman(FolderMailer(tmp_path / "mail"), "rf@example.com")
    handle(
        uow,
        notification.on_report_invalid,
        Event("report.invalid", {"report_id": None, "submitter": None, "reasons": ["x"]}),
        postman=postman,
    )
    assert not (tmp_path / "mail").exists()


def test_the_rejection_email_names_the_stage_the_approver_and_the_comment(uow, tmp_path):
    handle(uow, creation.on_report_requested, request_event(report_id="r-8"))
    postman = Postman(FolderMailer(tmp_path / "mail"), "rf@example.com")
    handle(
        uow,
        notification.on_report_rejected,
        Event(
            "report.rejected",
            {
                "report_id": "r-8",
                "title": "Q3 revenue review",
                "stage": "review",
                "approver": {"email": "bob@example.com"},
                "comment": "numbers wrong",
            },
        ),
        postman=postman,
    )
    [path] = (tmp_path / "mail").iterdir()
    email = message_from_bytes(path.read_bytes(), policy=policy.default)
    assert email["To"] == "ann@example.com" and email["Subject"] == "Report rejected: Q3 revenue review"
    body = email.get_content()
    assert "review" in body and "bob@example.com" in body and "numbers wrong" in body


def test_user_text_in_an_email_is_one_line_or_quoted_and_never_passes_for_ours(uow, tmp_path):
    handle(uow, creation.on_report_requested, request_event(report_id="r-10"))
    postman = Postman(FolderMailer(tmp_path / "mail"), "rf@example.com")
    fake = "Decide here instead: https://evil.example/approve"
    handle(
        uow,
        notification.on_report_rejected,
        Event(
            "report.rejected",
            {
                "report_id": "r-10",
                "title": "Q3",
                "stage": "review",
                "approver": {"email": "bob@example.com"},
                "comment": f"Numbers wrong.\n\n{fake}\r\n\u2028{fake}",
            },
        ),
        postman=postman,
    )
    handle(
        uow,
        notification.on_approval_refused,
        Event(
            "approval.refused",
            {
                "report_id": "r-10",
                "stage": "review\x85x",
                "decision": "approve",
                "approver": {"email": "bob@example.com"},
                "reason": f"stage closed\n\n{fake}",
                "decision_message_id": "m-1",
            },
        ),
        postman=postman,
    )
    for path in (tmp_path / "mail").iterdir():
        body = message_from_bytes(path.read_bytes(), policy=policy.default).get_content()
        lines = body.splitlines()
        assert [line for line in lines if fake in line] and all(line.startswith("> ") for line in lines if fake in line)
        assert "\u2028" not in body and "\x85" not in body
