"""notification: emails the approvers asked to decide a stage (approval.requested: it opened, or they
replace others by escalation or delegation), reminds those who have not decided (approval.reminded) and
tells them when a report is withdrawn (approval.withdrawn); emails the submitter of an invalid or
rejected report (report.invalid, report.rejected, a deadline's rejection), the submitter and client of a
finalized report with its PDF (report.finalized), and whoever asked for something that was refused
(approval.refused); records every email.

Email cannot join a transaction, so each one is recorded (pending) and committed before it is
sent, with a Message-ID derived from the event, and marked sent after. A crash between the send
and the mark sends that one email once more, with the same Message-ID; nothing else repeats one."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from reportflow.consumers.descriptions import describe
from reportflow.consumers.stage import Stage
from reportflow.shared.events import Event
from reportflow.shared.mail import (
    InvalidAddress,
    Postman,
    build_email,
    check_address,
    one_line,
    quoted,
    stable_message_id,
)
from reportflow.shared.models import Notification, utcnow
from reportflow.shared.storage import Storage

_WHY_ASKED = {
    "opened": "is waiting for your decision",
    "escalated": "was escalated to you (its deadline passed before every approver decided); it is waiting for your "
    "decision",
    "delegated": "was delegated to you. It is waiting for your decision",
}


def on_approval_requested(event: Event, uow, postman: Postman, storage: Storage, clock) -> None:
    requested = event.payload
    stage = requested["stage"]
    title, stage_name = one_line(requested["title"]), one_line(stage["name"])
    subject = f"Approval needed: {title} (stage {stage['position']} of {stage['of']}: {stage_name})"
    rule = "every approver must approve" if stage["rule"] == "all" else "one approval is enough"
    why = _WHY_ASKED[requested.get("reason", "opened")]
    for approver in requested["approvers"]:
        text = (
            f'Hello,\n\nThe report "{title}" ({requested["report_id"]}){_revision(requested)} {why} at stage '
            f'"{stage_name}" ({rule}).{_deadline(requested, clock)}\n\n{_how_to_decide(postman, requested, approver)}'
            "\nThe draft is attached.\n"
        )
        attachments = _pdf(storage, requested.get("document"), requested["report_id"])
        _send(uow, postman, event, [approver], subject, text, attachments, key=approver)


def on_approval_reminded(event: Event, uow, postman: Postman, clock) -> None:
    reminded = event.payload
    stage = reminded["stage"]
    title, stage_name = one_line(reminded["title"]), one_line(stage["name"])
    subject = f"Reminder: approval needed: {title} (stage {stage_name})"
    for approver in reminded["approvers"]:
        text = (
            f'Hello,\n\nA reminder: the report "{title}" ({reminded["report_id"]}){_revision(reminded)} is still '
            f'waiting for your decision at stage "{stage_name}".{_deadline(reminded, clock)}\n\n'
            f"{_how_to_decide(postman, reminded, approver)}"
        )
        _send(uow, postman, event, [approver], subject, text, key=approver)


def on_approval_withdrawn(event: Event, uow, postman: Postman) -> None:
    withdrawn = event.payload
    title = one_line(withdrawn["title"])
    reason = f"Their reason:\n{quoted(withdrawn['reason'])}\n" if withdrawn.get("reason") else ""
    for approver in withdrawn["approvers"]:
        text = (
            f'Hello,\n\nThe report "{title}" ({withdrawn["report_id"]}) was withdrawn by its submitter. '
            f"Your decision is no longer needed, and the links you were sent no longer work.\n{reason}"
        )
        _send(uow, postman, event, [approver], f"Approval no longer needed: {title}", text, key=approver)


def on_deadline_passed(event: Event, uow, postman: Postman) -> None:
    passed = event.payload
    if passed["outcome"] != "rejected":
        return  # escalated: the escalation approvers are asked (approval.requested); approved: more follows
    report = uow.report(passed["report_id"])
    title = one_line(passed["title"])
    waiting = ", ".join(passed["undecided"]) or "nobody"
    text = (
        f'Hello,\n\nThe report "{title}" ({passed["report_id"]}) was rejected at stage '
        f'"{one_line(passed["stage"])}": its deadline passed before every approver decided (still waiting for: '
        f"{waiting}).\n\nYou may resubmit it as a new revision.\n"
    )
    _send(uow, postman, event, [report.submitter["email"]], f"Report rejected, deadline passed: {title}", text)


def _how_to_decide(postman: Postman, asked: dict, approver: str) -> str:
    stage_name = one_line(asked["stage"]["name"])
    if postman.links:
        return (
            "Decide here, or delegate your decision to someone else (this link is yours, and works once):\n  "
            f"{postman.links.url(asked['report_id'], asked['stage']['name'], approver)}\n"
        )
    return (
        f'Decide with:\n  reportflow publish decision {asked["report_id"]} --stage "{stage_name}" '
        f'--approver {approver} --approve|--reject --comment "..."\n'
    )


def _revision(asked: dict) -> str:
    return f", revision {asked['revision']}," if asked.get("revision", 1) > 1 else ""


def _deadline(asked: dict, clock) -> str:
    """When the stage's deadline passes, and how long is left."""
    if not asked.get("deadline_at"):
        return ""
    deadline = datetime.fromisoformat(asked["deadline_at"])
    return f" Please decide by {deadline:%Y-%m-%d %H:%M:%S} UTC ({_left(deadline - clock())} left)."


def _left(remaining) -> str:
    seconds = max(0, int(remaining.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = (
        [(days, "day"), (hours, "hour"), (minutes, "minute")]
        if days or hours
        else [(minutes, "minute"), (seconds, "second")]
    )
    shown = [f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in parts if n][:2]
    return " ".join(shown) or "no time"


def on_report_invalid(event: Event, uow, postman: Postman) -> None:
    invalid = event.payload
    if not invalid.get("submitter"):
        return  # nobody to write to; the event itself is the record
    title = one_line(invalid.get("title") or "") or "(untitled)"
    reasons = "\n".join(f"  - {one_line(r)}" for r in invalid["reasons"])
    text = (
        f'Hello,\n\nYour report request "{title}" could not be accepted:\n\n{reasons}\n\n'
        "Please correct it and send it again.\n"
    )
    _send(uow, postman, event, [invalid["submitter"]["email"]], f"Report request not accepted: {title}", text)


def on_report_rejected(event: Event, uow, postman: Postman) -> None:
    rejected = event.payload
    report = uow.report(rejected["report_id"])
    title = one_line(rejected["title"])
    comment = f"Their comment:\n{quoted(rejected['comment'])}" if rejected.get("comment") else "(no comment)"
    text = (
        f'Hello,\n\nThe report "{title}" ({rejected["report_id"]}) was rejected at stage '
        f'"{one_line(rejected["stage"])}" by {rejected["approver"]["email"]}.\n\n{comment}\n'
    )
    _send(uow, postman, event, [report.submitter["email"]], f"Report rejected: {title}", text)


def on_report_finalized(event: Event, uow, postman: Postman, storage: Storage) -> None:
    finalized = event.payload
    report = uow.report(finalized["report_id"])
    title = one_line(finalized["title"])
    text = (
        f'Hello,\n\nThe report "{title}" ({finalized["report_id"]}) has been approved. '
        "The approved version, with its approval page, is attached.\n"
    )
    attachments = _pdf(storage, finalized["document"], finalized["report_id"])
    recipients = list(dict.fromkeys([report.submitter["email"], report.client["email"]]))
    _send(uow, postman, event, recipients, f"Report approved: {title}", text, attachments)


def on_approval_refused(event: Event, uow, postman: Postman) -> None:
    refused = event.payload
    if not refused.get("approver"):
        return  # no address to answer to; the refusal is recorded by approval
    report = uow.report(refused.get("report_id"))
    title = one_line(report.title if report else (refused.get("report_id") or "unknown report"))
    action = refused.get("action", "decide")
    asked = (
        f'Your decision ({one_line(refused.get("decision") or "unreadable")}) on "{title}", stage '
        f'"{one_line(refused.get("stage") or "?")}", was not applied.'
        if action == "decide"
        else f'Your request to {action} "{title}" was not applied.'
    )
    text = f"Hello,\n\n{asked} The reason:\n{quoted(refused['reason'])}\n"
    try:
        recipient = check_address(refused["approver"]["email"])
    except InvalidAddress:
        return
    what = "Decision" if action == "decide" else "Request"
    _send(uow, postman, event, [recipient], f"{what} not applied: {title}", text)


def _pdf(storage: Storage, document: dict | None, report_id: str) -> list[tuple[str, bytes, str]]:
    """A document as an attachment, named by its kind: the draft, or the final (approved) version."""
    if not document:
        return []
    content = storage.get(document["storage_key"], sha256=document["sha256"])  # the PDF that was approved
    return [(f"{report_id}-{document['kind']}.pdf", content, "application/pdf")]


def _send(
    uow,
    postman: Postman,
    event: Event,
    to: list[str],
    subject: str,
    text: str,
    attachments: Sequence[tuple[str, bytes, str]] = (),
    key: str = "all",
) -> None:
    message_id = stable_message_id(f"{event.message_id}.{key}")
    email = build_email(
        sender=postman.sender, to=to, subject=subject, text=text, message_id=message_id, attachments=attachments
    )
    with uow.commit_now() as session:
        if _locked_record(session, message_id) is None:
            session.add(
                Notification(
                    report_id=event.report_id,
                    event_type=event.type,
                    event_message_id=event.message_id,
                    recipients=to,
                    subject=email["Subject"],
                    email_message_id=message_id,
                    attachments=[a[0] for a in attachments],
                    transport=postman.mailer.transport,
                )
            )
    with uow.commit_now() as session:
        # Locked until this block commits the mark: a copy of this event handled at the same time waits
        # here and then finds the email sent. Only a crash (its lock gone with its connection) leaves one
        # pending, to be sent again with the same Message-ID.
        record = _locked_record(session, message_id)
        if record is None:  # the first block recorded it; only a database that lost the row gets here
            raise RuntimeError(f"the record of email {message_id} is gone")
        if record.status == "sent":
            return
        postman.send(email)
        record.status, record.sent_at = "sent", utcnow()


def _locked_record(session, message_id: str) -> Notification | None:
    return (
        session.query(Notification)
        .filter_by(email_message_id=message_id)
        .with_for_update()
        .populate_existing()
        .one_or_none()
    )


STAGE = Stage(
    name="notification",
    handlers={
        "approval.requested": on_approval_requested,
        "report.invalid": on_report_invalid,
        "report.rejected": on_report_rejected,
        "report.finalized": on_report_finalized,
        "approval.refused": on_approval_refused,
        "approval.reminded": on_approval_reminded,
        "approval.withdrawn": on_approval_withdrawn,
        "approval.deadline_passed": on_deadline_passed,
    },
    describe=describe,
)
