"""Optimistic concurrency (docs/decisions/0241): an appointment's version, its ETag.

Revision ID: 0007_versions
Revises: 0006_erasure
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_versions"
down_revision = "0006_erasure"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # rows written before start at version 1, as a new appointment does
    with op.batch_alter_table("appointments") as batch:
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("appointments") as batch:
        batch.drop_column("version")
