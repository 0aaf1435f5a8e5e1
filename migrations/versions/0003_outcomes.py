"""Call outcomes and keypad confirmation: an appointment's language and confirmation; a reminder's
rendered wording and its no-answer retries.

Revision ID: 0003_outcomes
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_outcomes"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("appointments") as batch:
        # existing appointments were planned in English, the only language before this revision
        batch.add_column(sa.Column("language", sa.String(35), nullable=False, server_default="en-US"))
        batch.add_column(sa.Column("confirmation", sa.String(16), nullable=True))
    with op.batch_alter_table("reminders") as batch:
        batch.add_column(sa.Column("wording", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("no_answer_retries", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("reminders") as batch:
        batch.drop_column("no_answer_retries")
        batch.drop_column("wording")
    with op.batch_alter_table("appointments") as batch:
        batch.drop_column("confirmation")
        batch.drop_column("language")
