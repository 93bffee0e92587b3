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
