"""Real services for the tests: RabbitMQ on its own vhost, SQLite and PostgreSQL on their own
databases, an SMTP server (aiosmtpd) and an OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import json
import os
import threading
import uuid
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika
import pytest
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from reportflow import consumers
from reportflow.shared.config import Settings, TracingSettings
from reportflow.shared.db import UnitOfWork, make_engine
from reportflow.shared.migrate import upgrade
from reportflow.shared.topology import Topology
from tests.helpers import (
    TEST_AMQP_URL,
    TEST_PG_URL,
    TEST_RETRY_TIERS,
    free_port,
    wait_until,
)


# -- tracing in the test process -------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def tracer_provider():
    """The SDK, as every reportflow process installs it; spans kept in memory for the tests to read."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    from reportflow.shared.tracing import setup_tracing

    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    provider = setup_tracing("reportflow-tests", TracingSettings())
    provider.memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(provider.memory))
    return provider


@pytest.fixture
def finished_spans(tracer_provider):
    tracer_provider.memory.clear()
    return tracer_provider.memory.get_finished_spans


# -- databases ----------------------------------------------------------------------
def _postgres_available() -> bool:
    try:
        engine = make_engine(TEST_PG_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


def _fresh_postgres(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """A migrated, empty database: a SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'reportflow.db'}"
    else:
        if not _postgres_available():
            if os.environ.get("CI"):
                pytest.fail(f"PostgreSQL is not reachable at {TEST_PG_URL}")
            pytest.skip("PostgreSQL is not reachable")
        url = TEST_PG_URL
        _fresh_postgres(url)
    upgrade(url)
    return url


@pytest.fixture
def postgres_url() -> str:
    """A migrated, empty PostgreSQL database, for what several processes write at once."""
    if not _postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {TEST_PG_URL}")
        pytest.skip("PostgreSQL is not reachable")
    _fresh_postgres(TEST_PG_URL)
    upgrade(TEST_PG_URL)
    return TEST_PG_URL


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'reportflow.db'}"
    upgrade(url)
    return url


@pytest.fixture
def session_factory(database_url):
    engine = make_engine(database_url)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


class Units:
    """Units of work on one database, as the runtime makes them: units() opens one; session_factory is
    what the runtime's processing is given."""

    def __init__(self, session_factory):
        self.session_factory = session_factory

    def __call__(self, consumer: str = "test") -> UnitOfWork:
        return UnitOfWork(self.session_factory, consumer)


@pytest.fixture
def uow(session_factory) -> Units:
    return Units(session_factory)


@pytest.fixture
def uow_on():
    """Units of work on a database the test names (for tests that prepare state in PostgreSQL)."""
    engines = []

    def make(url) -> Units:
        engines.append(make_engine(url))
        return Units(sessionmaker(engines[-1], expire_on_commit=False))

    yield make
    for engine in engines:
        engine.dispose()


# -- RabbitMQ -------------------------------------------------------------------------
@pytest.fixture
def exchange() -> str:
    """A fresh exchange name per test, so tests never see each other's queues."""
    return f"rft-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def broker(exchange):
    """A pika connection on the test vhost; deletes what the test declared under its exchange."""
    connection = pika.BlockingConnection(pika.URLParameters(TEST_AMQP_URL))
    yield connection
    try:
        channel = (
            connection.channel()
            if connection.is_open
            else pika.BlockingConnection(pika.URLParameters(TEST_AMQP_URL)).channel()
        )
        # Every tier the tests use (theirs and the default ones) of every stage, and the test's own queues.
        topology = Topology(exchange, retry_delays=tuple(sorted({*TEST_RETRY_TIERS, *Settings.retry_delays})))
        for queue in topology.all_queues(consumers.STAGE_NAMES):
            channel.queue_delete(queue)
        for queue in ("tap", "auto-approver"):
            channel.queue_delete(f"{exchange}.{queue}")
        channel.exchange_delete(topology.exchange)
        channel.exchange_delete(topology.dead_letter_exchange)
        connection.close()
    except pika.exceptions.AMQPError:
        pass


class Tap:
    """A queue bound to every event on the exchange: what reportflow published, in order."""

    def __init__(self, connection, exchange: str):
        self.channel = connection.channel()
        self.queue = f"{exchange}.tap"
        self.channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        self.channel.queue_declare(self.queue, durable=False, auto_delete=False)
        self.channel.queue_bind(self.queue, exchange, routing_key="#")
        self.seen: list[tuple[str, dict, pika.BasicProperties]] = []

    def drain(self) -> list[tuple[str, dict, pika.BasicProperties]]:
        while True:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.seen
            try:
                payload = json.loads(body)
            except ValueError:
                payload = body  # what a test published on purpose as garbage
            self.seen.append((method.routing_key, payload, properties))

    def wait_for(self, event_type: str, count: int = 1, timeout: float = 30.0):
        def found():
            matches = [e for e in self.drain() if e[0] == event_type]
            return matches if len(matches) >= count else None

        return wait_until(found, timeout, what=f"{count} x {event_type}")


@pytest.fixture
def tap(broker, exchange) -> Tap:
    return Tap(broker, exchange)


@pytest.fixture
def settings_for(tmp_path, exchange):
    def make(database_url: str, **overrides) -> Settings:
        values = dict(
            amqp_url=TEST_AMQP_URL,
            exchange=exchange,
            database_url=database_url,
            storage_dir=tmp_path / "storage",
            smtp_url="",
            heartbeat_seconds=10,
        )
        values.update(overrides)
        return Settings(**values)

    return make


# -- SMTP -----------------------------------------------------------------------------
class SmtpSink:
    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages = []
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                sink.messages.append(
                    {
                        "envelope_to": list(envelope.rcpt_tos),
                        "message": message_from_bytes(envelope.content, policy=policy.default),
                    }
                )
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()
        self.url = f"smtp://127.0.0.1:{self.port}"

    def to(self, address: str) -> list:
        return [m["message"] for m in self.messages if address in m["envelope_to"]]

    def stop(self):
        self.controller.stop()


@pytest.fixture
def smtp():
    sink = SmtpSink()
    yield sink
    sink.stop()


# -- OTLP/HTTP receiver -----------------------------------------------------------------
class OtlpReceiver:
    """Receives OTLP/HTTP protobuf exports and decodes them, as a collector would."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[dict] = []
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._collect(request)
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _collect(self, request) -> None:
        self.requests += 1
        for resource_spans in request.resource_spans:
            resource = {a.key: _any_value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "service": resource.get("service.name"),
                            "resource": resource,
                            "name": span.name,
                            "kind": span.kind,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex() or None,
                            "attributes": {a.key: _any_value(a.value) for a in span.attributes},
                            "links": [
                                {"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()} for link in span.links
                            ],
                            "status": span.status.code,
                            "events": [e.name for e in span.events],
                        }
                    )

    def stop(self):
        self.server.shutdown()


def _any_value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@pytest.fixture
def otlp():
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


# -- S3 -------------------------------------------------------------------------------------------------
class S3Server:
    """moto's standalone S3 server on loopback, as a process of its own: the real S3 API over HTTP."""

    def __init__(self, folder):
        import subprocess
        import sys
        import urllib.request
        from pathlib import Path

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "reportflow-test",
            "AWS_SECRET_ACCESS_KEY": "reportflow-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self._log = open(folder / "moto.log", "wb")
        self._process = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def answers():
            try:
                return urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).status == 200
            except OSError:
                return False

        wait_until(answers, 30, what="the S3 server")

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self):
        self._process.terminate()
        self._process.wait(10)
        self._log.close()


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """An S3 API on loopback, with the standard AWS variables set for this process and its children."""
    server = S3Server(tmp_path)
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    yield server
    server.stop()
