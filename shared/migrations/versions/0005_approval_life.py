"""the approval's life: revisions, stage policies and state, delegations, approval steps, timers

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# SQLite keeps the first schema's unique constraints unnamed: batch mode names them by this convention to
# drop them. PostgreSQL named them itself (<table>_<columns>_key).
_SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_N_name)s"}


def _unique(table: str, *columns: str) -> str:
    if op.get_bind().dialect.name == "postgresql":
        return f"{table}_{'_'.join(columns)}_key"
    return f"uq_{table}_{'_'.join(columns)}"


def upgrade() -> None:
    op.add_column("reports", sa.Column("revision", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("approval_stages", naming_convention=_SQLITE_NAMES) as batch:
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("definition", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("escalated", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("delegations", sa.JSON(), nullable=True))
        batch.drop_constraint(_unique("approval_stages", "report_id", "name"), type_="unique")
        batch.drop_constraint(_unique("approval_stages", "report_id", "position"), type_="unique")
        batch.create_unique_constraint("uq_approval_stages_revision_position", ["report_id", "revision", "position"])
        batch.create_unique_constraint("uq_approval_stages_revision_name", ["report_id", "revision", "name"])
    stages = sa.table(
        "approval_stages",
        sa.column("id", sa.Integer),
        sa.column("name", sa.String),
        sa.column("rule", sa.String),
        sa.column("approvers", sa.JSON),
        sa.column("definition", sa.JSON),
        sa.column("delegations", sa.JSON),
    )
    connection = op.get_bind()
    for row in connection.execute(sa.select(stages.c.id, stages.c.name, stages.c.rule, stages.c.approvers)).all():
        definition = {"name": row.name, "rule": row.rule, "approvers": row.approvers}
        connection.execute(stages.update().where(stages.c.id == row.id).values(definition=definition, delegations={}))
    with op.batch_alter_table("approval_stages") as batch:
        batch.alter_column("definition", existing_type=sa.JSON(), nullable=False)
        batch.alter_column("delegations", existing_type=sa.JSON(), nullable=False)
    op.add_column("decisions", sa.Column("on_behalf_of", sa.String(length=254), nullable=True))
    with op.batch_alter_table("documents", naming_convention=_SQLITE_NAMES) as batch:
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="1"))
        batch.drop_constraint(_unique("documents", "report_id", "kind"), type_="unique")
        batch.create_unique_constraint("uq_documents_revision_kind", ["report_id", "revision", "kind"])
    op.create_table(
        "approval_steps",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("report_id", sa.String(length=64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("stage_name", sa.String(length=100), nullable=True),
        sa.Column("kind", sa.String(length=30), nullable=False),
        sa.Column("actor", sa.String(length=254), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_approval_steps_report_id", "approval_steps", ["report_id"])
    op.create_table(
        "timers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("message_id", sa.String(length=100), nullable=False),
        sa.Column("stage", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("event_type", sa.String(length=40), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("message_id"),
    )
    op.create_index("ix_timers_due_at", "timers", ["due_at"])
    op.create_index("ix_timers_key", "timers", ["key"])


def downgrade() -> None:
    op.drop_index("ix_timers_key", table_name="timers")
    op.drop_index("ix_timers_due_at", table_name="timers")
    op.drop_table("timers")
    op.drop_index("ix_approval_steps_report_id", table_name="approval_steps")
    op.drop_table("approval_steps")
    with op.batch_alter_table("documents", naming_convention=_SQLITE_NAMES) as batch:
        batch.drop_constraint("uq_documents_revision_kind", type_="unique")
        batch.create_unique_constraint(_unique("documents", "report_id", "kind"), ["report_id", "kind"])
        batch.drop_column("revision")
    op.drop_column("decisions", "on_behalf_of")
    with op.batch_alter_table("approval_stages", naming_convention=_SQLITE_NAMES) as batch:
        batch.drop_constraint("uq_approval_stages_revision_name", type_="unique")
        batch.drop_constraint("uq_approval_stages_revision_position", type_="unique")
        batch.create_unique_constraint(_unique("approval_stages", "report_id", "name"), ["report_id", "name"])
        batch.create_unique_constraint(_unique("approval_stages", "report_id", "position"), ["report_id", "position"])
        for column in ("delegations", "escalated", "deadline_at", "definition", "revision"):
            batch.drop_column(column)
    op.drop_column("reports", "revision")
