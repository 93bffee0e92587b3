"""The `reportflow` command."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from shared.config import Settings


@click.group()
def main() -> None:
    """reportflow: report workflows on RabbitMQ."""


@main.command()
@click.argument("stage", type=click.Choice(["creation", "generation", "approval", "notification"]))
def consume(stage: str) -> None:
    """Run one stage's consumer until SIGTERM or Ctrl-C."""
    from consumers.bootstrap import run

    run(stage)


@main.command()
def gateway() -> None:
    """Run the HTTP gateway: POST /reports, report status, and approvers' decision pages."""
    from producers.gateway import serve

    serve()


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Bring the database schema up to date."""
    from shared.migrate import upgrade

    settings = Settings.load()
    upgrade(settings.database_url, revision)
    click.echo(f"database schema at {revision}: {settings.masked()['database_url']}")


@main.group()
def topology() -> None:
    """Exchanges, queues and bindings on the broker."""


@topology.command("declare")
def topology_declare() -> None:
    """Declare reportflow's exchange, queues and dead-letter route (idempotent)."""
    import pika

    import consumers
    from shared.topology import Topology, declare

    settings = Settings.load()
    topo = Topology.of(settings)
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        declare(connection.channel(), topo, consumers.bindings())
    finally:
        connection.close()
    for stage, types in consumers.bindings().items():
        click.echo(f"{topo.queue(stage)} <- {', '.join(types)}")
    click.echo(f"{topo.dead_letter_queue} <- dead letters")


def _publish_group():
    from producers.cli import publish
    return publish


main.add_command(_publish_group(), "publish")


@main.group()
def dlq() -> None:
    """The dead-letter queue: what failed for good, and why."""


def _dead_letter_queue():
    from shared.dead_letters import DeadLetterQueue
    from shared.topology import Topology

    settings = Settings.load()
    return DeadLetterQueue(settings.amqp_url, Topology.of(settings))


@dlq.command("list")
def dlq_list() -> None:
    """One line per dead letter: message id, event, stage, attempts, error."""
    letters = _dead_letter_queue().list()
    for d in letters:
        click.echo(f"{d.message_id}  {d.event_type}  stage={d.stage or '?'}  attempts={d.attempts}  "
                   f"at={d.dead_lettered_at or '?'}  {d.error}")
    click.echo(f"{len(letters)} dead letter(s)")


@dlq.command("show")
@click.argument("message_id")
def dlq_show(message_id: str) -> None:
    """Headers and body of one dead letter."""
    letter = _dead_letter_queue().show(message_id)
    if letter is None:
        raise click.ClickException(f"no dead letter {message_id!r}")
    click.echo(json.dumps({"message_id": letter.message_id, "event": letter.event_type, "stage": letter.stage,
                           "queue": letter.queue, "error": letter.error, "attempts": letter.attempts,
                           "first_failure": letter.first_failure, "dead_lettered_at": letter.dead_lettered_at,
                           "headers": letter.headers}, indent=2, default=str))
    click.echo(letter.body.decode("utf-8", errors="replace"))


@dlq.command("replay")
@click.argument("message_id", required=False)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
def dlq_replay(message_id: str | None, replay_all: bool) -> None:
    """Send a dead letter (or --all) back to the queue it died in, trace context and all."""
    if bool(message_id) == replay_all:
        raise click.UsageError("name one MESSAGE_ID or give --all")
    replayed = _dead_letter_queue().replay(None if replay_all else message_id)
    for d in replayed:
        click.echo(f"replayed {d.message_id} ({d.event_type}) to {d.queue}")
    if message_id and not replayed:
        raise click.ClickException(f"no dead letter {message_id!r}")


@dlq.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask.")
def dlq_purge(yes: bool) -> None:
    """Delete every dead letter."""
    if not yes:
        click.confirm("Delete every dead letter?", abort=True)
    click.echo(f"purged {_dead_letter_queue().purge()} dead letter(s)")


@main.group()
def report() -> None:
    """Look at reports."""


@report.command("show")
@click.argument("report_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def report_show(report_id: str, as_json: bool) -> None:
    """Print a report's status, stages, decisions, documents, emails and trace id."""
    from shared.report_views import report_summary

    summary = report_summary(Settings.load(), report_id)
    if summary is None:
        raise click.ClickException(f"no report {report_id!r}")
    click.echo(json.dumps(summary, indent=2, default=str) if as_json else _as_text(summary))


def _as_text(summary: dict) -> str:
    lines = [f"{summary['id']}  {summary['title']}", f"  status:   {summary['status']}",
             f"  trace id: {summary['trace_id']}", f"  trace:    {summary['trace_url']}"]
    for stage in summary["stages"]:
        lines.append(f"  stage {stage['position']} {stage['name']} ({stage['rule']}): {stage['status']}")
        lines += [f"    {d['approver']} {d['decision']}d {d['decided_at']} {d['comment'] or ''}".rstrip()
                  for d in stage["decisions"]]
    lines += [f"  document {d['kind']}: {d['path']} ({d['pages']} pages, {d['size_bytes']} bytes)"
              for d in summary["documents"]]
    lines += [f"  email to {', '.join(n['recipients'])}: {n['subject']} [{n['transport']}]"
              for n in summary["notifications"]]
    lines += [f"  refused: {r['approver']} on {r['stage']}: {r['reason']}" for r in summary["refusals"]]
    return "\n".join(lines)


@main.command("trace")
@click.argument("report_id")
def trace_command(report_id: str) -> None:
    """Print REPORT_ID's trace as a waterfall: from Jaeger (JAEGER_QUERY_URL) or the local span files."""
    from shared.report_views import report_summary
    from shared.traces import load_from_files, load_from_jaeger, waterfall

    settings = Settings.load()
    summary = report_summary(settings, report_id)
    if summary is None or not summary["trace_id"]:
        raise click.ClickException(f"no trace stored for report {report_id!r}")
    if settings.jaeger_query_url:
        rows = load_from_jaeger(settings.jaeger_query_url, summary["trace_id"])
    elif settings.tracing.local_dir:
        rows = load_from_files(Path(settings.tracing.local_dir), summary["trace_id"])
    else:
        raise click.ClickException("set JAEGER_QUERY_URL, or tracing.local_dir (REPORTFLOW_TRACE_DIR) "
                                   "where the consumers write spans when no collector is configured")
    click.echo(waterfall(rows))


@main.group()
def config() -> None:
    """Settings."""


@config.command("show")
def config_show() -> None:
    """The effective settings (files, then environment), secrets masked."""
    for key, value in Settings.load().masked().items():
        click.echo(f"{key} = {value}")


@main.command()
def status() -> None:
    """Queue depths, consumer processes and their span pipelines."""
    import pika

    import consumers
    from shared.status import read_status_files
    from shared.topology import Topology

    settings = Settings.load()
    topo = Topology.of(settings)
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        click.echo(f"{'queue':<40} {'ready':>8} {'consumers':>9}")
        for queue in [*(topo.queue(s) for s in consumers.STAGES), topo.dead_letter_queue]:
            channel = connection.channel()
            try:
                declared = channel.queue_declare(queue, passive=True).method
                click.echo(f"{queue:<40} {declared.message_count:>8} {declared.consumer_count:>9}")
            except pika.exceptions.ChannelClosedByBroker:
                click.echo(f"{queue:<40} {'(not declared)':>18}")
    finally:
        connection.close()
    click.echo("")
    for process in read_status_files(settings.storage_dir):
        state = "stale" if process["stale"] else ("connected" if process["connected"] else "connecting")
        spans = process.get("spans") or {}
        click.echo(f"{process['stage']:<13} pid {process['pid']:<7} {state:<10} settled {process['messages_settled']:<7} "
                   f"reconnects {process['connections_opened'] - 1:<3} spans: " +
                   (", ".join(f"{k} {v}" for k, v in spans.items()) if spans else "tracing off"))


@main.command()
@click.option("--timeout", default=120, show_default=True, help="Seconds to wait for each step.")
@click.option("--request-file", type=click.Path(exists=True, dir_okay=False),
              default=str(Path(__file__).resolve().parents[1] / "producers" / "examples" / "q3-revenue.json"))
def demo(timeout: int, request_file: str) -> None:
    """Publish a sample request, approve both stages as the approvers would, and print the outcome."""
    from producers.client import ReportflowClient
    from shared.report_views import report_summary
    from shared.tracing import setup_command_tracing

    setup_command_tracing()
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
        click.echo(f"requested {report_id} (trace {published.trace_id})")
        for stage in request["approval_stages"]:
            wait_for(report_id, stage_open(stage["name"]), f"stage {stage['name']} to open")
            approvers = stage["approvers"] if stage.get("rule", "all") == "all" else stage["approvers"][:1]
            for approver in approvers:
                client.decide(report_id, stage["name"], approver, approve=True, comment="Looks right to me.")
                click.echo(f"  {approver} approved stage {stage['name']}")
    summary = wait_for(report_id, lambda s: s["status"] == "finalized" and len(s["notifications"]) >= 4,
                       "the approved PDF and its emails")
    click.echo(_as_text(summary))
