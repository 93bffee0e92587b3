"""notifications are recorded before they are sent

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notifications") as batch:
        # Rows from before this revision were recorded after sending: they are sent.
        batch.add_column(sa.Column("status", sa.String(length=10), nullable=False, server_default="sent"))
        batch.add_column(sa.Column("created_at", sa.DateTime(timezone=True), nullable=True))
        batch.alter_column("sent_at", existing_type=sa.DateTime(timezone=True), nullable=True)
    op.execute("UPDATE notifications SET created_at = sent_at")
    with op.batch_alter_table("notifications") as batch:
        batch.alter_column("created_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch.alter_column("status", existing_type=sa.String(length=10), server_default=None)


def downgrade() -> None:
    op.execute("DELETE FROM notifications WHERE sent_at IS NULL")
    with op.batch_alter_table("notifications") as batch:
        batch.alter_column("sent_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch.drop_column("created_at")
        batch.drop_column("status")
