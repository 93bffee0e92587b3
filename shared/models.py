"""The tables: reports, their revisions' stages, decisions, refusals, documents and approval steps;
notifications; the runtime's inbox, outbox and timers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class UtcDateTime(TypeDecorator):
    """A moment in UTC that reads back aware on every database: SQLite hands back naive datetimes, and
    handlers compare these with now (deadlines, timers)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Report(Base):
    __tablename__ = "reports"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    template: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), index=True)
    submitter: Mapped[dict] = mapped_column(JSON)
    client: Mapped[dict] = mapped_column(JSON)
    data: Mapped[dict] = mapped_column(JSON)
    # 1, then one more each time the submitter resubmits it after a rejection; earlier revisions' stages,
    # decisions and documents are kept.
    revision: Mapped[int] = mapped_column(Integer, default=1)
    # W3C carrier (traceparent/tracestate) of the span that created the report: later messages that
    # arrive in other traces are processed in this one, so one trace holds the whole approval chain.
    trace_context: Mapped[dict] = mapped_column(JSON, default=dict)
    request_message_id: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    all_stages: Mapped[list[ApprovalStage]] = relationship(
        back_populates="report",
        order_by="(ApprovalStage.revision, ApprovalStage.position)",
        cascade="all, delete-orphan",
    )
    documents: Mapped[list[Document]] = relationship(
        back_populates="report", order_by="(Document.revision, Document.id)", cascade="all, delete-orphan"
    )

    @property
    def stages(self) -> list[ApprovalStage]:
        """The stages of the current revision: the ones approval walks."""
        return [s for s in self.all_stages if s.revision == self.revision]

    @property
    def trace_id(self) -> str | None:
        traceparent = (self.trace_context or {}).get("traceparent", "")
        parts = traceparent.split("-")
        return parts[1] if len(parts) == 4 else None

    def document(self, kind: str) -> Document | None:
        """The current revision's draft or final document."""
        return next((d for d in self.documents if d.kind == kind and d.revision == self.revision), None)

    def stage_named(self, name: str) -> ApprovalStage | None:
        return next((s for s in self.stages if s.name == name), None)

    def stage_open_to(self, stage_name: str, approver: str) -> tuple[ApprovalStage | None, NotDecidable | None]:
        """The stage this approver may decide now, or why they may not: the one rule for who decides."""
        if self.status == "rejected":
            return None, NotDecidable("closed", "the report was already rejected")
        if self.status == "withdrawn":
            return None, NotDecidable("closed", "the report was withdrawn by its submitter")
        if self.status in ("approved", "finalized"):
            return None, NotDecidable("closed", "the report's approval is complete")
        stage = self.stage_named(stage_name)
        if stage is None:
            return None, NotDecidable("unknown", f"the report has no stage named {stage_name!r}")
        if stage.status == "pending":
            return None, NotDecidable("closed", f"stage {stage_name!r} is not open yet")
        if stage.status != "open":
            return None, NotDecidable("closed", f"stage {stage_name!r} is closed")
        if approver in stage.delegations.values():
            delegate = next(d for d, delegator in stage.delegations.items() if delegator == approver)
            return None, NotDecidable(
                "delegated", f"{approver} delegated their decision on stage {stage_name!r} to {delegate}"
            )
        if approver not in stage.approvers:
            return None, NotDecidable("not_approver", f"{approver} is not an approver of stage {stage_name!r}")
        if stage.decision_of(approver) is not None:
            return None, NotDecidable("already_decided", f"{approver} has already decided stage {stage_name!r}")
        return stage, None

    def submitters_refusal(self, submitter_id: str, action: str) -> str | None:
        """Why this submitter may not withdraw or resubmit the report now, or None: the one rule for both."""
        if submitter_id != self.submitter.get("id"):
            return "only the report's submitter may do this"
        if action == "withdraw" and self.status == "withdrawn":
            return "the report was already withdrawn"
        if action == "withdraw" and self.status in ("approved", "finalized"):
            return "the report's approval is complete"
        if action == "resubmit" and self.status != "rejected":
            return f"only a rejected report can be resubmitted; this one is {self.status}"
        return None


@dataclass(frozen=True)
class NotDecidable:
    """Why an approver cannot decide a stage now: kind is unknown, closed, not_approver, delegated or
    already_decided."""

    kind: str
    reason: str


class ApprovalStage(Base):
    __tablename__ = "approval_stages"
    __table_args__ = (
        UniqueConstraint("report_id", "revision", "position", name="uq_approval_stages_revision_position"),
        UniqueConstraint("report_id", "revision", "name", name="uq_approval_stages_revision_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    rule: Mapped[str] = mapped_column(String(8))
    # Who decides now: the request's approvers, with delegates in place of their delegators and, after an
    # escalation, the escalation approvers in place of those who had not decided.
    approvers: Mapped[list] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    opened_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The stage as the request (or the revision) defined it: approvers, rule, deadline, remind_every,
    # on_deadline, escalate_to. The columns around it are its state.
    definition: Mapped[dict] = mapped_column(JSON, default=dict)
    # When the deadline passes: set when the stage opens, and once more on escalation.
    deadline_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    escalated: Mapped[bool] = mapped_column(Boolean, default=False)
    # delegate -> the approver who handed them the decision
    delegations: Mapped[dict] = mapped_column(JSON, default=dict)

    report: Mapped[Report] = relationship(back_populates="all_stages")
    decisions: Mapped[list[Decision]] = relationship(
        back_populates="stage", order_by="Decision.id", cascade="all, delete-orphan"
    )

    def decision_of(self, approver: str) -> Decision | None:
        return next((d for d in self.decisions if d.approver_email == approver), None)

    @property
    def complete(self) -> bool:
        """Approved by its rule: any one approver, or all of them."""
        approved = {d.approver_email for d in self.decisions if d.decision == "approve"}
        return bool(approved) if self.rule == "any" else approved >= set(self.approvers)

    @property
    def undecided(self) -> list[str]:
        return [a for a in self.approvers if self.decision_of(a) is None]

    @property
    def timer_key(self) -> str:
        """What this stage's reminders and deadline are filed under, to cancel them together."""
        return f"{self.report_id}/{self.revision}/{self.name}"


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
    # The approver who delegated this decision to approver_email: "decided by X on behalf of Y".
    on_behalf_of: Mapped[str | None] = mapped_column(String(254))
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
    __table_args__ = (UniqueConstraint("report_id", "revision", "kind", name="uq_documents_revision_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
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


class ApprovalStep(Base):
    """A step in a report's approval that has no row of its own elsewhere: a reminder, an escalation, a
    delegation, a deadline's outcome, a withdrawal, a resubmission. `report history` reads these beside
    the stages, decisions, refusals, documents and emails."""

    __tablename__ = "approval_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    stage_name: Mapped[str | None] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(30))
    actor: Mapped[str | None] = mapped_column(String(254))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


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


class Timer(Base):
    """A message a stage sends itself later (a reminder, a deadline), written with the state change that
    set it. The stage's timer poller leases due rows, processes each like a delivery, then marks it fired;
    the stage's inbox, keyed by message_id, makes a timer fired twice (a lease that ran out) act once."""

    __tablename__ = "timers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(100), unique=True)
    stage: Mapped[str] = mapped_column(String(40))
    key: Mapped[str] = mapped_column(String(300), index=True)  # what cancels it with its siblings
    event_type: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict] = mapped_column(JSON)
    headers: Mapped[dict] = mapped_column(JSON, default=dict)  # trace context it fires in
    due_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    leased_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    fired_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


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
