"""Events for the booking system (docs/decisions/0251): the outbox, written in the transaction of
the change each event reports, and the feed's one row (positions given, positions pruned, an
endpoint that answered 410).

Revision ID: 0007_events
Revises: 0006_erasure
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_events"
down_revision = "0007_versions"
branch_labels = None
depends_on = None

# service.db.models.FEED_ROW; a migration keeps its own copy of what it writes
_FEED_ROW = 1
_PENDING = sa.text("delivery = 'pending'")
_UNNUMBERED = sa.text("position IS NULL")


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("appointment_id", sa.String(36), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("dedupe", sa.String(80), nullable=True, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=True, unique=True),
        sa.Column("delivery", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_try_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(200), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_events_created_at", "events", ["created_at"])
    op.create_index("ix_events_unnumbered", "events", ["seq"], postgresql_where=_UNNUMBERED, sqlite_where=_UNNUMBERED)
    op.create_index("ix_events_pending", "events", ["position"], postgresql_where=_PENDING, sqlite_where=_PENDING)
    op.create_index("ix_events_pending_of", "events", ["appointment_id", "position"], postgresql_where=_PENDING,
                    sqlite_where=_PENDING)
    feed = op.create_table(
        "event_feed",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("last_position", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("pruned_through", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("gone_endpoint", sa.String(64), nullable=True),
        sa.Column("gone_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.bulk_insert(feed, [{"id": _FEED_ROW, "last_position": 0, "pruned_through": 0}])


def downgrade() -> None:
    op.drop_table("event_feed")
    for name in ("ix_events_pending_of", "ix_events_pending", "ix_events_unnumbered", "ix_events_created_at"):
        op.drop_index(name, table_name="events")
    op.drop_table("events")
