"""Superseding and cancelling: one rule for the API's DELETE, the keypad's decline and a re-plan.

Every unfinished reminder of the appointment is superseded (`cancelled`, with the reason): a
`pending` one is never called; a `dispatching` one's attempt is refused (`begin` checks) or its
call, already on its way, binds nothing; a `sent` one whose calls nobody answered yet (real
providers) binds nothing, takes no digits and is not retried — the leader ends its calls. A
reminder bound to an answered call, or whose outcome is known, is finished and keeps its status;
its keypad answers count only while it belongs to the appointment's current plan
(docs/decisions/0221).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, bindparam, exists, or_, update
from sqlalchemy.engine import Connection

from service.db.models import Appointment, AppointmentStatus, CallAttempt, Confirmation, Reminder
from service.reminders.lifecycle import ReminderStatus, require

__all__ = [
    "CANCELLED_BY_API",
    "DECLINED_BY_CUSTOMER",
    "REPLANNED",
    "Superseded",
    "cancel_appointment",
    "supersede",
]

# skip_reason of a reminder superseded by each rule
CANCELLED_BY_API = "appointment cancelled"
DECLINED_BY_CUSTOMER = "declined by customer"
REPLANNED = "re-planned"

_S = ReminderStatus
_A, _R = Appointment.__table__, Reminder.__table__

_CANCEL_APPOINTMENT = (
    update(_A)
    .where(_A.c.id == bindparam("of_appointment"))
    .values(status=AppointmentStatus.CANCELLED, updated_at=bindparam("now"))
)
# Every unfinished reminder of an appointment: pending or dispatching, or sent with a real
# provider's call nobody answered yet (the generic provider's `sent` is done; it has no attempts).
_SUPERSEDE = (
    update(_R)
    .where(
        _R.c.appointment_id == bindparam("of_appointment"),
        or_(_R.c.status.in_((_S.PENDING, _S.DISPATCHING)),
            and_(_R.c.status == _S.SENT, _R.c.bound_call_id.is_(None), _R.c.outcome.is_(None),
                 exists().where(CallAttempt.reminder_id == _R.c.id))),
    )
    .values(status=_S.CANCELLED, skip_reason=bindparam("reason"), updated_at=bindparam("now"))
    .returning(_R.c.id, _R.c.next_attempt_at)
)


@dataclass(frozen=True)
class Superseded:
    cancelled: set[str]  # the reminders now `cancelled`
    owed: list[datetime]  # when each of them was owed a call that had not reached anyone yet


def supersede(connection: Connection, appointment_id: str, reason: str, now: datetime) -> Superseded:
    """Cancel every unfinished reminder of the appointment with `skip_reason` = `reason`."""
    for source in (_S.PENDING, _S.DISPATCHING, _S.SENT):
        require(source, _S.CANCELLED)
    rows = connection.execute(_SUPERSEDE, {"of_appointment": appointment_id, "reason": reason, "now": now}).all()
    # owed: due when the rule came (a pending one whose time had come, or one being called or
    # ringing: their next_attempt_at is the claim's, in the past)
    return Superseded({row.id for row in rows}, [max(row.next_attempt_at, now) for row in rows
                                                  if row.next_attempt_at <= now])


def cancel_appointment(connection: Connection, appointment_id: str, reason: str, now: datetime, *,
                       confirmation: Confirmation | None = None) -> set[str]:
    """The appointment `cancelled` (with the customer's `confirmation` when they declined) and its
    unfinished reminders superseded; the reminder ids cancelled."""
    values = {"of_appointment": appointment_id, "now": now}
    if confirmation is None:
        connection.execute(_CANCEL_APPOINTMENT, values)
    else:
        connection.execute(_CANCEL_APPOINTMENT.values(confirmation=confirmation), values)
    return supersede(connection, appointment_id, reason, now).cancelled
