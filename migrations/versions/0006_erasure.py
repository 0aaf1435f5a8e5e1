"""Personal data that leaves (docs/decisions/0245): when an appointment's personal data was erased.

Revision ID: 0006_erasure
Revises: 0005_consent
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_erasure"
down_revision = "0005_consent"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("appointments") as batch:
        batch.add_column(sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("appointments") as batch:
        batch.drop_column("erased_at")
