"""The call protocol of real providers (docs/decisions/0221): which plan a reminder belongs to, a
greeting's intent recorded before its command, the keypad rounds taken, when a call ended, the
leader's cancels and checks of calls, and the provider events already applied.

Revision ID: 0004_call_protocol
Revises: 0003_outcomes
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_call_protocol"
down_revision = "0003_outcomes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("appointments") as batch:
        batch.add_column(sa.Column("plan", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("reminders") as batch:
        batch.add_column(sa.Column("plan", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("call_attempts") as batch:
        batch.add_column(sa.Column("answered_by", sa.String(32), nullable=True))
        batch.add_column(sa.Column("greeting", sa.String(16), nullable=True))
        batch.add_column(sa.Column("greeting_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("greeting_result", sa.String(16), nullable=True))
        batch.add_column(sa.Column("keypad_rounds", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "provider_events",
        sa.Column("id", sa.String(160), primary_key=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_provider_events_received_at", "provider_events", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_provider_events_received_at", table_name="provider_events")
    op.drop_table("provider_events")
    with op.batch_alter_table("call_attempts") as batch:
        for column in ("checked_at", "cancel_requested_at", "ended_at", "keypad_rounds", "greeting_result",
                       "greeting_at", "greeting", "answered_by"):
            batch.drop_column(column)
    with op.batch_alter_table("reminders") as batch:
        batch.drop_column("plan")
    with op.batch_alter_table("appointments") as batch:
        batch.drop_column("plan")
