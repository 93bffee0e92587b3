"""The gateway's per-client API keys: created with a name and scopes, shown once, stored as a SHA-256,
revocable. submit: POST /reports; read: the reports this key submitted; read-all: every report."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from reportflow.shared.models import ApiKey, utcnow

SCOPES = ("submit", "read", "read-all")
PREFIX = "rfk_"  # recognisable in a leaked file or a secret scanner
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class Caller:
    """Who a request comes from, once its key is checked."""

    name: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope in self.scopes or (scope == "read" and "read-all" in self.scopes)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create(session: Session, name: str, scopes: list[str]) -> str:
    """A new key for NAME; the key itself is returned here and kept nowhere."""
    if not _NAME.fullmatch(name):
        raise ValueError("a key's name is 1-100 letters, digits, dots, dashes or underscores")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes are {', '.join(SCOPES)}; not {', '.join(unknown) or 'none'}")
    if session.get(ApiKey, name) is not None:
        raise ValueError(f"a key named {name!r} exists; revoke it first, or choose another name")
    key = PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(name=name, key_sha256=digest(key), scopes=sorted(set(scopes))))
    session.commit()
    return key


def revoke(session: Session, name: str) -> bool:
    found = session.get(ApiKey, name)
    if found is None or found.revoked_at is not None:
        return False
    found.revoked_at = utcnow()
    session.commit()
    return True


def listed(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.name)))


def caller_of(session: Session, presented: str) -> Caller | None:
    """The caller a presented key belongs to, or None for a key unknown or revoked. It is looked up by its
    digest, so no stored secret is ever compared byte by byte."""
    found = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == digest(presented)))
    if found is None or found.revoked_at is not None:
        return None
    return Caller(found.name, frozenset(found.scopes))
