"""Personal approval links: bound to one report, stage and approver, expiring, and usable once.
notification puts them in approval emails; the gateway checks them.

A link's token is encrypted as well as authenticated (Fernet: AES-CBC with HMAC-SHA256 and a
timestamp), so a leaked URL says nothing about the report, the stage or the approver. The token is
a credential: the gateway keeps it out of its spans and logs (producers/gateway.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken

DEVELOPMENT_SECRET = "reportflow-development-only-secret"


class LinkRefused(Exception):
    """Why a link cannot be used, in words for the person who clicked it."""


@dataclass(frozen=True)
class ApprovalClaim:
    report_id: str
    stage: str
    approver: str
    nonce: str

    @property
    def decision_message_id(self) -> str:
        """One link, one decision message: publishing twice is absorbed by approval's inbox."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"reportflow-link:{self.nonce}"))


def _key(secret: str, purpose: str) -> bytes:
    """A key per purpose from the one secret: a token made for one use is worthless for another."""
    return hmac.new(secret.encode(), f"reportflow.{purpose}".encode(), hashlib.sha256).digest()


class ApprovalLinks:
    def __init__(self, secret: str, base_url: str, max_age_seconds: int):
        self._fernet = Fernet(base64.urlsafe_b64encode(_key(secret, "approval-link")))
        self._form_key = _key(secret, "approval-form")
        self.base_url = base_url.rstrip("/")
        self.max_age_seconds = max_age_seconds

    def url(self, report_id: str, stage: str, approver: str, *, issued_at: float | None = None) -> str:
        return f"{self.base_url}/approve/{self.token(report_id, stage, approver, issued_at=issued_at)}"

    def token(self, report_id: str, stage: str, approver: str, *, issued_at: float | None = None) -> str:
        claim = json.dumps(
            {"r": report_id, "s": stage, "a": approver, "n": uuid.uuid4().hex}, separators=(",", ":")
        ).encode()
        issued_at = int(time.time() if issued_at is None else issued_at)
        return self._fernet.encrypt_at_time(claim, issued_at).decode().rstrip("=")

    def claim(self, token: str) -> ApprovalClaim:
        padded = (token + "=" * (-len(token) % 4)).encode("ascii", errors="replace")
        try:
            issued_at = self._fernet.extract_timestamp(padded)
            data = json.loads(self._fernet.decrypt(padded))
        except (InvalidToken, ValueError):
            raise LinkRefused("This approval link is not valid.") from None
        if time.time() - issued_at > self.max_age_seconds:
            raise LinkRefused("This approval link has expired. Ask for a new one.")
        if not (isinstance(data, dict) and all(isinstance(data.get(k), str) and data[k] for k in "rsan")):
            raise LinkRefused("This approval link is not valid.")  # our key, but not a link we made
        return ApprovalClaim(data["r"], data["s"], data["a"], data["n"])

    def form_token(self, claim: ApprovalClaim) -> str:
        """The anti-forgery token of the page a link opens: only a page this gateway served has it. It is
        derived from the link's nonce, so it carries nothing of the link itself."""
        return hmac.new(self._form_key, claim.nonce.encode(), hashlib.sha256).hexdigest()

    def check_form_token(self, claim: ApprovalClaim, form_token: str | None) -> bool:
        return hmac.compare_digest(self.form_token(claim), form_token or "")
