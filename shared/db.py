"""Database engine and the unit of work a handler runs in."""

from __future__ import annotations

import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import cast

from psycopg.types.json import Json
from sqlalchemy import Table, bindparam, create_engine, delete, event, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from reportflow import schemas
from reportflow.shared.events import Event
from reportflow.shared.models import InboxRecord, OutboxMessage, Report, Timer, utcnow

# The runtime's bookkeeping on every message, built once on the tables (not the mapped classes): the ORM's
# insert path rebuilt and recompiled these per message, and that was a third of a hop's CPU.
_inbox, _outbox = cast(Table, InboxRecord.__table__), cast(Table, OutboxMessage.__table__)
# On PostgreSQL with psycopg, a message's inbox claim and its outbox rows go to the driver's cursor: through
# SQLAlchemy's execution (its events, instrumented or not, its compiled cache, its result) the two were a
# quarter of a hop's CPU. They write what SQLAlchemy would: JSON bound as psycopg's Json, as the dialect does.
_CLAIM_ON_PSYCOPG = (
    "INSERT INTO inbox (consumer, message_id, event_type, processed_at)"
    " VALUES (%(consumer)s, %(message_id)s, %(event_type)s, %(processed_at)s)"
    " ON CONFLICT DO NOTHING RETURNING message_id"
)
_ADD_TO_OUTBOX_ON_PSYCOPG = (
    "INSERT INTO outbox (message_id, event_type, payload, headers, source, created_at)"
    " VALUES (%(message_id)s, %(event_type)s, %(payload)s, %(headers)s, %(source)s, %(created_at)s) RETURNING id"
)
# A batch's the same way, its rows as arrays: one statement whatever the batch's size, which psycopg prepares
# once. Outbox ids come back with their message ids, which are unique, since RETURNING keeps no promise of
# order.
_CLAIM_ALL_ON_PSYCOPG = (
    "INSERT INTO inbox (consumer, message_id, event_type, processed_at)"
    " SELECT %(consumer)s, m, t, %(processed_at)s"
    " FROM unnest(%(message_ids)s::text[], %(event_types)s::text[]) AS u(m, t)"
    " ON CONFLICT DO NOTHING RETURNING message_id"
)
_ADD_ALL_TO_OUTBOX_ON_PSYCOPG = (
    "INSERT INTO outbox (message_id, event_type, payload, headers, source, created_at)"
    " SELECT m, t, p, h, %(source)s, c FROM unnest(%(message_ids)s::text[], %(event_types)s::text[],"
    " %(payloads)s::json[], %(headers)s::json[], %(created_at)s::timestamptz[]) AS u(m, t, p, h, c)"
    " RETURNING message_id, id"
)
# Elsewhere, or with their SQL traced (tracing.runtime_sql), through SQLAlchemy. It does not cache the
# PostgreSQL dialect's insert (it compiles it every time); SQL text it does.
_CLAIM_ON_POSTGRESQL = text(
    "INSERT INTO inbox (consumer, message_id, event_type, processed_at)"
    " VALUES (:consumer, :message_id, :event_type, :processed_at)"
    " ON CONFLICT DO NOTHING RETURNING message_id"
)
_RECORD_IN_INBOX = insert(_inbox)
_SEEN_IN_INBOX = select(_inbox.c.message_id).where(
    _inbox.c.consumer == bindparam("consumer"), _inbox.c.message_id == bindparam("message_id")
)
_ADD_TO_OUTBOX = insert(_outbox).returning(_outbox.c.id)
# A batch's claims, one statement for all (insertmanyvalues): the ids returned are those not seen before.
_CLAIM_ALL_ON_POSTGRESQL = postgresql_insert(_inbox).on_conflict_do_nothing().returning(_inbox.c.message_id)
_ADD_ALL_TO_OUTBOX = insert(_outbox).returning(_outbox.c.id, sort_by_parameter_order=True)


@dataclass
class Effects:
    """What one handler left to commit: the events it emitted, the timers it set, and whether it refused."""

    emitted: list[Event] = field(default_factory=list)
    scheduled: list[Timer] = field(default_factory=list)
    refusal: str | None = None


def make_engine(url: str, *, timeout_seconds: float = 0) -> Engine:
    """timeout_seconds (PostgreSQL): the longest a statement, a connection attempt or an unanswered packet
    may hold a caller before it fails as transient (postgresql_timeouts); 0, for migrations and tools: none."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    # No pre-ping: it costs a round trip per transaction. A connection that died with the server fails its
    # statement, SQLAlchemy discards the pool, and the runtime retries the message.
    timeouts = postgresql_timeouts(dict(parsed.query), timeout_seconds) if timeout_seconds else {}
    return create_engine(parsed, pool_size=10, max_overflow=10, pool_recycle=1800, connect_args=timeouts)


def postgresql_timeouts(query: dict, seconds: float) -> dict:
    """libpq's parameters for a database that stops answering, each where the URL does not set its own:
    the server cancels a statement (a lock wait) after `seconds`; the client gives up on a connection whose
    greeting does not come, on data the peer does not acknowledge (a host gone, a network dropping packets)
    and, by keepalives, on a connection the peer stopped acknowledging while it waited."""
    milliseconds = max(1, round(seconds * 1000))
    probe = max(1, round(seconds / 3))
    wanted = {
        "connect_timeout": str(max(2, round(seconds))),  # whole seconds, 2 at least (libpq)
        "tcp_user_timeout": str(milliseconds),
        "keepalives": "1",
        "keepalives_idle": str(probe),
        "keepalives_interval": str(probe),
        "keepalives_count": "3",
    }
    timeouts = {key: value for key, value in wanted.items() if key not in query}
    options = query.get("options", "")
    if "statement_timeout" not in options:
        timeouts["options"] = f"{options} -c statement_timeout={milliseconds}".strip()
    return timeouts


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Four processes share one file by default: WAL lets readers and the writer overlap.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class UnitOfWork:
    """One handler's transaction: its state changes, the events it emits (outbox), the timers it sets and
    its inbox record.

    Handlers call emit() and schedule(); nothing is published or set until the runtime has committed."""

    def __init__(self, session_factory: sessionmaker, consumer: str = "handler", *, bookkeeping_traced: bool = False):
        """bookkeeping_traced: the inbox and outbox statements go through SQLAlchemy, where its instrumentation
        sees them, even where the driver could take them directly."""
        self._session_factory = session_factory
        self.consumer = consumer
        self._bookkeeping_traced = bookkeeping_traced
        self._session: Session | None = None
        self.emitted: list[Event] = []
        self.scheduled: list[Timer] = []
        self.refusal: str | None = None
        self._inbox_pending: dict | None = None

    @property
    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("a unit of work has a session only inside its with block")
        return self._session

    def __enter__(self) -> UnitOfWork:
        self._session = self._session_factory()
        self.emitted = []
        self.scheduled = []
        self.refusal = None
        return self

    def __exit__(self, *exc_info) -> None:
        self.session.rollback()
        self.session.close()

    # -- what handlers use -------------------------------------------------
    def report(self, report_id: str | None, *, for_update: bool = False) -> Report | None:
        if not report_id:
            return None
        query = select(Report).where(Report.id == report_id)
        if for_update:
            query = query.with_for_update()
        return self.session.scalars(query).first()

    def add(self, obj) -> None:
        self.session.add(obj)

    def flush(self) -> None:
        """Assign database ids now, for events that name them."""
        self.session.flush()

    def emit(self, event_type: str, payload: dict) -> Event:
        problems = schemas.errors(event_type, payload)
        if problems:
            raise ValueError(f"{self.consumer} emitted an invalid {event_type}: {problems}")
        emitted = Event(event_type, payload)
        self.emitted.append(emitted)
        return emitted

    def schedule(self, event_type: str, payload: dict, due_at: datetime, key: str) -> Timer:
        """Have this stage handle event_type with payload at due_at, in the trace of the message in hand.
        key files the timer with others to cancel together (cancel_timers)."""
        timer = Timer(
            message_id=str(uuid.uuid4()),
            stage=self.consumer,
            key=key,
            event_type=event_type,
            payload=payload,
            due_at=due_at,
            attempts=0,
        )
        self.scheduled.append(timer)
        return timer

    def cancel_timers(self, key: str) -> None:
        """Cancel this stage's timers filed under key that have not fired, those set by this handler too."""
        self.scheduled = [t for t in self.scheduled if t.key != key]
        self.session.execute(
            update(Timer)
            .where(
                Timer.stage == self.consumer, Timer.key == key, Timer.fired_at.is_(None), Timer.cancelled_at.is_(None)
            )
            .values(cancelled_at=utcnow())
        )

    @contextmanager
    def commit_now(self):
        """Writes committed when the block ends, whatever becomes of the message: for effects that cannot
        join the handler's transaction (an email: record the intent, commit, act, record the result,
        commit). It never commits the message's inbox claim. On PostgreSQL it is a transaction of its
        own; on SQLite, the handler's session committing what it has so far."""
        if self._inbox_pending is not None or self.session.get_bind().dialect.name != "postgresql":
            # SQLite: the claim is written only at commit, and a second connection would break this
            # one's snapshot, so the session itself commits.
            yield self.session
            self.session.commit()
            return
        with self._session_factory() as session, session.begin():
            yield session

    def refused(self, reason: str) -> None:
        """Say that the message was refused, so the runtime can show it on the trace."""
        self.refusal = reason

    # -- what the runtime uses ---------------------------------------------
    # The inbox and outbox are the runtime's bookkeeping on every message, so they use SQL statements
    # directly: the ORM's unit of work is most of a pass-through hop's CPU otherwise.
    def claim(self, message_id: str, event_type: str) -> bool:
        """Record the message in this consumer's inbox; False when it was processed before.

        PostgreSQL: claimed first thing, so a copy of the message handled at the same moment waits on
        the row and then finds it. SQLite: checked now and written at commit, because a write this early
        would hold SQLite's single write lock through the whole handler (a PDF render, say)."""
        values = {
            "consumer": self.consumer,
            "message_id": message_id,
            "event_type": event_type,
            "processed_at": utcnow(),
        }
        dialect = self.session.get_bind().dialect
        if dialect.name == "postgresql":
            self._inbox_pending = None
            if self._to_driver(dialect):
                return self._driver_returning(_CLAIM_ON_PSYCOPG, values) is not None
            return self.session.execute(_CLAIM_ON_POSTGRESQL, values).first() is not None
        self._inbox_pending = values
        return self.session.execute(_SEEN_IN_INBOX, values).first() is None

    def commit(self, trace_headers: dict) -> list[tuple[int, Event]]:
        """Commit state, inbox record and outbox together; return the outbox rows (id, event) to publish."""
        if self._inbox_pending:
            self.session.execute(_RECORD_IN_INBOX, self._inbox_pending)
        published = []
        to_driver = bool(self.emitted) and self._to_driver(self.session.get_bind().dialect)
        for emitted in self.emitted:
            row = self._outbox_row(emitted, trace_headers)
            if to_driver:
                row["payload"], row["headers"] = Json(row["payload"]), Json(row["headers"])
                outbox_id = self._driver_returning(_ADD_TO_OUTBOX_ON_PSYCOPG, row)[0]
            else:
                outbox_id = self.session.execute(_ADD_TO_OUTBOX, row).scalar_one()
            published.append((outbox_id, emitted))
        self._set_timers(self.scheduled, trace_headers)
        self.session.commit()
        return published

    # -- what the runtime uses for a batch (PostgreSQL) ------------------------------------------
    def claim_all(self, messages: list[tuple[str, str]]) -> set[str]:
        """Claim (message_id, event_type) pairs in one statement; return the ids not processed before."""
        now = utcnow()
        if self._to_driver(self.session.get_bind().dialect):
            values = {
                "consumer": self.consumer,
                "processed_at": now,
                "message_ids": [m for m, _ in messages],
                "event_types": [t for _, t in messages],
            }
            return {row[0] for row in self._driver_returning(_CLAIM_ALL_ON_PSYCOPG, values, every_row=True)}
        rows = [{"consumer": self.consumer, "message_id": m, "event_type": t, "processed_at": now} for m, t in messages]
        return set(self.session.scalars(_CLAIM_ALL_ON_POSTGRESQL, rows))

    def unclaim(self, message_id: str) -> None:
        """Give back a claim whose handler was rolled back: the message is handled again, alone."""
        self.session.execute(
            delete(_inbox).where(_inbox.c.consumer == self.consumer, _inbox.c.message_id == message_id)
        )

    def take_effects(self) -> Effects:
        """What the last handler left, handed over and forgotten here, before the next handler runs."""
        effects = Effects(self.emitted, self.scheduled, self.refusal)
        self.emitted, self.scheduled, self.refusal = [], [], None
        return effects

    def commit_all(self, handled: list[tuple[Effects, dict]]) -> list[list[tuple[int, Event]]]:
        """Commit a batch: each handler's (effects, trace headers), the outbox rows in one statement; return
        each handler's outbox rows (id, event), in order."""
        rows = [self._outbox_row(e, headers) for effects, headers in handled for e in effects.emitted]
        ids = iter(self._add_all_to_outbox(rows) if rows else [])
        for effects, headers in handled:
            self._set_timers(effects.scheduled, headers)
        self.session.commit()
        return [[(next(ids), e) for e in effects.emitted] for effects, _ in handled]

    def _add_all_to_outbox(self, rows: list[dict]) -> list[int]:
        """The outbox ids of rows, in their order."""
        if not self._to_driver(self.session.get_bind().dialect):
            return list(self.session.scalars(_ADD_ALL_TO_OUTBOX, rows))
        values = {
            "source": self.consumer,
            "message_ids": [r["message_id"] for r in rows],
            "event_types": [r["event_type"] for r in rows],
            "payloads": [Json(r["payload"]) for r in rows],
            "headers": [Json(r["headers"]) for r in rows],
            "created_at": [r["created_at"] for r in rows],
        }
        ids = dict(self._driver_returning(_ADD_ALL_TO_OUTBOX_ON_PSYCOPG, values, every_row=True))
        return [ids[r["message_id"]] for r in rows]

    def bookkeeping_in_sqlalchemy(self) -> bool:
        """Whether the runtime's next step (the claim, or the commit with what is pending) runs statements
        through SQLAlchemy, where its instrumentation would see them; on the driver's cursor none does."""
        return bool(self._inbox_pending or self.scheduled) or not self._to_driver(self.session.get_bind().dialect)

    def _to_driver(self, dialect) -> bool:
        return dialect.driver == "psycopg" and not self._bookkeeping_traced

    def _driver_returning(self, statement: str, values: dict, every_row: bool = False):
        """Run statement on the session's own connection, in its transaction; its RETURNING row, or None
        (every_row: all its rows).
        A driver error is raised as SQLAlchemy raises it, so that retries judge it alike, and a lost
        connection is dropped from the pool as SQLAlchemy drops it."""
        connection = self.session.connection()
        driver_error = connection.dialect.loaded_dbapi.Error
        try:
            with closing(connection.connection.cursor()) as cursor:
                cursor.execute(statement, values)
                return cursor.fetchall() if every_row else cursor.fetchone()
        except driver_error as error:
            lost = connection.dialect.is_disconnect(error, connection.connection, None)
            if lost:
                connection.invalidate(error)
            raise DBAPIError.instance(statement, values, error, driver_error, connection_invalidated=lost) from error

    def _outbox_row(self, emitted: Event, trace_headers: dict) -> dict:
        return {
            "message_id": emitted.message_id,
            "event_type": emitted.type,
            "payload": emitted.payload,
            "headers": dict(trace_headers),
            "source": self.consumer,
            "created_at": utcnow(),
        }

    def _set_timers(self, timers: list[Timer], trace_headers: dict) -> None:
        for timer in timers:
            timer.headers = dict(trace_headers)  # it fires in this message's trace
            self.session.add(timer)
