"""Least-privilege broker users: one per stage, reading only its own queue and writing only to the exchange
and its own retry and dead-letter routes; one per kind of upstream, publishing only the event types it owns
(RabbitMQ's topic permissions check the routing key, which is the event type). Applied with rabbitmqctl,
so it runs where rabbitmqctl reaches a node of the broker (docs/security.md)."""

from __future__ import annotations

import re
import secrets
import subprocess
from dataclasses import dataclass

from reportflow.shared.topology import Topology

NOTHING = "^$"
DEFAULT_EXCHANGE = "amq.default"  # what permissions call the default exchange, that retries go through
# What each kind of upstream system publishes, and nothing else (the event contract, README).
SUBMITTER_EVENTS = ("report.requested", "report.withdrawn", "report.resubmitted")
APPROVER_EVENTS = ("approval.decided", "approval.delegated")


@dataclass(frozen=True)
class BrokerUser:
    name: str
    configure: str  # regular expressions over resource names, as RabbitMQ takes them
    write: str
    read: str
    topic_write: str = ""  # routing keys it may publish to the exchange; "" sets no topic permission


def exactly(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def least_privilege_users(topology: Topology, stages: list[str], prefix: str = "reportflow-") -> list[BrokerUser]:
    exchange, dead_letters = topology.exchange, topology.dead_letter_exchange  # the queue has the same name
    users = []
    for stage in stages:
        queue, retries = topology.queue(stage), [topology.retry_queue(stage, d) for d in topology.retry_delays]
        users.append(
            BrokerUser(
                f"{prefix}{stage}",
                # Each process declares its part of the topology at start: the exchanges, its queues.
                configure=exactly(exchange, dead_letters, queue, *retries),
                # Publish emitted events, dead letters and retries (through the default exchange); bind its
                # queue to the exchange and the dead-letter queue to its exchange (binding writes the queue).
                write=exactly(exchange, dead_letters, DEFAULT_EXCHANGE, queue),
                # Consume its own queue; binding also reads the exchange bound from.
                read=exactly(queue, exchange, dead_letters),
            )
        )
    for kind, events in (("submitter", SUBMITTER_EVENTS), ("approvals", APPROVER_EVENTS)):
        users.append(BrokerUser(f"{prefix}{kind}", NOTHING, exactly(exchange), NOTHING, exactly(*events)))
    # The gateway publishes for people and systems of both kinds.
    users.append(
        BrokerUser(
            f"{prefix}gateway", NOTHING, exactly(exchange), NOTHING, exactly(*SUBMITTER_EVENTS, *APPROVER_EVENTS)
        )
    )
    return users


def apply_with_rabbitmqctl(
    users: list[BrokerUser], vhost: str, exchange: str, node: str | None = None
) -> dict[str, str]:
    """Create the users that do not exist (with a new password each, returned once) and set every user's
    permissions on the vhost. An existing user keeps its password."""

    def ctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        command = ["rabbitmqctl", "-q", *(["-n", node] if node else []), *args]
        return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60, check=False)

    listed = ctl("list_users")
    if listed.returncode != 0:
        raise RuntimeError(f"rabbitmqctl list_users failed: {listed.stderr.strip() or listed.stdout.strip()}")
    existing = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    passwords = {}
    for user in users:
        if user.name not in existing:
            password = secrets.token_urlsafe(24)
            _check(ctl("add_user", user.name, stdin=password), f"add_user {user.name}")  # stdin: not in ps
            passwords[user.name] = password
        _check(
            ctl("set_permissions", "-p", vhost, user.name, user.configure, user.write, user.read),
            f"set_permissions {user.name}",
        )
        if user.topic_write:
            _check(
                ctl("set_topic_permissions", "-p", vhost, user.name, exchange, user.topic_write, NOTHING),
                f"set_topic_permissions {user.name}",
            )
    return passwords


def _check(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {what} failed: {done.stderr.strip() or done.stdout.strip()}")
