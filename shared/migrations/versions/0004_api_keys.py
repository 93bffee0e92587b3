"""per-client API keys for the gateway, and which key submitted which report

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
        sa.UniqueConstraint("key_sha256"),
    )
    op.create_table(
        "submissions",
        sa.Column("report_id", sa.String(length=100), nullable=False),
        sa.Column("api_key", sa.String(length=100), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("report_id"),
    )
    op.create_index("ix_submissions_api_key", "submissions", ["api_key"])


def downgrade() -> None:
    op.drop_index("ix_submissions_api_key", table_name="submissions")
    op.drop_table("submissions")
    op.drop_table("api_keys")
