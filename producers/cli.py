"""The producers' commands, joined under `reportflow` (see shared/cli.py): publish, gateway, demo."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from reportflow.producers.client import InvalidEvent, ReportflowClient, Unroutable
from reportflow.shared.config import Settings


def trace_this_command() -> None:
    """The publish span starts the report's trace, as an upstream's would. The client's own install has no
    tracing SDK: its spans are the API's no-ops, and the trace starts where reportflow reads the request."""
    try:
        from reportflow.shared.tracing import setup_command_tracing
    except ImportError:
        return
    setup_command_tracing()


@click.group()
def publish() -> None:
    """Publish an upstream event (report.requested, approval.decided, approval.delegated, report.withdrawn,
    report.resubmitted)."""
    trace_this_command()


@publish.command("request")
@click.argument("request_file", type=click.File("rb"))
@click.option("--report-id", help="Use this report id instead of the file's (or a new one).")
@click.option(
    "--no-validate",
    is_flag=True,
    help="Send even if it breaks the schema (reportflow will answer with report.invalid).",
)
def publish_request(request_file, report_id: str | None, no_validate: bool) -> None:
    """Publish report.requested from REQUEST_FILE (JSON)."""
    try:
        request = json.loads(request_file.read())
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="REQUEST_FILE") from None
    if report_id:
        request["report_id"] = report_id
    _send(lambda client: client.request_report(request), validate=not no_validate)


@publish.command("decision")
@click.argument("report_id")
@click.option("--stage", required=True, help="The approval stage decided.")
@click.option("--approver", required=True, help="The approver's email address.")
@click.option("--approve/--reject", "approve", required=True, help="The decision.")
@click.option("--comment", default=None)
def publish_decision(report_id: str, stage: str, approver: str, approve: bool, comment: str | None) -> None:
    """Publish approval.decided for REPORT_ID."""
    _send(lambda client: client.decide(report_id, stage, approver, approve, comment))


@publish.command("delegation")
@click.argument("report_id")
@click.option("--stage", required=True, help="The open stage.")
@click.option("--approver", required=True, help="The approver handing over the decision.")
@click.option("--to", "delegate", required=True, help="The delegate's email address.")
@click.option("--comment", default=None)
def publish_delegation(report_id: str, stage: str, approver: str, delegate: str, comment: str | None) -> None:
    """Publish approval.delegated for REPORT_ID."""
    _send(lambda client: client.delegate(report_id, stage, approver, delegate, comment=comment))


@publish.command("withdrawal")
@click.argument("report_id")
@click.option("--submitter-id", required=True, help="The submitter's id, as in the request.")
@click.option("--reason", default=None)
def publish_withdrawal(report_id: str, submitter_id: str, reason: str | None) -> None:
    """Publish report.withdrawn for REPORT_ID."""
    _send(lambda client: client.withdraw(report_id, submitter_id, reason))


@publish.command("resubmission")
@click.argument("report_id")
@click.option("--submitter-id", required=True, help="The submitter's id, as in the request.")
@click.option(
    "--revision-file",
    type=click.File("rb"),
    help="JSON with any of title, data, approval_stages; what is left out stays as it was.",
)
@click.option("--comment", default=None)
def publish_resubmission(report_id: str, submitter_id: str, revision_file, comment: str | None) -> None:
    """Publish report.resubmitted for REPORT_ID, a rejected report."""
    revision = json.loads(revision_file.read()) if revision_file else {}
    if comment:
        revision["comment"] = comment
    _send(lambda client: client.resubmit(report_id, submitter_id, **revision))


def _send(action, validate: bool = True) -> None:
    try:
        with ReportflowClient(validate=validate) as client:
            published = action(client)
    except InvalidEvent as exc:
        click.echo("Not sent, the event is invalid:", err=True)
        for reason in exc.reasons:
            click.echo(f"  - {reason}", err=True)
        sys.exit(2)
    except Unroutable as exc:
        click.echo(f"Not delivered: {exc}", err=True)
        sys.exit(3)
    click.echo(
        json.dumps(
            {
                "event": published.event_type,
                "message_id": published.message_id,
                "report_id": published.report_id,
                "trace_id": published.trace_id,
            }
        )
    )


@click.command()
def gateway() -> None:
    """Run the HTTP gateway: POST /reports, report status, and approvers' decision pages."""
    from reportflow.producers.gateway import serve

    serve()


@click.command()
@click.option("--timeout", default=120, show_default=True, help="Seconds to wait for each step.")
@click.option(
    "--request-file",
    type=click.Path(exists=True, dir_okay=False),
    default=str(Path(__file__).resolve().parent / "examples" / "q3-revenue.json"),
)
def demo(timeout: int, request_file: str) -> None:
    """Publish a sample request, approve both stages as the approvers would, and print the outcome."""
    from reportflow.producers.client import ReportflowClient
    from reportflow.shared.report_views import as_text, report_summary

    trace_this_command()
    settings = Settings.load()
    request = json.loads(Path(request_file).read_text())

    def wait_for(report_id: str, done, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            summary = report_summary(settings, report_id)
            if summary and done(summary):
                return summary
            time.sleep(0.5)
        raise click.ClickException(f"timed out waiting for {what}; is `make run` going?")

    def stage_open(name):
        return lambda s: any(st["name"] == name and st["status"] == "open" for st in s["stages"])

    with ReportflowClient() as client:
        published = client.request_report(request)
        report_id = published.report_id
        if report_id is None:  # request_report names one when the request has none
            raise click.ClickException("the request was published without a report id")
        click.echo(f"requested {report_id} (trace {published.trace_id})")
        for stage in request["approval_stages"]:
            wait_for(report_id, stage_open(stage["name"]), f"stage {stage['name']} to open")
            approvers = stage["approvers"] if stage.get("rule", "all") == "all" else stage["approvers"][:1]
            for approver in approvers:
                client.decide(report_id, stage["name"], approver, approve=True, comment="Looks right to me.")
                click.echo(f"  {approver} approved stage {stage['name']}")
    summary = wait_for(
        report_id,
        lambda s: s["status"] == "finalized" and len(s["notifications"]) >= 4,
        "the approved PDF and its emails",
    )
    click.echo(as_text(summary))


@click.group()
def apikey() -> None:
    """The gateway's per-client API keys (stored as SHA-256 digests only)."""


def _keys_session():
    from sqlalchemy.orm import Session

    from reportflow.shared.db import make_engine

    return Session(make_engine(Settings.load().database_url))


@apikey.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(["submit", "read", "read-all"]),
    help="What the key may do: submit reports, read its own, read every report. [default: submit, read]",
)
def apikey_create(name: str, scopes: tuple[str, ...]) -> None:
    """Create a key for NAME and print it, once: it is kept nowhere but as its digest."""
    from reportflow.shared import api_keys

    with _keys_session() as session:
        try:
            key = api_keys.create(session, name, list(scopes or ("submit", "read")))
        except ValueError as bad:
            raise click.ClickException(str(bad)) from None
    click.echo(key)


@apikey.command("list")
def apikey_list() -> None:
    """Every key's name, scopes, creation and revocation (never the key)."""
    from reportflow.shared import api_keys

    with _keys_session() as session:
        for key in api_keys.listed(session):
            revoked = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            click.echo(f"{key.name:<30} {','.join(key.scopes):<22} created {key.created_at:%Y-%m-%d %H:%M}  {revoked}")


@apikey.command("revoke")
@click.argument("name")
def apikey_revoke(name: str) -> None:
    """Revoke NAME's key: from now on the gateway refuses it."""
    from reportflow.shared import api_keys

    with _keys_session() as session:
        if not api_keys.revoke(session, name):
            raise click.ClickException(f"no active key named {name!r}")
    click.echo(f"revoked {name}")


commands = [publish, gateway, demo, apikey]
