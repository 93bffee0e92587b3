"""Settings, read once at start-up: built-in defaults, then config/app.yaml, then
config/<environment>.yaml, then environment variables, each overriding the one before."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml

from reportflow import schemas

# Development is a choice made out loud (REPORTFLOW_ENV=development, as `make run` does): only there do the
# published development secrets work. With REPORTFLOW_ENV unset, a process runs as in production.
DEVELOPMENT = "development"
DEFAULT_ENVIRONMENT = "production"
MIN_SECRET_BYTES = 32
DEVELOPMENT_API_TOKEN = "dev-token"


class InsecureSettings(ValueError):
    """A secret that must not be used where this process runs."""


@dataclass(frozen=True)
class TracingSettings:
    enabled: bool = True
    sampling_ratio: float = 1.0
    exporter_endpoint: str = ""  # else OTEL_EXPORTER_OTLP_ENDPOINT, else no OTLP export
    exporter_protocol: str = ""  # else OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf
    # Spans are exported little and often. The SDK's default (every 5 s, 512 at a time) encodes a burst
    # of spans in one go, and every thread of the process waits behind it: p99 per hop went from 97 ms
    # to 7 ms with these values (docs/performance.md). OTEL_BSP_* still win when set.
    batch_max_export_size: int = 64
    batch_schedule_delay_ms: int = 100
    local_dir: str = ""  # with no collector, spans go here as OTLP JSON lines
    record_emails: bool = False  # email addresses are PII: off unless asked for
    runtime_sql: bool = False  # spans for the runtime's inbox and outbox statements (the handlers' are kept)
    late_messages: str = "continue"  # "continue" the report's trace, or "link": a new trace linking back
    stats_interval_seconds: int = 60


@dataclass(frozen=True)
class TrustSettings:
    # Per inbound event type, the broker users allowed to publish it, by the AMQP user_id the broker
    # checks: "approval.decided=approvals,gateway;report.requested=portal". Unlisted types: anyone.
    publishers: str = ""

    def trusted_publishers(self) -> dict[str, frozenset[str]]:
        trusted: dict[str, frozenset[str]] = {}
        for entry in (e.strip() for e in self.publishers.split(";")):
            if not entry:
                continue
            event_type, _, users = (part.strip() for part in entry.partition("="))
            names = frozenset(u.strip() for u in users.split(",") if u.strip())
            if event_type not in schemas.UPSTREAM_EVENT_TYPES or not names:
                raise ValueError(
                    f"trust.publishers: {entry!r} is not EVENT_TYPE=USER[,USER...] with an upstream event type "
                    f"({', '.join(schemas.UPSTREAM_EVENT_TYPES)})"
                )
            trusted[event_type] = trusted.get(event_type, frozenset()) | names
        return trusted


@dataclass(frozen=True)
class Settings:
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    exchange: str = "reportflow"
    database_url: str = "sqlite:///var/reportflow.db"
    # PostgreSQL: how long a statement, a connection attempt or an unanswered packet may hold a consumer or
    # the gateway before it fails as transient (a retry). Keep it under half heartbeat_seconds: a stage
    # handled on the I/O thread sends no heartbeats while it waits, up to twice a message (approval's
    # stored trace, then its claim), and the broker closes a connection silent for a heartbeat. 0: none.
    database_timeout_seconds: float = 10
    storage_dir: Path = Path("var/storage")  # this process's own files (status, .eml without SMTP)
    storage_url: str = ""  # where documents are kept: file:///path or s3://bucket/prefix; "": storage_dir
    smtp_url: str = ""
    mail_from: str = "reportflow <reportflow@localhost>"
    prefetch: int = 0  # 0: twice the worker threads, at least 4
    # Worker threads per process; 0: 4 on PostgreSQL, 1 on SQLite (one writer). A stage that batches and waits
    # only on the database runs 1 unless this is set (Stage.waits_only_on_database).
    concurrency: int = 0
    heartbeat_seconds: int = 30
    max_message_bytes: int = 1_048_576
    # Well under RabbitMQ's 30-minute consumer timeout, past which the broker closes the channel.
    render_time_limit_seconds: int = 300
    # The render process is replaced when a render leaves it larger than this (a 5,000-row report does).
    render_recycle_mb: int = 250
    outbox_relay_seconds: int = 10
    # Under a backlog, up to this many waiting deliveries share one transaction (PostgreSQL); 1: never.
    batch_size: int = 32
    # Timers (reminders, deadlines): how often a stage looks for due ones, and how long one it took may run
    # before another process of the stage takes it over (a process killed while firing it).
    timer_poll_seconds: float = 1.0
    timer_lease_seconds: int = 60
    # Seconds before each retry of a transient failure: one delay queue per tier, so a long one never holds
    # up a short one. Past the last, the message is dead-lettered.
    retry_delays: tuple[int, ...] = (1, 5, 30, 120)
    queue_type: str = "classic"  # or "quorum": replicated work queues, with a delivery limit
    delivery_limit: int = 20  # quorum queues: deliveries before the broker dead-letters a message
    environment: str = DEFAULT_ENVIRONMENT
    log_level: str = "INFO"
    log_format: str = "text"  # or "json", for log shippers
    jaeger_ui_url: str = "http://localhost:16686"
    jaeger_query_url: str = ""
    broker_api_url: str = ""  # the management API (http://user:pass@host:15672): nodes, queue leaders
    metrics_port: int = 0  # /livez, /readyz and /metrics of this process; 0: off
    metrics_bind: str = "0.0.0.0"  # where an orchestrator's probes and Prometheus reach it
    gateway_url: str = "http://127.0.0.1:8080"  # the public base URL used in emails
    gateway_bind: str = "127.0.0.1"
    gateway_port: int = 8080
    secret_key: str = ""  # signs approval links; required outside development
    api_token: str = ""  # Bearer token for POST /reports and the JSON endpoints
    link_max_age_seconds: int = 7 * 24 * 3600
    gateway_auth_failures: str = "10/minute"  # failed API authentications allowed per address (limits' syntax)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    trust: TrustSettings = field(default_factory=TrustSettings)

    @property
    def worker_threads(self) -> int:
        if self.concurrency:
            return self.concurrency
        return 1 if self.database_url.startswith("sqlite") else 4

    @property
    def effective_prefetch(self) -> int:
        return self.prefetch or max(4, 2 * self.worker_threads)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The effective settings of this process: the YAML files, then the environment."""
        if environ is None:
            environ = os.environ
        environment = environ.get("REPORTFLOW_ENV", "").strip() or DEFAULT_ENVIRONMENT
        folder = Path(environ.get("REPORTFLOW_CONFIG_DIR") or "config")
        values: dict = {}
        for name in ("app.yaml", f"{environment}.yaml"):
            values.update(_flatten(_read_yaml(folder / name)))
        for key, variables in ENVIRONMENT_VARIABLES.items():
            for variable in variables:
                if environ.get(variable, "").strip():
                    values[key] = environ[variable].strip()
                    break
        values["environment"] = environment
        return _build(cls(), values)

    def masked(self) -> dict[str, str]:
        """Every setting as text, secrets and passwords in URLs replaced: fit for logs and `config show`."""
        shown = {}
        for key, value in _flatten(_as_dict(self)).items():
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            shown[key] = ("***" if text else "") if key in SECRETS else (mask_url(text) if "://" in text else text)
        return shown

    def document_storage(self):
        """The documents' storage adapter: REPORTFLOW_STORAGE_URL, else the folder REPORTFLOW_STORAGE_DIR."""
        from reportflow.shared.storage import FolderStorage, storage_from_url

        return storage_from_url(self.storage_url) if self.storage_url else FolderStorage(self.storage_dir)

    @property
    def development(self) -> bool:
        return self.environment == DEVELOPMENT

    def approval_links(self):
        """The signer of approval links. Outside development it needs a strong REPORTFLOW_SECRET_KEY."""
        from reportflow.shared.links import DEVELOPMENT_SECRET, ApprovalLinks

        if self.development:
            return ApprovalLinks(self.secret_key or DEVELOPMENT_SECRET, self.gateway_url, self.link_max_age_seconds)
        if not self.secret_key:
            raise InsecureSettings("REPORTFLOW_SECRET_KEY is required outside development: it signs approval links")
        self._refuse_weak("REPORTFLOW_SECRET_KEY", self.secret_key, DEVELOPMENT_SECRET)
        return ApprovalLinks(self.secret_key, self.gateway_url, self.link_max_age_seconds)

    def checked_api_token(self) -> str:
        """The gateway's one shared token, for development only ("" for none): everywhere else each client
        has its own key (reportflow apikey create), so a shared token is refused there."""
        if self.api_token and not self.development:
            raise InsecureSettings(
                "REPORTFLOW_API_TOKEN works in development only; outside it each client has its own key: "
                "`reportflow apikey create NAME --scope submit --scope read`"
            )
        return self.api_token

    def _refuse_weak(self, name: str, value: str, development_value: str) -> None:
        if value == development_value:
            raise InsecureSettings(
                f"{name} is the published development value; it works only with "
                f"REPORTFLOW_ENV={DEVELOPMENT} (this process runs as {self.environment!r})"
            )
        if len(value.encode()) < MIN_SECRET_BYTES:
            raise InsecureSettings(
                f"{name} is shorter than {MIN_SECRET_BYTES} bytes; outside development use a "
                "random one, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )


# Setting -> environment variables that set it, first one present wins. YAML files use the same
# keys, nested at the dots (tracing.enabled is `tracing: {enabled: ...}`).
ENVIRONMENT_VARIABLES = {
    "amqp_url": ["REPORTFLOW_AMQP_URL"],
    "exchange": ["REPORTFLOW_EXCHANGE"],
    "database_url": ["REPORTFLOW_DATABASE_URL"],
    "database_timeout_seconds": ["REPORTFLOW_DATABASE_TIMEOUT_SECONDS"],
    "storage_dir": ["REPORTFLOW_STORAGE_DIR"],
    "storage_url": ["REPORTFLOW_STORAGE_URL"],
    "smtp_url": ["REPORTFLOW_SMTP_URL"],
    "mail_from": ["REPORTFLOW_MAIL_FROM"],
    "prefetch": ["REPORTFLOW_PREFETCH"],
    "concurrency": ["REPORTFLOW_CONCURRENCY"],
    "heartbeat_seconds": ["REPORTFLOW_HEARTBEAT_SECONDS"],
    "max_message_bytes": ["REPORTFLOW_MAX_MESSAGE_BYTES"],
    "render_time_limit_seconds": ["REPORTFLOW_RENDER_TIME_LIMIT_SECONDS"],
    "render_recycle_mb": ["REPORTFLOW_RENDER_RECYCLE_MB"],
    "outbox_relay_seconds": ["REPORTFLOW_OUTBOX_RELAY_SECONDS"],
    "batch_size": ["REPORTFLOW_BATCH_SIZE"],
    "timer_poll_seconds": ["REPORTFLOW_TIMER_POLL_SECONDS"],
    "timer_lease_seconds": ["REPORTFLOW_TIMER_LEASE_SECONDS"],
    "retry_delays": ["REPORTFLOW_RETRY_DELAYS"],
    "queue_type": ["REPORTFLOW_QUEUE_TYPE"],
    "delivery_limit": ["REPORTFLOW_DELIVERY_LIMIT"],
    "log_level": ["REPORTFLOW_LOG_LEVEL"],
    "log_format": ["REPORTFLOW_LOG_FORMAT"],
    "jaeger_ui_url": ["JAEGER_UI_URL"],
    "jaeger_query_url": ["JAEGER_QUERY_URL"],
    "broker_api_url": ["REPORTFLOW_BROKER_API_URL"],
    "metrics_port": ["REPORTFLOW_METRICS_PORT"],
    "metrics_bind": ["REPORTFLOW_METRICS_BIND"],
    "gateway_url": ["REPORTFLOW_GATEWAY_URL"],
    "gateway_bind": ["REPORTFLOW_GATEWAY_BIND"],
    "gateway_port": ["REPORTFLOW_GATEWAY_PORT"],
    "secret_key": ["REPORTFLOW_SECRET_KEY"],
    "api_token": ["REPORTFLOW_API_TOKEN"],
    "link_max_age_seconds": ["REPORTFLOW_LINK_MAX_AGE_SECONDS"],
    "gateway_auth_failures": ["REPORTFLOW_GATEWAY_AUTH_FAILURES"],
    "tracing.enabled": ["REPORTFLOW_TRACING_ENABLED", "TRACING_ENABLED"],
    "tracing.sampling_ratio": ["REPORTFLOW_TRACING_SAMPLING_RATIO"],
    "tracing.exporter_endpoint": ["REPORTFLOW_TRACING_EXPORTER_ENDPOINT"],
    "tracing.exporter_protocol": ["REPORTFLOW_TRACING_EXPORTER_PROTOCOL"],
    "tracing.batch_max_export_size": ["REPORTFLOW_TRACING_BATCH_MAX_EXPORT_SIZE"],
    "tracing.batch_schedule_delay_ms": ["REPORTFLOW_TRACING_BATCH_SCHEDULE_DELAY_MS"],
    "tracing.local_dir": ["REPORTFLOW_TRACE_DIR"],
    "tracing.record_emails": ["REPORTFLOW_TRACING_RECORD_EMAILS"],
    "tracing.late_messages": ["REPORTFLOW_TRACING_LATE_MESSAGES"],
    "tracing.runtime_sql": ["REPORTFLOW_TRACING_RUNTIME_SQL"],
    "tracing.stats_interval_seconds": ["REPORTFLOW_TRACING_STATS_SECONDS"],
    "trust.publishers": ["REPORTFLOW_TRUSTED_PUBLISHERS"],
}
# The groups of settings nested under a key (tracing.enabled is `tracing: {enabled: ...}` in YAML).
GROUPS = ("tracing", "trust")


SECRETS = {"secret_key", "api_token"}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    return loaded


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _as_dict(settings) -> dict:
    return {
        f.name: _as_dict(getattr(settings, f.name)) if f.name in GROUPS else getattr(settings, f.name)
        for f in fields(settings)
    }


def _build(defaults: Settings, values: dict) -> Settings:
    known = set(ENVIRONMENT_VARIABLES) | {"environment"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    top = {k: _coerce(getattr(defaults, k), v) for k, v in values.items() if "." not in k}
    for group in GROUPS:
        inside = getattr(defaults, group)
        nested = {
            k.split(".", 1)[1]: _coerce(getattr(inside, k.split(".", 1)[1]), v)
            for k, v in values.items()
            if k.startswith(f"{group}.")
        }
        top[group] = replace(inside, **nested)
    return replace(defaults, **top)


def _coerce(default, value):
    if isinstance(default, tuple):  # "1,5,30" from the environment, [1, 5, 30] from YAML
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
        return tuple(int(v) for v in items)
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, Path):
        return Path(value)
    return str(value)


# Query parameters that carry a credential in the URLs drivers accept (libpq's password, an SMTP token, ...).
_SECRET_QUERY_WORDS = ("pass", "pwd", "secret", "token", "key", "credential", "auth")


def mask_url(url: str) -> str:
    """The URL with its password and any credential-like query parameter replaced by ***."""
    parts = urlsplit(url)
    masked = parts
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        masked = masked._replace(netloc=netloc)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(_secret_word(key) for key, _ in query):
        masked = masked._replace(query=urlencode([(k, "***" if _secret_word(k) else v) for k, v in query], safe="*"))
    # Rebuilt only when something was masked: urlunsplit would turn sqlite:///x into sqlite:/x.
    return url if masked == parts else urlunsplit(masked)


def _secret_word(key: str) -> bool:
    return any(word in key.lower() for word in _SECRET_QUERY_WORDS)
