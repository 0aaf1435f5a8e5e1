"""Cancelling: one rule for the API's DELETE, the keypad's decline and a re-plan.

Only `pending` reminders are cancelled here: a reminder the dispatcher already claimed stays its,
and its outcome decides (the claim sees the appointment cancelled and records `cancelled`).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, update
from sqlalchemy.engine import Connection

from service.db.models import Appointment, AppointmentStatus, Confirmation, Reminder
from service.reminders.lifecycle import ReminderStatus, require

__all__ = ["CANCELLED_BY_API", "DECLINED_BY_CUSTOMER", "REPLANNED", "cancel_appointment", "cancel_pending"]

# skip_reason of a reminder cancelled by each rule
CANCELLED_BY_API = "appointment cancelled"
DECLINED_BY_CUSTOMER = "declined by customer"
REPLANNED = "re-planned"

_A, _R = Appointment.__table__, Reminder.__table__

_CANCEL_PENDING = (
    update(_R)
    .where(_R.c.appointment_id == bindparam("of_appointment"), _R.c.status == ReminderStatus.PENDING)
    .values(status=ReminderStatus.CANCELLED, skip_reason=bindparam("reason"), updated_at=bindparam("now"))
    .returning(_R.c.id)
)
_CANCEL_APPOINTMENT = (
    update(_A)
    .where(_A.c.id == bindparam("of_appointment"))
    .values(status=AppointmentStatus.CANCELLED, updated_at=bindparam("now"))
)


def cancel_pending(connection: Connection, appointment_id: str, reason: str, now: datetime) -> set[str]:
    """`pending` → `cancelled` with `skip_reason` = `reason`; the ids cancelled."""
    require(ReminderStatus.PENDING, ReminderStatus.CANCELLED)
    result = connection.execute(_CANCEL_PENDING, {"of_appointment": appointment_id, "reason": reason, "now": now})
    return set(result.scalars())


def cancel_appointment(connection: Connection, appointment_id: str, reason: str, now: datetime, *,
                       confirmation: Confirmation | None = None) -> set[str]:
    """The appointment `cancelled` (with the customer's `confirmation` when they declined) and its
    pending reminders with it; the reminder ids cancelled."""
    values = {"of_appointment": appointment_id, "now": now}
    if confirmation is None:
        connection.execute(_CANCEL_APPOINTMENT, values)
    else:
        connection.execute(_CANCEL_APPOINTMENT.values(confirmation=confirmation), values)
    return cancel_pending(connection, appointment_id, reason, now)
