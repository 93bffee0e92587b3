"""The Procfile's processes under test control, and an upstream that approves as soon as it is asked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pika

from reportflow.consumers import STAGE_NAMES
from reportflow.shared.broker import blocking_connection
from tests.helpers import ROOT, TEST_AMQP_URL, wait_until

STAGES = STAGE_NAMES


def procfile_commands() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {
        name.strip(): command.strip()
        for name, command in (line.split(":", 1) for line in lines if line.strip() and not line.startswith("#"))
    }


def pipeline_environment(folder: Path, exchange: str, database_url: str, **more: str) -> dict:
    """What every pipeline under test is given: the tests' vhost, the test's own exchange, database and
    folder; more: the test's own settings, as environment variables."""
    return {
        "REPORTFLOW_AMQP_URL": TEST_AMQP_URL,
        "REPORTFLOW_EXCHANGE": exchange,
        "REPORTFLOW_DATABASE_URL": database_url,
        "REPORTFLOW_STORAGE_DIR": str(folder / "storage"),
        **more,
    }


@contextmanager
def traced_pipeline(folder: Path, exchange: str, database_url: str, broker, smtp, otlp, **more: str):
    """The four processes of the Procfile, configured for a test's vhost, exchange, database, SMTP server and
    OTLP collector, consuming; closed afterwards."""
    pipeline = Pipeline(
        folder,
        pipeline_environment(
            folder,
            exchange,
            database_url,
            REPORTFLOW_SMTP_URL=smtp.url,
            REPORTFLOW_MAIL_FROM="reportflow <reportflow@example.com>",
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_BSP_SCHEDULE_DELAY="200",
            REPORTFLOW_ENV="test",
            **more,
        ),
    )
    try:
        pipeline.start()
        pipeline.wait_consuming(broker, exchange)
        yield pipeline
    finally:
        pipeline.close()


class Pipeline:
    """Runs each Procfile line as honcho does (through the shell); processes can be killed and restarted."""

    def __init__(self, folder: Path, env: dict, names: tuple[str, ...] = STAGES, per_process: dict | None = None):
        """per_process: name -> environment of that process only, over env."""
        self.folder = folder
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
        self.env.pop("OTEL_SERVICE_NAME", None)
        # "generation@2" is a second process of the generation line: competing consumers on one queue.
        procfile = procfile_commands()
        self.commands = {name: procfile[name.split("@")[0]] for name in names}
        self.processes: dict[str, subprocess.Popen] = {}
        self.kills: dict[str, int] = {name: 0 for name in self.commands}
        self.per_process = per_process or {}

    def start(self, name: str | None = None) -> None:
        for each in [name] if name else self.commands:
            log = open(self.folder / f"{each}.log", "ab")
            env = {**self.env, **self.per_process.get(each, {})}
            self.processes[each] = subprocess.Popen(
                ["/bin/sh", "-c", self.commands[each]], env=env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_consuming(self, broker, exchange: str, timeout: float = 60, stages=STAGES) -> None:
        def consuming():
            channel = broker.channel()  # a failed passive declare closes its channel: a new one per look
            try:
                return all(
                    channel.queue_declare(f"{exchange}.{stage}", passive=True).method.consumer_count for stage in stages
                )
            except pika.exceptions.ChannelClosedByBroker:
                return False
            finally:
                if channel.is_open:
                    channel.close()

        wait_until(lambda: consuming() or self.exited(), timeout, what=f"consumers on {', '.join(stages)}")
        if self.exited():
            raise AssertionError(f"{self.exited()} exited at start:\n{self.logs()}")

    def exited(self) -> list[str]:
        return [n for n, p in self.processes.items() if p.poll() is not None]

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(10)
        self.kills[name] += 1

    def stop(self) -> dict[str, int]:
        """SIGTERM, as honcho sends it: each process finishes, flushes its spans and exits."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        return {name: process.wait(timeout=30) for name, process in self.processes.items()}

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)

    def log(self, name: str) -> str:
        """One process's whole log."""
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.folder.glob("*.log"))


class AutoApprover(threading.Thread):
    """An upstream system that decides as soon as approval.requested arrives: every approver of an
    `all` stage, the first of an `any` stage. Its decision ids derive from the request's, so asking
    twice never decides twice; it reconnects when the broker goes away."""

    def __init__(
        self, exchange: str, reject: set[str] = frozenset(), amqp_url: str = TEST_AMQP_URL, queue_type: str = "classic"
    ):
        super().__init__(daemon=True)
        self.amqp_url = amqp_url
        # On a cluster its queue is replicated like reportflow's: a classic queue on a node that stops
        # loses what is routed to it meanwhile, and the approval it would have asked for never comes.
        self.queue_arguments = {"x-queue-type": queue_type}
        self.exchange = exchange
        self.queue = f"{exchange}.auto-approver"
        self.reject = reject
        self.decided: list[tuple[str, str, str]] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._serve()
            except (pika.exceptions.AMQPError, OSError):
                time.sleep(1)

    def _serve(self) -> None:
        connection = blocking_connection(self.amqp_url)  # the first node that answers
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            channel.queue_declare(self.queue, durable=True, arguments=self.queue_arguments)
            channel.queue_bind(self.queue, self.exchange, routing_key="approval.requested")
            channel.basic_consume(self.queue, self._on_request)
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=0.2)
        finally:
            if connection.is_open:
                connection.close()

    def _on_request(self, channel, method, properties, body) -> None:
        requested = json.loads(body)
        stage = requested["stage"]
        approvers = requested["approvers"] if stage["rule"] == "all" else requested["approvers"][:1]
        for approver in approvers:
            report_id = requested["report_id"]
            decision = "reject" if report_id in self.reject else "approve"
            decided = {
                "report_id": report_id,
                "stage": stage["name"],
                "approver": {"email": approver},
                "decision": decision,
            }
            message_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{properties.message_id}/{approver}"))
            channel.basic_publish(
                self.exchange,
                "approval.decided",
                json.dumps(decided).encode(),
                pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=2,
                    message_id=message_id,
                    type="approval.decided",
                    headers=properties.headers,
                ),
                mandatory=True,
            )
            self.decided.append((report_id, stage["name"], approver))
        channel.basic_ack(method.delivery_tag)

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)
