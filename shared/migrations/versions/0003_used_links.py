"""approval links work once

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "used_links",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("report_id", sa.String(length=100), nullable=False),
        sa.Column("stage_name", sa.String(length=100), nullable=False),
        sa.Column("approver_email", sa.String(length=254), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )


def downgrade() -> None:
    op.drop_table("used_links")
