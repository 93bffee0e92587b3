"""The same four-hop chain in Celery, for comparison: one worker per stage (its own queue), Celery's
defaults plus acks_late. The last task sends the report id to a sink queue the harness reads.

    celery -A bench.celery_chain worker -Q bench.stage1   (broker: BENCH_CELERY_BROKER)"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bench", broker=os.environ.get("BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672/reportflow-test"))
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.stage1")
def stage1(report_id: str) -> None:
    stage2.apply_async((report_id,), queue="bench.stage2")


@app.task(name="bench.stage2")
def stage2(report_id: str) -> None:
    stage3.apply_async((report_id,), queue="bench.stage3")


@app.task(name="bench.stage3")
def stage3(report_id: str) -> None:
    stage4.apply_async((report_id,), queue="bench.stage4")


@app.task(name="bench.stage4")
def stage4(report_id: str) -> None:
    done.apply_async((report_id,), queue="bench.sink")


@app.task(name="bench.done")
def done(report_id: str) -> None:  # never run: the harness reads bench.sink itself
    pass
