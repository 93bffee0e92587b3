"""Database engine and the unit of work a handler runs in."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

import schemas
from shared.events import Event
from shared.models import InboxRecord, OutboxMessage, Report


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg")
    # No pre-ping: it costs a round trip per transaction. A connection that died with the server fails its
    # statement, SQLAlchemy discards the pool, and the runtime retries the message.
    return create_engine(url, pool_size=10, max_overflow=10, pool_recycle=1800)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Four processes share one file by default: WAL lets readers and the writer overlap.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class UnitOfWork:
    """One handler's transaction: its state changes, the events it emits (outbox) and its inbox record.

    Handlers call emit(); nothing is published until the runtime has committed."""

    def __init__(self, session_factory: sessionmaker, consumer: str = "handler"):
        self._session_factory = session_factory
        self.consumer = consumer
        self.session: Session | None = None
        self.emitted: list[Event] = []
        self.refusal: str | None = None

    def __enter__(self) -> "UnitOfWork":
        self.session = self._session_factory()
        self.emitted = []
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

    def checkpoint(self) -> None:
        """Commit what the handler has done so far. Only for effects that cannot join the transaction
        (an email): record the intent, commit, act, record the result, commit."""
        self.session.commit()

    def refused(self, reason: str) -> None:
        """Say that the message was refused, so the runtime can show it on the trace."""
        self.refusal = reason

    # -- what the runtime uses ---------------------------------------------
    def already_processed(self, message_id: str) -> bool:
        return self.session.get(InboxRecord, (self.consumer, message_id)) is not None

    def commit(self, event_type: str, message_id: str, trace_headers: dict) -> list[OutboxMessage]:
        """Commit state, inbox record and outbox together; return the outbox rows to publish."""
        self.session.add(InboxRecord(consumer=self.consumer, message_id=message_id, event_type=event_type))
        rows = [OutboxMessage(message_id=e.message_id, event_type=e.type, payload=e.payload,
                              headers=dict(trace_headers), source=self.consumer) for e in self.emitted]
        self.session.add_all(rows)
        self.session.commit()
        return rows
