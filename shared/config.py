"""Settings from the environment, read once at start-up."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


@dataclass(frozen=True)
class Settings:
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    exchange: str = "reportflow"
    database_url: str = "sqlite:///var/reportflow.db"
    storage_dir: Path = Path("var/storage")
    smtp_url: str = ""
    mail_from: str = "reportflow <reportflow@localhost>"
    prefetch: int = 4
    heartbeat_seconds: int = 30
    max_message_bytes: int = 1_048_576
    # Well under RabbitMQ's 30-minute consumer timeout, past which the broker closes the channel.
    render_time_limit_seconds: int = 300
    outbox_relay_seconds: int = 10
    environment: str = "development"

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        return cls(
            amqp_url=env("REPORTFLOW_AMQP_URL") or cls.amqp_url,
            exchange=env("REPORTFLOW_EXCHANGE") or cls.exchange,
            database_url=env("REPORTFLOW_DATABASE_URL") or cls.database_url,
            storage_dir=Path(env("REPORTFLOW_STORAGE_DIR") or cls.storage_dir),
            smtp_url=env("REPORTFLOW_SMTP_URL", ""),
            mail_from=env("REPORTFLOW_MAIL_FROM") or cls.mail_from,
            prefetch=_int("REPORTFLOW_PREFETCH", cls.prefetch),
            heartbeat_seconds=_int("REPORTFLOW_HEARTBEAT_SECONDS", cls.heartbeat_seconds),
            max_message_bytes=_int("REPORTFLOW_MAX_MESSAGE_BYTES", cls.max_message_bytes),
            render_time_limit_seconds=_int("REPORTFLOW_RENDER_TIME_LIMIT_SECONDS", cls.render_time_limit_seconds),
            outbox_relay_seconds=_int("REPORTFLOW_OUTBOX_RELAY_SECONDS", cls.outbox_relay_seconds),
            environment=env("REPORTFLOW_ENV") or cls.environment,
        )

    def masked(self) -> dict[str, str]:
        """The settings as text, with passwords in URLs replaced, fit for logs."""
        shown = {}
        for name in ("amqp_url", "exchange", "database_url", "storage_dir", "smtp_url", "mail_from",
                     "prefetch", "heartbeat_seconds", "max_message_bytes", "render_time_limit_seconds", "outbox_relay_seconds", "environment"):
            value = str(getattr(self, name))
            shown[name] = mask_url(value) if "://" in value else value
        return shown


def mask_url(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
