"""Call attempts of real providers; a reminder's outcome, answer time and bound call.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.db.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_REMINDER_COLUMNS = ("outcome", "answered_at", "bound_attempt_id", "bound_call_id")


def upgrade() -> None:
    with op.batch_alter_table("reminders") as batch:
        batch.add_column(sa.Column("outcome", sa.String(16), nullable=True))
        batch.add_column(sa.Column("answered_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("bound_attempt_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("bound_call_id", sa.String(128), nullable=True))
    op.create_table(
        "call_attempts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "reminder_id", sa.String(36), sa.ForeignKey("reminders.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("fencing_token", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("provider_call_id", sa.String(128), nullable=True),
        sa.Column("call_status", sa.String(32), nullable=True),
        sa.Column("last_sequence", sa.BigInteger(), nullable=True),
        sa.Column("last_event_at", UTCDateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_call_attempts_reminder_id", "call_attempts", ["reminder_id"])
    op.create_index("ix_call_attempts_provider_call_id", "call_attempts", ["provider_call_id"])


def downgrade() -> None:
    op.drop_index("ix_call_attempts_provider_call_id", table_name="call_attempts")
    op.drop_index("ix_call_attempts_reminder_id", table_name="call_attempts")
    op.drop_table("call_attempts")
    with op.batch_alter_table("reminders") as batch:
        for name in reversed(_REMINDER_COLUMNS):
            batch.drop_column(name)
