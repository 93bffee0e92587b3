"""The same four-hop chain in Celery, for comparison: one worker per stage (its own queue), Celery's
defaults plus acks_late. The last task sends the report id to a sink queue the harness reads.

Two variants, chosen by the environment of the workers:
- BENCH_CELERY_DURABLE=1: each task does the durable work a Celery user must write to get reportflow's
  guarantees: in one PostgreSQL transaction an idempotency row keyed by the task id (a redelivered task
  does nothing twice) and an outbox row for the next task, commit; then the next task is sent with a
  publisher confirm and the outbox row is marked sent.
- BENCH_CELERY_TRACED=1: opentelemetry-instrumentation-celery in every worker process, exporting over
  OTLP like reportflow's processes.

    celery -A bench.celery_chain worker -Q bench.stage1   (broker: BENCH_CELERY_BROKER)"""

from __future__ import annotations

import json
import os

from celery import Celery, signals

DURABLE = os.environ.get("BENCH_CELERY_DURABLE") == "1"
TRACED = os.environ.get("BENCH_CELERY_TRACED") == "1"
DATABASE = os.environ.get("BENCH_CELERY_DATABASE", "postgresql://postgres@127.0.0.1:5432/reportflow_test")

app = Celery("bench", broker=os.environ.get("BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672/reportflow-test"))
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # What reportflow does on every publish: wait for nothing it could lose.
    broker_transport_options={"confirm_publish": True} if DURABLE else {},
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_celery_inbox (task_id text PRIMARY KEY, task text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS bench_celery_outbox (id bigserial PRIMARY KEY, task text NOT NULL, payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(), sent_at timestamptz);
"""
_connection = None


@signals.worker_process_init.connect
def _in_each_worker_process(**_) -> None:
    global _connection
    if DURABLE:
        import psycopg

        _connection = psycopg.connect(DATABASE)
    if TRACED:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource({"service.name": "bench-celery"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=100))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument()


def create_tables() -> None:
    import psycopg

    with psycopg.connect(DATABASE) as connection:
        connection.execute("DROP TABLE IF EXISTS bench_celery_inbox, bench_celery_outbox")
        connection.execute(SCHEMA)


def _hand_on(task_id: str, stage: str, send) -> None:
    """Durable: claim the task id and write the outbox row in one transaction, then send and mark it."""
    if not DURABLE:
        send()
        return
    assert _connection is not None
    with _connection.transaction():
        claimed = _connection.execute(
            "INSERT INTO bench_celery_inbox (task_id, task) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING task_id",
            (task_id, stage),
        ).fetchone()
        if claimed is None:
            return  # a redelivery: its effects are committed already
        (outbox_id,) = _connection.execute(
            "INSERT INTO bench_celery_outbox (task, payload) VALUES (%s, %s) RETURNING id",
            (stage, json.dumps({"task_id": task_id})),
        ).fetchone()
    send()
    with _connection.transaction():
        _connection.execute("UPDATE bench_celery_outbox SET sent_at = now() WHERE id = %s", (outbox_id,))


@app.task(name="bench.stage1", bind=True)
def stage1(self, report_id: str) -> None:
    _hand_on(self.request.id, "stage1", lambda: stage2.apply_async((report_id,), queue="bench.stage2"))


@app.task(name="bench.stage2", bind=True)
def stage2(self, report_id: str) -> None:
    _hand_on(self.request.id, "stage2", lambda: stage3.apply_async((report_id,), queue="bench.stage3"))


@app.task(name="bench.stage3", bind=True)
def stage3(self, report_id: str) -> None:
    _hand_on(self.request.id, "stage3", lambda: stage4.apply_async((report_id,), queue="bench.stage4"))


@app.task(name="bench.stage4", bind=True)
def stage4(self, report_id: str) -> None:
    _hand_on(self.request.id, "stage4", lambda: done.apply_async((report_id,), queue="bench.sink"))


@app.task(name="bench.done")
def done(report_id: str) -> None:  # never run: the harness reads bench.sink itself
    pass
