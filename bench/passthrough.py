"""A pass-through stage on reportflow's runtime, for measuring what a hop costs: it consumes one event
type and emits the next, with the inbox, outbox, confirms and tracing of a real stage.

    python -m bench.passthrough STAGE_NAME CONSUMED_EVENT_TYPE"""

from __future__ import annotations

import itertools
import sys

from reportflow.consumers.bootstrap import session_factory
from reportflow.consumers.descriptions import describe
from reportflow.consumers.runtime import Consumer
from reportflow.consumers.stage import Stage
from reportflow.shared.config import Settings
from reportflow.shared.startup_heap import freeze_startup_objects
from reportflow.shared.tracing import setup_logging, setup_tracing
from tests.helpers import example_payloads

# A four-hop chain of real event types, so every payload is checked against its schema as in production.
CHAIN = ("report.created", "report.generated", "report.approved", "report.finalized", "report.invalid")
NEXT = {
    consumed: (emitted, lambda rid, emitted=emitted: example_payloads(rid)[emitted])
    for consumed, emitted in itertools.pairwise(CHAIN)
}


def first_event(report_id: str) -> dict:
    return example_payloads(report_id)[CHAIN[0]]


def pass_through(consumed: str):
    emitted, payload = NEXT[consumed]

    def handler(event, uow) -> None:
        uow.emit(emitted, payload(event.report_id))

    return handler


def main(stage_name: str, consumed: str) -> None:
    settings = Settings.load()
    setup_logging("WARNING")
    provider = setup_tracing(f"bench-{stage_name}", settings.tracing, "bench")
    consumer = Consumer(
        # As approval's and creation's, its handler waits only on the database.
        Stage(stage_name, {consumed: pass_through(consumed)}, describe=describe, waits_only_on_database=True),
        settings,
        session_factory(settings, provider),
        {},
        tracer_provider=provider,
        bindings={stage_name: [consumed]},
        concurrency=settings.worker_threads,
    )
    freeze_startup_objects()  # as bootstrap.run does
    try:
        consumer.run()
    finally:
        if provider is not None:
            provider.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
