"""Who is calling the gateway's API: a per-client key (reportflow apikey create), looked up by its digest,
or in development only the development token. Failed attempts are logged without the key, counted, and
limited per address (the limits library's moving window), so a key cannot be guessed by trying."""

from __future__ import annotations

import hmac
import logging
import time

from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import Counter
from sqlalchemy.orm import Session

from reportflow.producers.refused import Refused
from reportflow.shared import api_keys
from reportflow.shared.api_keys import Caller

log = logging.getLogger("reportflow.gateway")
AUTH_FAILURES = Counter(
    "reportflow_gateway_auth_failures",
    "Requests to the gateway's API refused for their key, by reason (missing, unknown, scope, rate_limited)",
    ["reason"],
)
DEVELOPMENT_CALLER = Caller("development", frozenset(api_keys.SCOPES))


class ApiAuthentication:
    def __init__(self, engine, development_token: str, failures_allowed: str):
        self._engine = engine
        self._development_token = development_token  # "" outside development (Settings refuses it there)
        self._limit = parse(failures_allowed)  # e.g. "10/minute": failed attempts per address
        self._failures = MovingWindowRateLimiter(MemoryStorage())

    def caller(self, authorization: str, address: str, scope: str) -> Caller:
        """The caller, if the Authorization header's key is good and may do scope; else Refused."""
        if not self._failures.test(self._limit, "failed-auth", address):
            AUTH_FAILURES.labels("rate_limited").inc()
            reset_at, _ = self._failures.get_window_stats(self._limit, "failed-auth", address)
            retry_after = max(1, int(reset_at - time.time()))
            raise Refused(
                "too many failed attempts from this address; try again later", 429, {"Retry-After": str(retry_after)}
            )
        scheme, _, given = authorization.partition(" ")
        given = given.strip()
        found = None
        if scheme.lower() == "bearer" and given:
            found = self._known(given)
        if found is None:
            self._failures.hit(self._limit, "failed-auth", address)
            reason = "unknown" if given else "missing"
            AUTH_FAILURES.labels(reason).inc()
            log.warning("refused an API request from %s: %s key", address, "an unknown or revoked" if given else "no")
            raise Refused(
                "a valid API key is required: Authorization: Bearer KEY",
                401,
                {"WWW-Authenticate": 'Bearer realm="reportflow"'},
            )
        if not found.may(scope):
            AUTH_FAILURES.labels("scope").inc()
            log.warning("refused an API request from %s: key %r has no %s scope", address, found.name, scope)
            raise Refused(f"this key may not {scope}", 403)
        return found

    def _known(self, presented: str) -> Caller | None:
        if self._development_token and hmac.compare_digest(presented.encode(), self._development_token.encode()):
            return DEVELOPMENT_CALLER
        with Session(self._engine) as session:
            return api_keys.caller_of(session, presented)
