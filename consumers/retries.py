"""Retries: which failures deserve another try, and after how long.

A transient failure (the database or SMTP server away, a lost connection, a render over its time
limit) goes to a delay queue of its tier and comes back to the work queue when its TTL runs out;
one queue per tier, so a long delay never holds up a short one. A permanent failure (a bug, bad
data a handler could not refuse) and a transient one that has used its tiers go to the dead-letter
queue with the reason."""

from __future__ import annotations

import smtplib
from dataclasses import dataclass

from sqlalchemy import exc as sa

from reportflow.shared.config import Settings


class TransientError(Exception):
    """Raise it (or subclass it) for a failure that may go away by itself."""


TRANSIENT = (
    TransientError,
    sa.OperationalError,  # database unreachable, locked, restarting
    sa.InterfaceError,
    sa.DisconnectionError,
    sa.TimeoutError,  # connection pool exhausted
    # A unique constraint lost to another worker handling a copy of the same message (a redelivery and
    # a relayed duplicate at once): on the next attempt the inbox sees the copy that won, and acks.
    sa.IntegrityError,
)  # Lost connections, timeouts and SMTP answers are decided in is_transient, before this list.


# SQLSTATEs of a statement the server cancelled or refused whatever it was: its statement_timeout (57014),
# a server shutting down or not yet up (57P01-57P03).
_DATABASE_AWAY = frozenset({"57014", "57P01", "57P02", "57P03"})


def database_away(error: BaseException) -> bool:
    """Whether a failure is the database's rather than a message's: unreachable, the connection lost, a
    statement held past its timeout, the pool exhausted. Every message would meet it alike."""
    if isinstance(error, (sa.TimeoutError, sa.DisconnectionError, sa.InterfaceError)):
        return True
    if not isinstance(error, sa.DBAPIError):
        return False
    sqlstate = getattr(error.orig, "sqlstate", None)
    return (
        error.connection_invalidated
        or sqlstate in _DATABASE_AWAY
        or (isinstance(error, sa.OperationalError) and sqlstate is None)  # no answer to have a state
    )


@dataclass(frozen=True)
class RetryPolicy:
    delays: tuple[int, ...] = Settings.retry_delays

    @property
    def max_attempts(self) -> int:
        return len(self.delays) + 1

    def is_transient(self, error: BaseException) -> bool:
        if isinstance(error, smtplib.SMTPResponseException):
            return 400 <= error.smtp_code < 500  # 4xx: try later; 5xx: the server said no for good
        if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, PermissionError)):
            return True
        return isinstance(error, TRANSIENT)

    def delay_after(self, failures: int) -> int | None:
        """Seconds to wait after the n-th failure, or None when the message has used its tries."""
        return self.delays[failures - 1] if 1 <= failures <= len(self.delays) else None
