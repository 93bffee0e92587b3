"""The consumers' commands, joined under `reportflow` (see shared/cli.py): consume, topology, dlq, status."""

from __future__ import annotations

import json
import sys

import click

from reportflow.consumers import STAGE_NAMES
from reportflow.shared.broker import blocking_connection
from reportflow.shared.config import Settings


@click.command()
@click.argument("stage", type=click.Choice(STAGE_NAMES))
def consume(stage: str) -> None:
    """Run one stage's consumer until SIGTERM or Ctrl-C."""
    from reportflow.consumers.bootstrap import run

    run(stage)


@click.group()
def topology() -> None:
    """Exchanges, queues and bindings on the broker."""


@topology.command("declare")
def topology_declare() -> None:
    """Declare reportflow's exchange, queues and dead-letter route (idempotent)."""

    from reportflow import consumers
    from reportflow.shared.topology import Topology, TopologyMismatch, declare

    settings = Settings.load()
    topo = Topology.of(settings)
    connection = blocking_connection(settings.amqp_url)
    try:
        declare(connection.channel(), topo, consumers.bindings())
    except TopologyMismatch as mismatch:
        raise click.ClickException(str(mismatch)) from None
    finally:
        if connection.is_open:
            connection.close()
    for stage, types in consumers.bindings().items():
        click.echo(f"{topo.queue(stage)} <- {', '.join(types)}")
    click.echo(f"{topo.dead_letter_queue} <- dead letters")


@topology.command("users")
@click.option("--prefix", default="reportflow-", show_default=True, help="The users' names begin with this.")
@click.option("--apply", "apply_", is_flag=True, help="Create them and set their permissions, with rabbitmqctl.")
@click.option("--node", default=None, help="The broker node rabbitmqctl talks to (rabbitmqctl -n).")
def topology_users(prefix: str, apply_: bool, node: str | None) -> None:
    """Least-privilege broker users: one per stage, one per kind of upstream. New users' passwords are
    printed once; existing users keep theirs and get their permissions set again."""
    from reportflow.shared.broker import broker_vhost
    from reportflow.shared.broker_users import apply_with_rabbitmqctl, least_privilege_users
    from reportflow.shared.topology import Topology

    settings = Settings.load()
    topo = Topology.of(settings)
    vhost = broker_vhost(settings.amqp_url)
    users = least_privilege_users(topo, list(STAGE_NAMES), prefix)
    if not apply_:
        for user in users:
            topic = f" topic-write {user.topic_write}" if user.topic_write else ""
            click.echo(f"{user.name}: configure {user.configure} write {user.write} read {user.read}{topic}")
        click.echo(f"(on vhost {vhost}; --apply creates them)")
        return
    try:
        passwords = apply_with_rabbitmqctl(users, vhost, topo.exchange, node)
    except (RuntimeError, FileNotFoundError) as failed:
        raise click.ClickException(str(failed)) from None
    for user in users:
        click.echo(f"{user.name} {passwords.get(user.name, '(exists: password kept)')}")


@click.group()
def dlq() -> None:
    """The dead-letter queue: what failed for good, and why."""


def _dead_letter_queue():
    from reportflow.shared.dead_letters import DeadLetterQueue
    from reportflow.shared.topology import Topology

    settings = Settings.load()
    return DeadLetterQueue(settings.amqp_url, Topology.of(settings))


@dlq.command("list")
def dlq_list() -> None:
    """One line per dead letter: message id, event, stage, attempts, error."""
    letters = _dead_letter_queue().list()
    for d in letters:
        click.echo(
            f"{d.message_id}  {d.event_type}  stage={d.stage or '?'}  attempts={d.attempts}  "
            f"at={d.dead_lettered_at or '?'}  {d.error}"
        )
    click.echo(f"{len(letters)} dead letter(s)")


@dlq.command("show")
@click.argument("message_id")
def dlq_show(message_id: str) -> None:
    """Headers and body of one dead letter."""
    letter = _dead_letter_queue().show(message_id)
    if letter is None:
        raise click.ClickException(f"no dead letter {message_id!r}")
    click.echo(
        json.dumps(
            {
                "message_id": letter.message_id,
                "event": letter.event_type,
                "stage": letter.stage,
                "queue": letter.queue,
                "error": letter.error,
                "attempts": letter.attempts,
                "first_failure": letter.first_failure,
                "dead_lettered_at": letter.dead_lettered_at,
                "headers": letter.headers,
            },
            indent=2,
            default=str,
        )
    )
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


@click.command()
@click.option(
    "--consuming", is_flag=True, help="Print nothing; exit 0 if every stage's queue has a consumer, 1 if one has none."
)
def status(consuming: bool) -> None:
    """Broker nodes and queue leaders, queue depths, consumer processes and their span pipelines."""
    import pika

    from reportflow.shared.broker import connected_address
    from reportflow.shared.status import read_status_files
    from reportflow.shared.topology import Topology

    settings = Settings.load()
    topo = Topology.of(settings)
    if consuming:
        sys.exit(0 if _every_stage_consumed(settings, topo) else 1)
    leaders = _nodes_and_leaders(settings)
    connection = blocking_connection(settings.amqp_url)
    try:
        click.echo("connected to {}:{}".format(*connected_address(connection)))
        click.echo(f"{'queue':<40} {'ready':>8} {'consumers':>9}  leader")
        for queue in [*(topo.queue(s) for s in STAGE_NAMES), topo.dead_letter_queue]:
            channel = connection.channel()
            try:
                declared = channel.queue_declare(queue, passive=True).method
                click.echo(
                    f"{queue:<40} {declared.message_count:>8} {declared.consumer_count:>9}  {leaders.get(queue) or ''}"
                )
            except pika.exceptions.ChannelClosedByBroker:
                click.echo(f"{queue:<40} {'(not declared)':>18}")
    finally:
        if connection.is_open:
            connection.close()
    click.echo("")
    for line in _timer_lines(settings):
        click.echo(line)
    for process in read_status_files(settings.storage_dir):
        state = "stale" if process["stale"] else ("connected" if process["connected"] else "connecting")
        spans = process.get("spans") or {}
        click.echo(
            f"{process['stage']:<13} pid {process['pid']:<7} {state:<10} settled {process['messages_settled']:<7} "
            f"reconnects {process['connections_opened'] - 1:<3} spans: "
            + (", ".join(f"{k} {v}" for k, v in spans.items()) if spans else "tracing off")
        )


def _timer_lines(settings: Settings) -> list[str]:
    """Reminders and deadlines per stage: waiting, due and not yet fired (a stage that is down or behind),
    and given up (their reason is in the timers table's last_error)."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from reportflow.shared.db import make_engine
    from reportflow.shared.models import Timer, utcnow

    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            now, unfired = utcnow(), Timer.fired_at.is_(None)
            counts: dict[str, dict[str, int]] = {
                what: {
                    stage: number
                    for stage, number in session.execute(
                        select(Timer.stage, func.count()).where(*where).group_by(Timer.stage)
                    ).tuples()
                }
                for what, where in {
                    "waiting": (unfired, Timer.cancelled_at.is_(None), Timer.due_at > now),
                    "due": (unfired, Timer.cancelled_at.is_(None), Timer.due_at <= now),
                    "given up": (unfired, Timer.last_error.like("given up%")),
                }.items()
            }
    except Exception as exc:  # the database is the operator's to look at; the broker figures still stand
        return [f"timers: unknown ({type(exc).__name__})", ""]
    finally:
        engine.dispose()
    stages = sorted({stage for by_stage in counts.values() for stage in by_stage})
    lines = [
        f"timers of {stage:<13} " + "  ".join(f"{what} {by_stage.get(stage, 0)}" for what, by_stage in counts.items())
        for stage in stages
    ]
    return [*lines, ""] if lines else []


def _every_stage_consumed(settings: Settings, topo) -> bool:
    import pika

    try:
        connection = blocking_connection(settings.amqp_url)
    except pika.exceptions.AMQPError:
        return False
    try:
        for stage in STAGE_NAMES:
            try:
                if connection.channel().queue_declare(topo.queue(stage), passive=True).method.consumer_count == 0:
                    return False
            except pika.exceptions.ChannelClosedByBroker:
                return False
        return True
    finally:
        if connection.is_open:
            connection.close()


def _nodes_and_leaders(settings: Settings) -> dict[str, str | None]:
    """Print the cluster's nodes; return which node leads each queue. Needs the management API."""
    from reportflow.shared.broker import broker_vhost
    from reportflow.shared.broker_api import BrokerApi

    if not settings.broker_api_url:
        click.echo("broker nodes: set REPORTFLOW_BROKER_API_URL (the management API) to see them")
        return {}
    api = BrokerApi(settings.broker_api_url)
    try:
        nodes = api.nodes()
        leaders = api.queue_leaders(broker_vhost(settings.amqp_url))
    except OSError as exc:
        click.echo(f"broker nodes: the management API did not answer ({exc})")
        return {}
    click.echo("broker nodes: " + ", ".join(f"{n['name']} ({'running' if n['running'] else 'down'})" for n in nodes))
    return leaders


commands = [consume, topology, dlq, status]
