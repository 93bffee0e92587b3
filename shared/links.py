"""Personal approval links: signed (HMAC), bound to one report, stage and approver, expiring, and
usable once. notification puts them in approval emails; the gateway checks them."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

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


class ApprovalLinks:
    def __init__(self, secret: str, base_url: str, max_age_seconds: int):
        self._serializer = URLSafeTimedSerializer(secret, salt="reportflow.approval-link")
        self._csrf = URLSafeTimedSerializer(secret, salt="reportflow.approval-form")
        self.base_url = base_url.rstrip("/")
        self.max_age_seconds = max_age_seconds

    def url(self, report_id: str, stage: str, approver: str) -> str:
        token = self._serializer.dumps({"r": report_id, "s": stage, "a": approver, "n": uuid.uuid4().hex})
        return f"{self.base_url}/approve/{token}"

    def claim(self, token: str) -> ApprovalClaim:
        try:
            data = self._serializer.loads(token, max_age=self.max_age_seconds)
        except SignatureExpired:
            raise LinkRefused("This approval link has expired. Ask for a new one.") from None
        except BadSignature:
            raise LinkRefused("This approval link is not valid.") from None
        return ApprovalClaim(data["r"], data["s"], data["a"], data["n"])

    def form_token(self, token: str) -> str:
        """The anti-forgery token of the page a link opens: only a page this gateway served has it."""
        return self._csrf.dumps(token)

    def check_form_token(self, token: str, form_token: str | None) -> bool:
        try:
            return self._csrf.loads(form_token or "", max_age=self.max_age_seconds) == token
        except BadSignature:
            return False
