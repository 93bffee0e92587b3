"""`reportflow publish`: what an upstream system sends, from the command line."""
from __future__ import annotations

import json
import sys

import click

from producers.client import InvalidEvent, ReportflowClient, Unroutable
from shared.tracing import setup_command_tracing


@click.group()
def publish() -> None:
    """Publish an upstream event (report.requested, approval.decided)."""
    setup_command_tracing()  # the publish span starts the report's trace, as an upstream's would


@publish.command("request")
@click.argument("request_file", type=click.File("rb"))
@click.option("--report-id", help="Use this report id instead of the file's (or a new one).")
@click.option("--no-validate", is_flag=True, help="Send even if it breaks the schema (reportflow will answer with report.invalid).")
def publish_request(request_file, report_id: str | None, no_validate: bool) -> None:
    """Publish report.requested from REQUEST_FILE (JSON)."""
    try:
        request = json.loads(request_file.read())
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="REQUEST_FILE")
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
    click.echo(json.dumps({"event": published.event_type, "message_id": published.message_id,
                           "report_id": published.report_id, "trace_id": published.trace_id}))
