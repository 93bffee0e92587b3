"""The sessions of a process that traces: which engine a statement goes through depends on whether the
span it runs in records."""

from __future__ import annotations

from opentelemetry import trace
from sqlalchemy.orm import Session, sessionmaker


class SampledSessions(sessionmaker):
    """Sessions for a traced process: on the instrumented view of the engine inside a recording span, on
    the plain engine otherwise, so that an unsampled message's statements meet no instrumentation at all
    (suppressed, each would still ask it). always_traced: for a batch, whose messages may be either."""

    def __init__(self, plain, traced):
        super().__init__(plain, expire_on_commit=False)
        self.always_traced = sessionmaker(traced, expire_on_commit=False)

    def __call__(self, **local_kw) -> Session:
        if "bind" not in local_kw and trace.get_current_span().is_recording():
            local_kw["bind"] = self.always_traced.kw["bind"]
        return super().__call__(**local_kw)
