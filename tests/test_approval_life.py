"""The approval's life, handler by handler, with no broker and a clock the test moves: deadlines,
reminders, escalation, delegation, withdrawal and resubmission, on a real database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from reportflow.consumers import approval, creation, generation
from reportflow.shared.documents import DocumentRenderer
from reportflow.shared.events import Event
from reportflow.shared.models import ApprovalStep, Decision, Timer
from reportflow.shared.storage import FolderStorage
from tests.helpers import Clock, decide, fire_due_timers, generated_report, handle, refusals, request_event

TIMERS = approval.STAGE.timers
SUBMITTER = {"id": "u-17"}  # the example request's submitter


def open_stage(uow, clock, report_id="r-1", **stage_policy) -> list[Event]:
    stages = [
        {"name": "review", "approvers": ["bob@example.com", "eve@example.com"], "rule": "all", **stage_policy},
        {"name": "sign-off", "approvers": ["carol@example.com"]},
    ]
    generated_report(uow, report_id, approval_stages=stages)
    document = {"id": 1, "kind": "draft", "storage_key": "k", "size_bytes": 10, "sha256": "0" * 64, "pages": 1}
    generated = Event("report.generated", {"report_id": report_id, "document": document})
    return handle(uow, approval.on_report_generated, generated, clock=clock)


def set_status(uow, report_id: str, status: str) -> None:
    with uow() as unit:
        unit.report(report_id).status = status
        unit.session.commit()


def types(events) -> list[str]:
    return [e.type for e in events]


def pending_timers(uow) -> list[str]:
    with uow() as unit:
        rows = unit.session.scalars(
            select(Timer).where(Timer.fired_at.is_(None), Timer.cancelled_at.is_(None)).order_by(Timer.due_at)
        ).all()
        return [t.event_type for t in rows]


def steps(uow, report_id="r-1") -> list[str]:
    with uow() as unit:
        return [s.kind for s in unit.session.scalars(select(ApprovalStep).where(ApprovalStep.report_id == report_id))]


# -- reminders and deadlines ------------------------------------------------------------------------------
def test_an_opened_stage_says_its_deadline_and_sets_its_reminder_and_deadline(uow):
    clock = Clock()
    emitted = open_stage(uow, clock, deadline="P3D", remind_every="P1D")
    requested = emitted[0].payload
    assert requested["deadline_at"] == (clock.now + timedelta(days=3)).isoformat()
    assert sorted(pending_timers(uow)) == [approval.DEADLINE_DUE, approval.REMINDER_DUE]


def test_reminders_go_to_those_who_have_not_decided_and_stop_when_all_have(uow):
    clock = Clock()
    open_stage(uow, clock, deadline="P3D", remind_every="P1D")
    handle(uow, approval.on_approval_decided, decide("r-1", "review", "bob@example.com"), clock=clock)

    clock.advance(days=1, seconds=1)
    reminders = fire_due_timers(uow, TIMERS, clock)
    assert types(reminders) == ["approval.reminded"]
    assert reminders[0].payload["approvers"] == ["eve@example.com"]

    handle(uow, approval.on_approval_decided, decide("r-1", "review", "eve@example.com"), clock=clock)
    clock.advance(days=5)
    assert fire_due_timers(uow, TIMERS, clock) == []  # the stage closed: its reminder and deadline are cancelled
    assert pending_timers(uow) == []


def test_reminders_stop_before_the_deadline(uow):
    clock = Clock()
    open_stage(uow, clock, deadline="PT50M", remind_every="PT20M", on_deadline="approve")
    clock.advance(minutes=20, seconds=1)
    first = fire_due_timers(uow, TIMERS, clock)
    clock.advance(minutes=20)
    second = fire_due_timers(uow, TIMERS, clock)
    assert types(first) == types(second) == ["approval.reminded"]
    assert pending_timers(uow) == [approval.DEADLINE_DUE]  # a third reminder would come after the deadline


def test_on_deadline_reject_rejects_the_report(uow):
    clock = Clock()
    open_stage(uow, clock, deadline="PT30S", on_deadline="reject")
    clock.advance(seconds=31)
    emitted = fire_due_timers(uow, TIMERS, clock)
    assert types(emitted) == ["approval.deadline_passed"]
    assert emitted[0].payload["outcome"] == "rejected"
    assert set(emitted[0].payload["undecided"]) == {"bob@example.com", "eve@example.com"}
    with uow() as unit:
        assert unit.report("r-1").status == "rejected"


def test_on_deadline_approve_approves_the_stage_and_opens_the_next(uow):
    clock = Clock()
    open_stage(uow, clock, deadline="PT30S", on_deadline="approve")
    clock.advance(seconds=31)
    emitted = fire_due_timers(uow, TIMERS, clock)
    assert types(emitted) == ["approval.deadline_passed", "approval.requested"]
    assert emitted[1].payload["stage"]["name"] == "sign-off"


def test_an_escalation_replaces_the_undecided_and_a_second_deadline_rejects(uow):
    clock = Clock()
    open_stage(uow, clock, deadline="PT1M", escalate_to=["mia@example.com"])
    handle(uow, approval.on_approval_decided, decide("r-1", "review", "bob@example.com"), clock=clock)
    clock.advance(minutes=1, seconds=1)
    emitted = fire_due_timers(uow, TIMERS, clock)
    assert types(emitted) == ["approval.deadline_passed", "approval.escalated", "approval.requested"]
    assert emitted[1].payload["replaced"] == ["eve@example.com"]
    assert emitted[2].payload["approvers"] == ["mia@example.com"] and emitted[2].payload["reason"] == "escalated"

    refused = handle(uow, approval.on_approval_decided, decide("r-1", "review", "eve@example.com"), clock=clock)
    assert types(refused) == ["approval.refused"]  # eve was replaced

    clock.advance(minutes=1, seconds=1)
    emitted = fire_due_timers(uow, TIMERS, clock)
    assert [e.payload.get("outcome") for e in emitted] == ["rejected"]
    assert steps(uow) == ["deadline_passed", "escalated", "deadline_passed"]


def test_the_escalation_approvers_decision_completes_the_stage(uow):
    clock = Clock()
    open_stage(uow, clock, deadline="PT1M", escalate_to=["mia@example.com"], on_deadline="escalate")
    clock.advance(minutes=2)
    fire_due_timers(uow, TIMERS, clock)
    emitted = handle(uow, approval.on_approval_decided, decide("r-1", "review", "mia@example.com"), clock=clock)
    assert types(emitted) == ["approval.requested"] and emitted[0].payload["stage"]["name"] == "sign-off"


def test_a_timer_for_a_stage_that_moved_on_does_nothing(uow):
    clock = Clock()
    open_stage(uow, clock, deadline="PT1M", remind_every="PT10S")
    with uow() as unit:
        reminder = unit.session.scalars(select(Timer).where(Timer.event_type == approval.REMINDER_DUE)).one()
        stale = Event(reminder.event_type, {**reminder.payload, "round": 1})
    assert handle(uow, approval.on_reminder_due, stale, clock=clock) == []


# -- delegation ------------------------------------------------------------------------------------------
def delegate(report_id, stage, approver, to, comment=None) -> Event:
    payload = {"report_id": report_id, "stage": stage, "approver": {"email": approver}, "delegate": {"email": to}}
    if comment:
        payload["comment"] = comment
    return Event("approval.delegated", payload)


def test_a_delegate_decides_on_behalf_of_the_delegator_who_can_no_longer_decide(uow):
    clock = Clock()
    open_stage(uow, clock)
    emitted = handle(
        uow, approval.on_approval_delegated, delegate("r-1", "review", "eve@example.com", "ian@example.com")
    )
    assert types(emitted) == ["approval.reassigned", "approval.requested"]
    assert emitted[1].payload["approvers"] == ["ian@example.com"] and emitted[1].payload["reason"] == "delegated"

    refused = handle(uow, approval.on_approval_decided, decide("r-1", "review", "eve@example.com"), clock=clock)
    assert types(refused) == ["approval.refused"]
    assert "delegated their decision" in refused[0].payload["reason"]

    handle(uow, approval.on_approval_decided, decide("r-1", "review", "bob@example.com"), clock=clock)
    emitted = handle(uow, approval.on_approval_decided, decide("r-1", "review", "ian@example.com"), clock=clock)
    assert types(emitted) == ["approval.requested"]  # the stage is complete with the delegate's approval
    with uow() as unit:
        decision = unit.session.scalars(select(Decision).where(Decision.approver_email == "ian@example.com")).one()
        assert decision.on_behalf_of == "eve@example.com"


@pytest.mark.parametrize(
    "who, to, reason",
    [
        ("zed@example.com", "ian@example.com", "zed@example.com is not an approver"),
        ("eve@example.com", "bob@example.com", "already has a part"),
    ],
)
def test_delegations_that_are_not_allowed_are_refused(uow, who, to, reason):
    open_stage(uow, Clock())
    emitted = handle(uow, approval.on_approval_delegated, delegate("r-1", "review", who, to))
    assert types(emitted) == ["approval.refused"] and emitted[0].payload["action"] == "delegate"
    assert reason in emitted[0].payload["reason"]
    assert reason in refusals(uow)[0]


# -- withdrawal ------------------------------------------------------------------------------------------
def withdraw(report_id, submitter_id="u-17", reason=None) -> Event:
    payload = {"report_id": report_id, "submitter": {"id": submitter_id}}
    if reason:
        payload["reason"] = reason
    return Event("report.withdrawn", payload)


def test_a_withdrawn_report_tells_the_approvers_and_cancels_its_timers(uow):
    clock = Clock()
    open_stage(uow, clock, deadline="P3D", remind_every="P1D")
    handle(uow, approval.on_approval_decided, decide("r-1", "review", "bob@example.com"), clock=clock)
    emitted = handle(uow, approval.on_report_withdrawn, withdraw("r-1", reason="numbers changed"), clock=clock)
    assert types(emitted) == ["approval.withdrawn"]
    assert emitted[0].payload["approvers"] == ["eve@example.com"]
    assert pending_timers(uow) == []
    clock.advance(days=10)
    assert fire_due_timers(uow, TIMERS, clock) == []
    refused = handle(uow, approval.on_approval_decided, decide("r-1", "review", "eve@example.com"), clock=clock)
    assert "withdrawn" in refused[0].payload["reason"]


@pytest.mark.parametrize(
    "submitter, status, reason",
    [
        ("u-99", "in_approval", "only the report's submitter"),
        ("u-17", "finalized", "approval is complete"),
    ],
)
def test_withdrawals_that_are_not_allowed_are_refused(uow, submitter, status, reason):
    open_stage(uow, Clock())
    set_status(uow, "r-1", status)
    emitted = handle(uow, approval.on_report_withdrawn, withdraw("r-1", submitter), clock=Clock())
    assert types(emitted) == ["approval.refused"] and reason in emitted[0].payload["reason"]


def test_a_report_withdrawn_before_its_draft_is_made_is_not_rendered(uow, tmp_path):
    handle(uow, creation.on_report_requested, request_event(report_id="r-2"))
    handle(uow, approval.on_report_withdrawn, withdraw("r-2"), clock=Clock())
    created = Event("report.created", {"report_id": "r-2"})
    emitted = handle(
        uow, generation.on_report_created, created, renderer=DocumentRenderer(), storage=FolderStorage(tmp_path)
    )
    assert emitted == []
    with uow() as unit:
        assert unit.report("r-2").status == "withdrawn"


# -- resubmission ----------------------------------------------------------------------------------------
def test_a_rejected_report_resubmitted_is_revision_2_with_its_stages_again(uow):
    clock = Clock()
    open_stage(uow, clock)
    handle(uow, approval.on_approval_decided, decide("r-1", "review", "bob@example.com", "reject"), clock=clock)
    resubmitted = Event(
        "report.resubmitted",
        {"report_id": "r-1", "submitter": SUBMITTER, "title": "Q3 revenue, fixed", "comment": "v2"},
    )
    emitted = handle(uow, approval.on_report_resubmitted, resubmitted, clock=clock)
    assert types(emitted) == ["report.revised"]
    assert emitted[0].payload == {"report_id": "r-1", "revision": 2, "title": "Q3 revenue, fixed", "comment": "v2"}
    with uow() as unit:
        report = unit.report("r-1")
        assert (report.status, report.revision) == ("created", 2)
        assert [(s.revision, s.name, s.status) for s in report.all_stages] == [
            (1, "review", "rejected"),
            (1, "sign-off", "pending"),
            (2, "review", "pending"),
            (2, "sign-off", "pending"),
        ]
        assert report.stages[0].decisions == []  # the new revision's; revision 1's decision is kept
        assert len(report.all_stages[0].decisions) == 1


@pytest.mark.parametrize("status", ["in_approval", "finalized"])
def test_only_a_rejected_report_can_be_resubmitted(uow, status):
    open_stage(uow, Clock())
    set_status(uow, "r-1", status)
    resubmitted = Event("report.resubmitted", {"report_id": "r-1", "submitter": SUBMITTER})
    emitted = handle(uow, approval.on_report_resubmitted, resubmitted, clock=Clock())
    assert types(emitted) == ["approval.refused"] and "only a rejected report" in emitted[0].payload["reason"]


def test_a_request_with_a_bad_policy_is_invalid(uow):
    stages = [{"name": "review", "approvers": ["bob@example.com"], "on_deadline": "escalate", "deadline": "PT0S"}]
    emitted = handle(uow, creation.on_report_requested, request_event(report_id="r-3", approval_stages=stages))
    assert types(emitted) == ["report.invalid"]
    reasons = emitted[0].payload["reasons"]
    assert any("escalate needs escalate_to" in r for r in reasons)
    assert any("deadline: must be at least" in r for r in reasons)
