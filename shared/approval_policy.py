"""The rules of a stage's life that the schema cannot state: its deadline and reminders (ISO 8601
durations, read by isodate), what its deadline does, and the stages a request or a revision asks for.
creation and approval both ask these; they are said here once."""

from __future__ import annotations

from datetime import datetime, timedelta

import isodate

from reportflow.shared.models import ApprovalStage

ON_DEADLINE = ("escalate", "reject", "approve")
# A reminder more often than this would be mail-bombing; a deadline or reminder of zero is a mistake.
SHORTEST_REMINDER = timedelta(seconds=1)


class InvalidDuration(ValueError):
    pass


def after(moment: datetime, duration: str) -> datetime:
    """moment + an ISO 8601 duration; months and years are calendar months and years (P1M from 31 January
    is the end of February)."""
    return moment + _parse(duration)


def _parse(duration: str):
    try:
        return isodate.parse_duration(duration)
    except (isodate.ISO8601Error, ValueError) as exc:
        raise InvalidDuration(f"{duration!r} is not an ISO 8601 duration") from exc


def _positive(duration: str) -> bool:
    reference = datetime(2000, 1, 1)
    return after(reference, duration) - reference >= SHORTEST_REMINDER


def on_deadline(definition: dict) -> str:
    """What the stage's deadline does: as asked, else escalate when there is someone to escalate to."""
    return definition.get("on_deadline") or ("escalate" if definition.get("escalate_to") else "reject")


def stage_violations(definitions: list[dict]) -> list[str]:
    """Why these stage definitions cannot be accepted: names not distinct, durations that are not ISO 8601
    or not positive, an escalation without anyone to escalate to."""
    reasons = []
    names = [s["name"] for s in definitions]
    if len(set(names)) != len(names):
        reasons.append("approval_stages: stage names must be distinct")
    for index, definition in enumerate(definitions):
        where = f"approval_stages/{index}"
        for key in ("deadline", "remind_every"):
            if key in definition:
                try:
                    if not _positive(definition[key]):
                        reasons.append(f"{where}/{key}: must be at least {SHORTEST_REMINDER.seconds} second")
                except InvalidDuration as exc:
                    reasons.append(f"{where}/{key}: {exc}")
        if definition.get("on_deadline") == "escalate" and not definition.get("escalate_to"):
            reasons.append(f"{where}/on_deadline: escalate needs escalate_to")
        if ("on_deadline" in definition or "escalate_to" in definition) and "deadline" not in definition:
            reasons.append(f"{where}: on_deadline and escalate_to need a deadline")
    return reasons


def new_stages(definitions: list[dict], revision: int) -> list[ApprovalStage]:
    """The stages a request (revision 1) or a resubmission asks for, in order, as they are stored."""
    stages = []
    for position, definition in enumerate(definitions, start=1):
        kept = {k: v for k, v in definition.items() if k != "approvers"}
        kept["approvers"] = [a.lower() for a in definition["approvers"]]
        if "escalate_to" in kept:
            kept["escalate_to"] = [a.lower() for a in kept["escalate_to"]]
        stages.append(
            ApprovalStage(
                revision=revision,
                position=position,
                name=definition["name"],
                rule=definition.get("rule", "all"),
                approvers=list(kept["approvers"]),
                definition=kept,
                delegations={},
                escalated=False,
            )
        )
    return stages
