"""Wires a stage to its dependencies and runs it: the entry point behind `reportflow consume STAGE`."""

from __future__ import annotations

import logging
import os

from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from sqlalchemy.orm import sessionmaker

from reportflow import consumers
from reportflow.consumers.runtime import Consumer
from reportflow.consumers.runtime.sessions import SampledSessions
from reportflow.shared.config import Settings
from reportflow.shared.db import make_engine
from reportflow.shared.documents import IsolatedRenderer
from reportflow.shared.health import serve_health
from reportflow.shared.mail import Postman, mailer_from_settings
from reportflow.shared.models import utcnow
from reportflow.shared.startup_heap import freeze_startup_objects
from reportflow.shared.status import StatusFile
from reportflow.shared.topology import TopologyMismatch
from reportflow.shared.tracing import log_span_stats_periodically, setup_logging, setup_tracing

log = logging.getLogger("reportflow.consumer")


def dependencies(stage, settings: Settings) -> dict:
    """Only what the stage's handlers ask for is built: the renderer loads fonts, the mailer reads SMTP settings."""
    factories = {
        "storage": settings.document_storage,
        "clock": lambda: utcnow,  # what now is, for handlers that set timers; tests give their own
        "renderer": lambda: IsolatedRenderer(
            settings.render_time_limit_seconds, recycle_above_mb=settings.render_recycle_mb
        ),
        "postman": lambda: Postman(
            mailer_from_settings(settings.smtp_url, settings.storage_dir), settings.mail_from, _approval_links(settings)
        ),
    }
    return {name: factories[name]() for name in stage.dependencies}


def _approval_links(settings: Settings):
    """Approval emails carry personal links when links can be signed: with a secret key, or in development."""
    if settings.secret_key or settings.development:
        return settings.approval_links()  # refuses a weak key outside development
    log.warning("no REPORTFLOW_SECRET_KEY: approval emails will not carry links to the gateway")
    return None


def without_checkout_spans() -> None:
    """The SQLAlchemy instrumentation wraps Engine.connect in a "connect" span, but that call is a checkout
    from the pool at the start of every transaction, not a connection: a span per message that says
    nothing. Statement spans stay."""
    from opentelemetry.instrumentation.utils import unwrap
    from sqlalchemy.engine import Engine

    if hasattr(Engine.connect, "__wrapped__"):
        unwrap(Engine, "connect")


def without_pool_metrics(engine, engine_tracer) -> None:
    """The instrumentation also counts pool checkouts and checkins, for an OpenTelemetry connections
    metric, on the pool the plain engine shares: two listeners on every transaction, sampled or not.
    reportflow's metrics are Prometheus' (on /metrics) and no OpenTelemetry meter is set up, so these
    would count for nobody."""
    from sqlalchemy import event

    for identifier, name in [("connect", "_pool_connect"), ("close", "_pool_close"), ("checkin", "_pool_checkin"),
                             ("checkout", "_pool_checkout")]:  # fmt: skip
        listener = getattr(engine_tracer, name, None)
        if listener is not None and event.contains(engine, identifier, listener):
            event.remove(engine, identifier, listener)


def session_factory(settings: Settings, tracer_provider=None) -> sessionmaker:
    engine = make_engine(settings.database_url, timeout_seconds=settings.database_timeout_seconds)
    # expire_on_commit=False: the runtime reads outbox rows after the commit that wrote them.
    if tracer_provider is None:
        return sessionmaker(engine, expire_on_commit=False)
    # Each SQL statement a handler runs becomes a span under the message's process span. The listeners
    # that make them sit on a view of the engine (same pool), taken only inside a sampled span: an
    # unsampled message's statements run with no instrumentation to ask.
    traced = engine.execution_options()
    without_pool_metrics(traced, SQLAlchemyInstrumentor().instrument(engine=traced, tracer_provider=tracer_provider))
    without_checkout_spans()
    return SampledSessions(engine, traced)


def build_consumer(stage_name: str, settings: Settings, tracer_provider=None) -> Consumer:
    stage = consumers.STAGES[stage_name]
    return Consumer(
        stage,
        settings,
        session_factory(settings, tracer_provider),
        dependencies(stage, settings),
        tracer_provider=tracer_provider,
        bindings=consumers.bindings(),
        concurrency=settings.worker_threads,
    )


def run(stage_name: str) -> None:
    settings = Settings.load()
    service = os.environ.get("OTEL_SERVICE_NAME") or f"reportflow-{stage_name}"
    setup_logging(settings.log_level, settings.log_format, service)
    provider = setup_tracing(f"reportflow-{stage_name}", settings.tracing, settings.environment)
    log.info("%s: starting with %s", stage_name, settings.masked())
    consumer = build_consumer(stage_name, settings, provider)
    log_span_stats_periodically(provider, settings.tracing.stats_interval_seconds)
    StatusFile(settings.storage_dir, stage_name, consumer.snapshot, provider).start()
    health = serve_health(settings, consumer.alive, consumer.not_ready, provider)
    freeze_startup_objects()
    try:
        consumer.run()
    except TopologyMismatch as mismatch:
        log.error("%s: %s", stage_name, mismatch)
        raise SystemExit(2) from None
    finally:
        if health is not None:
            health.stop()
        if provider is not None:
            provider.shutdown()  # flushes the spans still queued for export
