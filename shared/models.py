"""The tables: reports and their stages, decisions, refusals, documents, notifications, inbox, outbox."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Report(Base):
    __tablename__ = "reports"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    template: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), index=True)
    submitter: Mapped[dict] = mapped_column(JSON)
    client: Mapped[dict] = mapped_column(JSON)
    data: Mapped[dict] = mapped_column(JSON)
    # W3C carrier (traceparent/tracestate) of the span that created the report: later messages that
    # arrive in other traces are processed in this one, so one trace holds the whole approval chain.
    trace_context: Mapped[dict] = mapped_column(JSON, default=dict)
    request_message_id: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    stages: Mapped[list[ApprovalStage]] = relationship(
        back_populates="report", order_by="ApprovalStage.position", cascade="all, delete-orphan"
    )
    documents: Mapped[list[Document]] = relationship(back_populates="report", cascade="all, delete-orphan")

    @property
    def trace_id(self) -> str | None:
        traceparent = (self.trace_context or {}).get("traceparent", "")
        parts = traceparent.split("-")
        return parts[1] if len(parts) == 4 else None

    def document(self, kind: str) -> Document | None:
        return next((d for d in self.documents if d.kind == kind), None)

    def stage_named(self, name: str) -> ApprovalStage | None:
        return next((s for s in self.stages if s.name == name), None)

    def stage_open_to(self, stage_name: str, approver: str) -> tuple[ApprovalStage | None, NotDecidable | None]:
        """The stage this approver may decide now, or why they may not: the one rule for who decides."""
        if self.status == "rejected":
            return None, NotDecidable("closed", "the report was already rejected")
        if self.status in ("approved", "finalized"):
            return None, NotDecidable("closed", "the report's approval is complete")
        stage = self.stage_named(stage_name)
        if stage is None:
            return None, NotDecidable("unknown", f"the report has no stage named {stage_name!r}")
        if stage.status == "pending":
            return None, NotDecidable("closed", f"stage {stage_name!r} is not open yet")
        if stage.status != "open":
            return None, NotDecidable("closed", f"stage {stage_name!r} is closed")
        if approver not in stage.approvers:
            return None, NotDecidable("not_approver", f"{approver} is not an approver of stage {stage_name!r}")
        if stage.decision_of(approver) is not None:
            return None, NotDecidable("already_decided", f"{approver} has already decided stage {stage_name!r}")
        return stage, None


@dataclass(frozen=True)
class NotDecidable:
    """Why an approver cannot decide a stage now: kind is unknown, closed, not_approver or already_decided."""

    kind: str
    reason: str


class ApprovalStage(Base):
    __tablename__ = "approval_stages"
    __table_args__ = (UniqueConstraint("report_id", "position"), UniqueConstraint("report_id", "name"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    rule: Mapped[str] = mapped_column(String(8))
    approvers: Mapped[list] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    opened_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    report: Mapped[Report] = relationship(back_populates="stages")
    decisions: Mapped[list[Decision]] = relationship(
        back_populates="stage", order_by="Decision.id", cascade="all, delete-orphan"
    )

    def decision_of(self, approver: str) -> Decision | None:
        return next((d for d in self.decisions if d.approver_email == approver), None)


class Decision(Base):
    __tablename__ = "decisions"
    __table_args__ = (UniqueConstraint("stage_id", "approver_email"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    stage_id: Mapped[int] = mapped_column(ForeignKey("approval_stages.id", ondelete="CASCADE"))
    approver_email: Mapped[str] = mapped_column(String(254))
    approver_id: Mapped[str | None] = mapped_column(String(128))
    decision: Mapped[str] = mapped_column(String(10))
    comment: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str] = mapped_column(String(100))
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    stage: Mapped[ApprovalStage] = relationship(back_populates="decisions")


class Refusal(Base):
    """A decision that was not applied, and why. Not tied to a report row: the report may not exist."""

    __tablename__ = "refusals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str | None] = mapped_column(String(100), index=True)
    stage_name: Mapped[str | None] = mapped_column(String(100))
    approver_email: Mapped[str | None] = mapped_column(String(254))
    decision: Mapped[str | None] = mapped_column(String(10))
    reason: Mapped[str] = mapped_column(Text)
    message_id: Mapped[str] = mapped_column(String(100))
    refused_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("report_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(10))  # draft | final
    storage_key: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    pages: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    report: Mapped[Report] = relationship(back_populates="documents")

    def as_event(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "storage_key": self.storage_key,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "pages": self.pages,
        }


class Notification(Base):
    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str | None] = mapped_column(String(100), index=True)
    event_type: Mapped[str] = mapped_column(String(40))
    event_message_id: Mapped[str] = mapped_column(String(100))
    recipients: Mapped[list] = mapped_column(JSON)
    subject: Mapped[str] = mapped_column(String(300))
    email_message_id: Mapped[str] = mapped_column(String(200), unique=True)
    attachments: Mapped[list] = mapped_column(JSON, default=list)
    transport: Mapped[str] = mapped_column(String(10))  # smtp | file
    # pending: recorded, about to be handed to the mail server; sent: the server took it.
    status: Mapped[str] = mapped_column(String(10), default="pending")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class UsedLink(Base):
    """An approval link that was used: each works once."""

    __tablename__ = "used_links"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    report_id: Mapped[str] = mapped_column(String(100))
    stage_name: Mapped[str] = mapped_column(String(100))
    approver_email: Mapped[str] = mapped_column(String(254))
    decision: Mapped[str] = mapped_column(String(10))
    used_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class InboxRecord(Base):
    """A message a consumer has processed: redeliveries and duplicates are acknowledged, not repeated."""

    __tablename__ = "inbox"

    consumer: Mapped[str] = mapped_column(String(40), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    event_type: Mapped[str] = mapped_column(String(40))
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OutboxMessage(Base):
    """An event a handler emitted, stored with its state change and published after the commit."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(100), unique=True)
    event_type: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict] = mapped_column(JSON)
    headers: Mapped[dict] = mapped_column(JSON, default=dict)  # trace context to publish under
    source: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)


class ApiKey(Base):
    """A gateway client's key: kept as its SHA-256 only (a key is 256 random bits, so a plain hash is the
    right tool), with what it may do (scopes) and whether it still works."""

    __tablename__ = "api_keys"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Submission(Base):
    """Which API key submitted a report through the gateway: a key with the read scope sees only these."""

    __tablename__ = "submissions"

    report_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    api_key: Mapped[str] = mapped_column(String(100), index=True)
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
