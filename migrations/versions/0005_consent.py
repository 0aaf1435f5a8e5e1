"""Calls people agreed to (docs/decisions/0231): the do-not-call list (keyed hashes of numbers),
the key of those hashes, each appointment's number hash, and when a call first rang.

Revision ID: 0005_consent
Revises: 0004_call_protocol
Create Date: 2026-12-06
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import sqlalchemy as sa
from alembic import op

revision = "0005_consent"
down_revision = "0004_call_protocol"
branch_labels = None
depends_on = None

# service.ledger.consent.PHONE_KEY; a migration keeps its own copy of what it writes
_PHONE_KEY = "phone_hash"
_BATCH = 1000


def upgrade() -> None:
    keys = op.create_table(
        "service_keys",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.String(128), nullable=False),
    )
    op.create_table(
        "do_not_call",
        sa.Column("phone_hash", sa.String(64), primary_key=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("listed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_do_not_call_listed_at", "do_not_call", ["listed_at"])
    with op.batch_alter_table("appointments") as batch:
        batch.add_column(sa.Column("phone_hash", sa.String(64), nullable=True))
    with op.batch_alter_table("call_attempts") as batch:
        batch.add_column(sa.Column("rang_at", sa.DateTime(timezone=True), nullable=True))
    key = secrets.token_hex(32)
    op.bulk_insert(keys, [{"name": _PHONE_KEY, "value": key}])
    _hash_existing(key.encode())
    op.create_index("ix_appointments_phone_hash", "appointments", ["phone_hash"])


def _hash_existing(key: bytes) -> None:
    """Every stored appointment's number hash, a batch at a time."""
    connection = op.get_bind()
    appointments = sa.table("appointments", sa.column("id", sa.String), sa.column("phone", sa.String),
                            sa.column("phone_hash", sa.String))
    update = appointments.update().where(appointments.c.id == sa.bindparam("b_id")).values(
        phone_hash=sa.bindparam("b_hash"))
    while True:
        rows = connection.execute(sa.select(appointments.c.id, appointments.c.phone)
                                  .where(appointments.c.phone_hash.is_(None)).limit(_BATCH)).all()
        if not rows:
            return
        connection.execute(update, [{"b_id": row.id,
                                     "b_hash": hmac.new(key, row.phone.encode(), hashlib.sha256).hexdigest()}
                                    for row in rows])


def downgrade() -> None:
    op.drop_index("ix_appointments_phone_hash", table_name="appointments")
    with op.batch_alter_table("call_attempts") as batch:
        batch.drop_column("rang_at")
    with op.batch_alter_table("appointments") as batch:
        batch.drop_column("phone_hash")
    op.drop_index("ix_do_not_call_listed_at", table_name="do_not_call")
    op.drop_table("do_not_call")
    op.drop_table("service_keys")
