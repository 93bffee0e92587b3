"""The approval's life end to end: the Procfile's processes, real RabbitMQ, a real database, a real SMTP
server and the spans on the OTLP wire, with deadlines and reminders of seconds."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pypdf import PdfReader
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from reportflow.producers import ReportflowClient
from reportflow.shared.db import make_engine
from reportflow.shared.models import Timer, utcnow
from reportflow.shared.report_history import report_history
from tests.helpers import TEST_AMQP_URL, report_status, sample_request, wait_until
from tests.pipeline import traced_pipeline

pytestmark = pytest.mark.e2e
SUBMITTER = "u-17"  # the example request's submitter id


@pytest.fixture
def pipeline(database_url, exchange, broker, smtp, otlp, tmp_path):
    """The Procfile's processes, looking for due timers twice a second, a timer's lease 4 s."""
    with traced_pipeline(
        tmp_path,
        exchange,
        database_url,
        broker,
        smtp,
        otlp,
        REPORTFLOW_TIMER_POLL_SECONDS="0.5",
        REPORTFLOW_TIMER_LEASE_SECONDS="4",
    ) as pipeline:
        yield pipeline


def one_stage(report_id: str, title: str, approvers=("bob@example.com",), **policy) -> dict:
    stage = {"name": "review", "approvers": list(approvers), "rule": "all", **policy}
    return sample_request(report_id=report_id, title=title, approval_stages=[stage])


def subjects(smtp, address: str) -> list[str]:
    return [m["Subject"] for m in smtp.to(address)]


def text_of(email) -> str:
    return email.get_body(preferencelist=("plain",)).get_content()


def mail_to(smtp, address: str, subject_part: str, count: int = 1, timeout: float = 60) -> list:
    def found():
        matching = [m for m in smtp.to(address) if subject_part in m["Subject"]]
        return matching if len(matching) >= count else None

    return wait_until(found, timeout, what=f"{count} email(s) to {address} about {subject_part!r}")


def test_deadlines_reminders_escalation_delegation_withdrawal_and_resubmission(
    pipeline, database_url, exchange, smtp, otlp, tmp_path
):
    with ReportflowClient(TEST_AMQP_URL, exchange) as client:
        reminded = client.request_report(
            one_stage("life-remind", "Reminded", remind_every="PT2S", deadline="PT90S", on_deadline="reject")
        )
        client.request_report(one_stage("life-escalate", "Escalated", deadline="PT5S", escalate_to=["mia@example.com"]))
        client.request_report(one_stage("life-reject", "Timed out", deadline="PT3S", on_deadline="reject"))
        client.request_report(one_stage("life-delegate", "Delegated", approvers=("eve@example.com",)))
        client.request_report(
            one_stage("life-withdraw", "Withdrawn", approvers=("wes@example.com",), remind_every="PT2S")
        )

        # The deadline passes: the escalation approver is asked, and her decision finalizes the report.
        [escalated] = mail_to(smtp, "mia@example.com", "Approval needed: Escalated")
        assert "escalated to you" in text_of(escalated)
        client.decide("life-escalate", "review", "mia@example.com", approve=True)

        # Reminders arrive, say how long is left, and stop when the approver decides.
        [reminder, *_] = mail_to(smtp, "bob@example.com", "Reminder: approval needed: Reminded", count=2)
        assert "left" in text_of(reminder) and "Please decide by" in text_of(reminder)
        client.decide("life-remind", "review", "bob@example.com", approve=True)

        # on_deadline: reject rejects, and the submitter hears why; a revision goes through again.
        mail_to(smtp, "ann@example.com", "Report rejected, deadline passed: Timed out")
        assert report_status(database_url, "life-reject") == "rejected"
        client.resubmit("life-reject", SUBMITTER, title="Timed out, revised", comment="Second try")
        mail_to(smtp, "bob@example.com", "Approval needed: Timed out, revised")
        client.decide("life-reject", "review", "bob@example.com", approve=True)

        # A delegate decides; the delegator can no longer.
        mail_to(smtp, "eve@example.com", "Approval needed: Delegated")
        client.delegate("life-delegate", "review", "eve@example.com", "ian@example.com", comment="On leave")
        [asked] = mail_to(smtp, "ian@example.com", "Approval needed: Delegated")
        assert "delegated to you" in text_of(asked)
        client.decide("life-delegate", "review", "eve@example.com", approve=True)
        mail_to(smtp, "eve@example.com", "Decision not applied: Delegated")
        client.decide("life-delegate", "review", "ian@example.com", approve=True, comment="For Eve")

        # A withdrawn report tells its approver, then sends nothing more.
        mail_to(smtp, "wes@example.com", "Approval needed: Withdrawn")
        client.withdraw("life-withdraw", SUBMITTER, reason="Numbers restated")
        mail_to(smtp, "wes@example.com", "Approval no longer needed: Withdrawn")
        sent_to_wes = len(smtp.to("wes@example.com"))

    for report_id in ("life-escalate", "life-remind", "life-reject", "life-delegate"):
        wait_until(
            lambda report_id=report_id: report_status(database_url, report_id) == "finalized",
            90,
            what=f"{report_id} finalized",
        )
    reminders_then = subjects(smtp, "bob@example.com").count("Reminder: approval needed: Reminded (stage review)")
    time.sleep(5)  # more than two reminder intervals
    assert len(smtp.to("wes@example.com")) == sent_to_wes, "an email about a withdrawn report"
    assert report_status(database_url, "life-withdraw") == "withdrawn"
    assert subjects(smtp, "bob@example.com").count("Reminder: approval needed: Reminded (stage review)") == (
        reminders_then
    ), "a reminder after the decision"
    exit_codes = pipeline.stop()
    assert exit_codes == {name: 0 for name in exit_codes}, pipeline.logs()

    # The final PDF of the revision says so; the first revision's draft is kept beside it.
    reports = tmp_path / "storage" / "reports" / "life-reject"
    final = "\n".join(
        p.extract_text() for p in PdfReader(io.BytesIO((reports / "revision-2" / "final.pdf").read_bytes())).pages
    )
    assert "Revision 2" in final and "Timed out, revised" in final
    assert (reports / "draft.pdf").is_file()
    delegated_pdf = tmp_path / "storage" / "reports" / "life-delegate" / "final.pdf"
    record = "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(delegated_pdf.read_bytes())).pages)
    assert "ian@example.com on behalf of eve@example.com" in " ".join(record.split())

    # The history says who did what, in order.
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            delegated = report_history(session, "life-delegate")
            withdrawn = report_history(session, "life-withdraw")
            revised = report_history(session, "life-reject")
    finally:
        engine.dispose()
    delegated_steps = [s["step"] for s in delegated]
    assert delegated_steps.index("delegated") < delegated_steps.index("approved") < delegated_steps.index("finalized")
    [approval] = [s for s in delegated if s["step"] == "approved"]
    assert (approval["actor"], approval["on_behalf_of"]) == ("ian@example.com", "eve@example.com")
    assert "refused" in delegated_steps and "email" in delegated_steps
    assert [s["step"] for s in withdrawn if s["step"] in ("withdrawn", "stage withdrawn")] == [
        "stage withdrawn",
        "withdrawn",
    ]
    assert [s["step"] for s in revised if s["step"] in ("deadline_passed", "resubmitted", "finalized")] == [
        "deadline_passed",
        "resubmitted",
        "finalized",
    ]

    # The reminder's timer span is in the report's one trace, and so is the email it caused.
    wait_until(lambda: any(s["name"] == "timer approval.reminder_due" for s in otlp.spans), 10, what="timer spans")
    timer_spans = [s for s in otlp.spans if s["name"] == "timer approval.reminder_due"]
    reminded_spans = [s for s in otlp.spans if s["trace_id"] == reminded.trace_id]
    assert any(s["trace_id"] == reminded.trace_id for s in timer_spans)
    assert any(s["name"] == "smtp send" for s in reminded_spans)
    assert any(s["name"].startswith(f"process {exchange}:approval.reminded") for s in reminded_spans)


def test_a_due_timer_whose_process_was_killed_fires_once_after_its_lease(pipeline, database_url, exchange, smtp):
    """kill -9 the approval process holding a due reminder (its lease taken, not fired): another process
    fires it once the lease runs out, and the inbox makes sure it acts once."""
    with ReportflowClient(TEST_AMQP_URL, exchange) as client:
        client.request_report(one_stage("life-kill", "Killed", remind_every="PT6S"))
        mail_to(smtp, "bob@example.com", "Approval needed: Killed")
        pipeline.kill("approval")
        engine = make_engine(database_url)
        try:
            wait_until(lambda: _due(engine), 15, what="the reminder due")
            with Session(engine) as session, session.begin():
                # What the killed process left: the due timer leased to it, never marked fired.
                session.execute(
                    update(Timer)
                    .where(Timer.event_type == "approval.reminder_due", Timer.fired_at.is_(None))
                    .values(leased_until=utcnow() + timedelta(seconds=4), attempts=1)
                )
            leased_at = time.monotonic()
            pipeline.start("approval")
            [reminder] = mail_to(smtp, "bob@example.com", "Reminder: approval needed: Killed", timeout=30)
            assert time.monotonic() - leased_at >= 3.5, "fired before the dead process's lease ran out"
            time.sleep(2)
            assert len([m for m in smtp.to("bob@example.com") if "Reminder" in m["Subject"]]) == 1
            with Session(engine) as session:
                fired = session.scalars(
                    select(Timer).where(Timer.event_type == "approval.reminder_due", Timer.fired_at.is_not(None))
                ).all()
            assert [t.attempts for t in fired] == [2]
            client.decide("life-kill", "review", "bob@example.com", approve=True)
            wait_until(lambda: report_status(database_url, "life-kill") == "finalized", 60, what="life-kill final")
        finally:
            engine.dispose()
    exit_codes = pipeline.stop()
    assert exit_codes == {name: 0 for name in exit_codes}, pipeline.logs()


def _due(engine) -> bool:
    with Session(engine) as session:
        return (
            session.scalar(
                select(Timer.id).where(
                    Timer.event_type == "approval.reminder_due", Timer.fired_at.is_(None), Timer.due_at <= utcnow()
                )
            )
            is not None
        )


def test_the_publish_command_sends_delegations_withdrawals_and_resubmissions(exchange, tap, tmp_path):
    revision = tmp_path / "revision.json"
    revision.write_text(json.dumps({"title": "Q3, restated"}))
    env = {**os.environ, "REPORTFLOW_AMQP_URL": TEST_AMQP_URL, "REPORTFLOW_EXCHANGE": exchange}
    reportflow = str(Path(sys.executable).parent / "reportflow")
    commands = [
        ["delegation", "r-9", "--stage", "review", "--approver", "bob@example.com", "--to", "ian@example.com"],
        ["withdrawal", "r-9", "--submitter-id", SUBMITTER, "--reason", "restated"],
        ["resubmission", "r-9", "--submitter-id", SUBMITTER, "--revision-file", str(revision), "--comment", "v2"],
    ]
    for command in commands:
        run = subprocess.run([reportflow, "publish", *command], capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 0, run.stderr
    sent = {t: p for t, p, _ in tap.wait_for("report.resubmitted")} | {t: p for t, p, _ in tap.drain()}
    assert sent["approval.delegated"]["delegate"] == {"email": "ian@example.com"}
    assert sent["report.withdrawn"] == {"report_id": "r-9", "submitter": {"id": SUBMITTER}, "reason": "restated"}
    assert sent["report.resubmitted"] == {
        "report_id": "r-9",
        "submitter": {"id": SUBMITTER},
        "title": "Q3, restated",
        "comment": "v2",
    }
