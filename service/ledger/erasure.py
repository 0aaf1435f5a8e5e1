"""Erasing personal data (docs/decisions/0245): an appointment's name, number (and its keyed hash)
and notes, its reminders' words and errors, its call attempts' errors — the rows, their statuses,
times and outcomes stay. On request (`DELETE /appointments/{id}?erase=true`, after the appointment
is cancelled) or by retention (PERSONAL_DATA_RETENTION after the appointment, run by the leader).

The do-not-call list is not erased: it holds no number, and it is the person's own request.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from service.db import Database
from service.db.models import Appointment, CallAttempt, Reminder

__all__ = ["BATCH", "ERASED", "erase_appointment", "erase_past"]

# Appointments erased per transaction by retention.
BATCH = 200

# What an erased appointment's name and number read as.
ERASED = ""

_A, _R, _C = Appointment.__table__, Reminder.__table__, CallAttempt.__table__
_OF = bindparam("of_appointment")
_ERASE_APPOINTMENT = (
    update(_A).where(_A.c.id == _OF, _A.c.erased_at.is_(None))
    .values(customer_name=ERASED, phone=ERASED, phone_hash=None, notes=None, erased_at=bindparam("now"),
            updated_at=bindparam("now"))
)
_ERASE_REMINDERS = update(_R).where(_R.c.appointment_id == _OF).values(wording=None, last_error=None)
_ERASE_ATTEMPTS = (
    update(_C).where(_C.c.reminder_id.in_(select(_R.c.id).where(_R.c.appointment_id == _OF))).values(error=None)
)


def erase_appointment(connection: Connection, appointment_id: str, now: datetime) -> bool:
    """Erase one appointment's personal data in the caller's transaction; False if it was erased
    before (nothing to do)."""
    params = {"of_appointment": appointment_id, "now": now}
    if connection.execute(_ERASE_APPOINTMENT, params).rowcount != 1:
        return False
    connection.execute(_ERASE_REMINDERS, params)
    connection.execute(_ERASE_ATTEMPTS, params)
    return True


async def erase_past(db: Database, before: datetime, now: datetime, *, batch: int = BATCH) -> int:
    """Erase up to `batch` appointments that started before `before` and are not erased yet, in one
    transaction; how many were erased (fewer than `batch`: none are left)."""

    def erase(connection: Connection) -> int:
        ids = connection.execute(
            select(_A.c.id).where(_A.c.starts_at < before, _A.c.erased_at.is_(None)).order_by(_A.c.starts_at)
            .limit(batch)
        ).scalars().all()
        return sum(erase_appointment(connection, appointment_id, now) for appointment_id in ids)

    return await db.write(erase)
