"""What operators filter on in a trace, read from a report event: the template, the approval stage, the
decision, and who acted. Stages hand it to the runtime as their Stage.describe."""

from __future__ import annotations


def describe(message) -> dict:
    payload = message.payload if isinstance(message.payload, dict) else {}
    facts = {}
    if isinstance(payload.get("template"), str):
        facts["report.template"] = payload["template"]
    stage = payload.get("stage")
    stage = stage.get("name") if isinstance(stage, dict) else stage
    if isinstance(stage, str):
        facts["approval.stage"] = stage
    if payload.get("decision") in ("approve", "reject"):
        facts["approval.decision"] = payload["decision"]
    role, person = next(
        (
            (r, payload[k])
            for k, r in (("approver", "approver"), ("submitter", "submitter"))
            if isinstance(payload.get(k), dict)
        ),
        (None, None),
    )
    if person:
        facts["enduser.role"] = person.get("role") if isinstance(person.get("role"), str) else role
        if isinstance(person.get("id"), str):
            facts["enduser.id"] = person["id"]
        if isinstance(person.get("email"), str):
            facts["user.email"] = person["email"]
    return facts
