"""What the gateway answers when it will not do what was asked: a status, a reason, nothing published."""

from __future__ import annotations


class Refused(Exception):
    """A request answered with a page or a JSON error that says why, and nothing published."""

    def __init__(self, message: str, status: int, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
