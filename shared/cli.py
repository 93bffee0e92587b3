"""The `reportflow` command: the commands every install has (db, report, trace, config), joined with
those each installed package contributes through the `reportflow.commands` entry points (the consumers:
consume, topology, dlq, status; the producers: publish, gateway, demo). shared/ names neither."""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path

import click

from reportflow.shared.config import Settings
from reportflow.shared.version import version

COMMAND_ENTRY_POINTS = "reportflow.commands"
# What the upstream's install (`pip install reportflow`) leaves out, and the extra that brings it.
EXTRA_FOR_MODULE = {
    "sqlalchemy": "pipeline",
    "alembic": "pipeline",
    "psycopg": "pipeline",
    "jinja2": "pipeline",
    "weasyprint": "pipeline",
    "pypdf": "pipeline",
    "honcho": "pipeline",
    "boto3": "pipeline",
    "cryptography": "pipeline",
    "prometheus_client": "pipeline",
    "flask": "gateway",
    "waitress": "gateway",
}


class CommandsOfTheInstall(click.Group):
    """A command whose part is not installed says which extra brings it, instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as missing:
            top = (missing.name or "").split(".")[0]
            if top not in EXTRA_FOR_MODULE and not top.startswith("opentelemetry"):
                raise
            extra = EXTRA_FOR_MODULE.get(top, "pipeline")
            raise click.ClickException(
                f"this command needs {top}, which this install of reportflow does not "
                f"have: pip install 'reportflow[{extra}]'"
            ) from None


@click.group(cls=CommandsOfTheInstall)
@click.version_option(version(), prog_name="reportflow")
def main() -> None:
    """reportflow: report workflows on RabbitMQ."""


def _join_contributed_commands() -> None:
    for entry in metadata.entry_points(group=COMMAND_ENTRY_POINTS):
        try:
            commands = entry.load()
        except ImportError as exc:  # a part whose extra is not installed
            logging.getLogger("reportflow.cli").debug("no %s commands: %s", entry.name, exc)
            continue
        for command in commands:
            main.add_command(command)


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Bring the database schema up to date."""
    from reportflow.shared.migrate import upgrade

    settings = Settings.load()
    upgrade(settings.database_url, revision)
    click.echo(f"database schema at {revision}: {settings.masked()['database_url']}")


@main.group()
def report() -> None:
    """Look at reports."""


@report.command("show")
@click.argument("report_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def report_show(report_id: str, as_json: bool) -> None:
    """Print a report's status, stages, decisions, documents, emails and trace id."""
    from reportflow.shared.report_views import as_text, report_summary

    summary = report_summary(Settings.load(), report_id)
    if summary is None:
        raise click.ClickException(f"no report {report_id!r}")
    click.echo(json.dumps(summary, indent=2, default=str) if as_json else as_text(summary))


@report.command("history")
@click.argument("report_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def report_history_command(report_id: str, as_json: bool) -> None:
    """Print every step of a report in order, with time and actor: requested, revisions, generated,
    stages, reminders, escalations, delegations, decisions, refusals, withdrawal, finalized, each email."""
    from sqlalchemy.orm import Session

    from reportflow.shared.db import make_engine
    from reportflow.shared.report_history import as_text, report_history

    engine = make_engine(Settings.load().database_url)
    try:
        with Session(engine) as session:
            steps = report_history(session, report_id)
    finally:
        engine.dispose()
    if steps is None:
        raise click.ClickException(f"no report {report_id!r}")
    click.echo(json.dumps(steps, indent=2) if as_json else as_text(steps))


@main.command("trace")
@click.argument("report_id")
def trace_command(report_id: str) -> None:
    """Print REPORT_ID's trace as a waterfall: from Jaeger (JAEGER_QUERY_URL) or the local span files."""
    from reportflow.shared.report_views import report_summary
    from reportflow.shared.traces import load_from_files, load_from_jaeger, waterfall

    settings = Settings.load()
    summary = report_summary(settings, report_id)
    if summary is None or not summary["trace_id"]:
        raise click.ClickException(f"no trace stored for report {report_id!r}")
    if settings.jaeger_query_url:
        rows = load_from_jaeger(settings.jaeger_query_url, summary["trace_id"])
    elif settings.tracing.local_dir:
        rows = load_from_files(Path(settings.tracing.local_dir), summary["trace_id"])
    else:
        raise click.ClickException(
            "set JAEGER_QUERY_URL, or tracing.local_dir (REPORTFLOW_TRACE_DIR) "
            "where the consumers write spans when no collector is configured"
        )
    click.echo(waterfall(rows))


@main.group()
def config() -> None:
    """Settings."""


@config.command("show")
def config_show() -> None:
    """The effective settings (files, then environment), secrets masked."""
    for key, value in Settings.load().masked().items():
        click.echo(f"{key} = {value}")


_join_contributed_commands()
