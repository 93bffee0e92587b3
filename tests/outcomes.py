"""What a run of many two-stage reports must end with, however it was disturbed: every report finalized,
one draft and one final each, its decisions, and every email once (beyond the documented resend bound).
For the fault and cluster tests."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from reportflow.shared.db import make_engine
from reportflow.shared.models import Decision, Document, Notification, Report
from tests.helpers import sample_request


def small_request(report_id: str) -> dict:
    request = sample_request(report_id=report_id, title=f"Fault report {report_id}")
    request["data"]["table"]["rows"] = request["data"]["table"]["rows"][:10]
    request["approval_stages"] = [
        {"name": "review", "approvers": ["bob@example.com"], "rule": "all"},
        {"name": "sign-off", "approvers": ["carol@example.com", "dan@example.com"], "rule": "any"},
    ]
    return request


def statuses(url: str) -> Counter:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            return Counter(session.scalars(select(Report.status)))
    finally:
        engine.dispose()


def tally(url: str) -> dict:
    engine = make_engine(url)
    try:
        with Session(engine) as session:

            def per_report(model, *where):
                return Counter(session.scalars(select(model.report_id).where(*where)))

            return {
                "documents": per_report(Document),
                "drafts": per_report(Document, Document.kind == "draft"),
                "finals": per_report(Document, Document.kind == "final"),
                "decisions": per_report(Decision),
                "notifications": session.scalar(select(func.count()).select_from(Notification)),
            }
    finally:
        engine.dispose()


def missing_emails(url: str, report_ids: list[str], smtp) -> str:
    """Which emails did not arrive, and what the database says of them: for a failure worth reading."""
    received = {(m["envelope_to"][0], str(m["message"]["Subject"])) for m in smtp.messages}
    engine = make_engine(url)
    lines = []
    with Session(engine) as session:
        for report_id in report_ids:
            title = f"Fault report {report_id}"
            expected = [
                ("bob@example.com", f"Approval needed: {title} (stage 1 of 2: review)"),
                ("carol@example.com", f"Approval needed: {title} (stage 2 of 2: sign-off)"),
                ("dan@example.com", f"Approval needed: {title} (stage 2 of 2: sign-off)"),
                ("ann@example.com", f"Report approved: {title}"),
            ]
            for to, subject in expected:
                if (to, subject) not in received:
                    rows = session.execute(
                        select(Notification.status, Notification.recipients).where(
                            Notification.report_id == report_id, Notification.subject == subject
                        )
                    ).all()
                    lines.append(f"missing {to}: {subject}; notifications rows: {rows}")
    engine.dispose()
    return "\n".join(lines)


def check_everything_arrived_once(url: str, report_ids: list[str], smtp, notification_kills: int) -> dict:
    counts = tally(url)
    assert statuses(url) == Counter({"finalized": len(report_ids)})
    for report_id in report_ids:
        assert counts["drafts"][report_id] == 1 and counts["finals"][report_id] == 1, report_id
        assert counts["decisions"][report_id] == 2, report_id  # bob for review, carol for sign-off
    message_ids = Counter(m["message"]["Message-ID"] for m in smtp.messages)
    # Per report: bob (review), carol and dan (sign-off), submitter and client (approved): 4 emails.
    assert len(message_ids) == 4 * len(report_ids) == counts["notifications"]
    resent = sum(n - 1 for n in message_ids.values())
    assert resent <= notification_kills, f"{resent} emails sent twice with {notification_kills} kills"
    return {"resent": resent, **{k: sum(v.values()) if isinstance(v, Counter) else v for k, v in counts.items()}}
