"""Superseding, cancelling and skipping: one rule for the API's DELETE, the keypad's decline, a
re-plan, an opt-out and a confirmation.

Every unfinished reminder of the appointment (of every appointment of the number, for an opt-out)
is superseded (`cancelled`) or skipped (`skipped`), with the reason: a `pending` one is never
called; a `dispatching` one's attempt is refused (`begin` checks) or its call, already on its way,
binds nothing; a `sent` one whose calls nobody answered yet (real providers) binds nothing, takes
no digits and is not retried — the leader ends its calls. A reminder bound to an answered call
whose first words were never commanded (Telnyx: the greeting waits for the machine detection, or
the provider refused it because the call was over) has been heard by nobody: it is unfinished too,
and its call is hung up without a word. A reminder whose bound call spoke (or may have), or whose
outcome is known, is finished and keeps its status, whatever it is (`dispatching` or `pending`
while its create's answer is in doubt); its keypad answers count only while it belongs to the
appointment's current plan (docs/decisions/0221, 0231).

On PostgreSQL the rule first locks the call attempts of the reminders it looks at: a greeting
being recorded (`service.ledger.calls.command_greeting`, which locks its attempt first) either
commits before — and the rule sees the reminder heard — or waits, and then finds it superseded.

The reminders each rule finished come back as rows (as RETURNING wrote them), from which its caller
makes their `reminder.finished` events in the same transaction (service.ledger.events), in one
INSERT with its own: a cancellation emits `appointment.cancelled` (or `appointment.declined`) here;
a re-plan's events wait until the ones it deletes are known (service.ledger.plans).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, exists, or_, select, update
from sqlalchemy.engine import Connection

from service.db.models import Appointment, AppointmentStatus, CallAttempt, Confirmation, Reminder
from service.ledger import events
from service.ledger.events import EventSource, EventType
from service.reminders.lifecycle import ReminderStatus, require
from service.sql import one_of

__all__ = [
    "CALLED_BACK",
    "CANCELLED_BY_API",
    "CONFIRMED_BY_CUSTOMER",
    "DECLINED_BY_CUSTOMER",
    "LOCK_OF_APPOINTMENT",
    "OPTED_OUT",
    "REPLANNED",
    "SKIP_OF_APPOINTMENT",
    "Superseded",
    "cancel_appointment",
    "skip_confirmed",
    "skip_number",
    "supersede",
]

# skip_reason of a reminder superseded by each rule
CANCELLED_BY_API = "appointment cancelled"
DECLINED_BY_CUSTOMER = "declined by customer"
REPLANNED = "re-planned"
OPTED_OUT = "opted out"
CONFIRMED_BY_CUSTOMER = "confirmed"
# a pending or dispatching reminder whose message the customer heard on a call they placed
# (service.ledger.callbacks): never called; its bound call-back still takes digits
CALLED_BACK = "answered by call-back"

_S = ReminderStatus
_A, _R = Appointment.__table__, Reminder.__table__

_CANCEL_APPOINTMENT = (
    update(_A)
    .where(_A.c.id == bindparam("of_appointment"))
    .values(status=AppointmentStatus.CANCELLED, updated_at=bindparam("now"))
)
# Bound to an answered call that has said nothing: its greeting never commanded, or refused because
# the call was over (`greeting_result` "ended"), and no outcome recorded (Twilio's binding answer is
# its words: its outcome is set as it binds).
_BOUND_UNHEARD = and_(_R.c.bound_attempt_id.is_not(None), _R.c.outcome.is_(None),
                      exists().where(CallAttempt.id == _R.c.bound_attempt_id,
                                     or_(CallAttempt.greeting.is_(None), CallAttempt.greeting_result == "ended")))
# An unfinished reminder: pending or dispatching with no bound call, sent with a real provider's
# call nobody answered yet (the generic provider's `sent` is done; it has no attempts), or bound
# to a call that has said nothing.
_UNFINISHED = and_(
    one_of(_R.c.status, (_S.PENDING, _S.DISPATCHING, _S.SENT)),
    or_(and_(_R.c.bound_call_id.is_(None),
             or_(_R.c.status != _S.SENT,
                 and_(_R.c.outcome.is_(None), exists().where(CallAttempt.reminder_id == _R.c.id)))),
        _BOUND_UNHEARD),
)


def _require_from_unfinished(status: ReminderStatus) -> None:
    for source in (_S.PENDING, _S.DISPATCHING, _S.SENT):
        require(source, status)


def _finish_unfinished(which: Any, status: ReminderStatus) -> Any:
    """UPDATE: the unfinished reminders `which` selects become `status`, with the reason; returns
    them as they are now (what their events say)."""
    return (update(_R).where(which, _UNFINISHED)
            .values(status=status, skip_reason=bindparam("reason"), updated_at=bindparam("now"))
            .returning(_R.c.id, _R.c.next_attempt_at, _R.c.appointment_id, _R.c.status, _R.c.outcome,
                       _R.c.skip_reason, _R.c.last_error))


_OF_APPOINTMENT = _R.c.appointment_id == bindparam("of_appointment")
_OF_NUMBER = _R.c.appointment_id.in_(select(_A.c.id).where(_A.c.phone_hash == bindparam("of_number")))
_SUPERSEDE = _finish_unfinished(_OF_APPOINTMENT, _S.CANCELLED)
# (public, with LOCK_OF_APPOINTMENT: the webhook floors of `python -m bench webhooks` compile them)
SKIP_OF_APPOINTMENT = _finish_unfinished(_OF_APPOINTMENT, _S.SKIPPED)
_SKIP_OF_NUMBER = _finish_unfinished(_OF_NUMBER, _S.SKIPPED)


def _lock_calls(which: Any) -> Any:
    """SELECT … FOR UPDATE of the call attempts of the reminders `which` selects."""
    return (select(CallAttempt.id).where(CallAttempt.reminder_id.in_(select(_R.c.id).where(which)))
            .order_by(CallAttempt.id).with_for_update())


LOCK_OF_APPOINTMENT, _LOCK_OF_NUMBER = _lock_calls(_OF_APPOINTMENT), _lock_calls(_OF_NUMBER)


def _finish(connection: Connection, lock: Any, statement: Any, params: dict[str, Any]) -> list[Any]:
    """`statement` (one of the rules above), its reminders' call attempts locked first on
    PostgreSQL (the module docstring): the UPDATE, a statement of its own, sees every greeting
    recorded before the locks were granted."""
    if connection.dialect.name != "sqlite":
        connection.execute(lock, params)
    return connection.execute(statement, params).all()


@dataclass(frozen=True)
class Superseded:
    cancelled: set[str]  # the reminders now `cancelled`
    owed: list[datetime]  # when each of them was owed a call that had not reached anyone yet
    rows: list[Any]  # the reminders now `cancelled`, as RETURNING wrote them


def supersede(connection: Connection, appointment_id: str, reason: str, now: datetime) -> Superseded:
    """Cancel every unfinished reminder of the appointment with `skip_reason` = `reason`."""
    _require_from_unfinished(_S.CANCELLED)
    rows = _finish(connection, LOCK_OF_APPOINTMENT, _SUPERSEDE,
                   {"of_appointment": appointment_id, "reason": reason, "now": now})
    # owed: due when the rule came (a pending one whose time had come, or one being called or
    # ringing: their next_attempt_at is the claim's, in the past)
    return Superseded({row.id for row in rows}, [max(row.next_attempt_at, now) for row in rows
                                                  if row.next_attempt_at <= now], list(rows))


def cancel_appointment(connection: Connection, appointment_id: str, reason: str, now: datetime, *,
                       source: EventSource, confirmation: Confirmation | None = None,
                       reminder_id: str | None = None) -> set[str]:
    """The appointment `cancelled` (with the customer's `confirmation` when they declined, on the
    call of `reminder_id`) and its unfinished reminders superseded; the reminder ids cancelled.
    Emits `appointment.declined` for a decline, else `appointment.cancelled`, and their
    `reminder.finished`."""
    values = {"of_appointment": appointment_id, "now": now}
    if confirmation is None:
        connection.execute(_CANCEL_APPOINTMENT, values)
    else:
        connection.execute(_CANCEL_APPOINTMENT.values(confirmation=confirmation), values)
    superseded = supersede(connection, appointment_id, reason, now)
    if confirmation == Confirmation.DECLINED:
        own = events.event_row(EventType.APPOINTMENT_DECLINED, source, appointment_id, now, reminder_id=reminder_id,
                               confirmation=confirmation.value, status=AppointmentStatus.CANCELLED.value)
    else:
        own = events.event_row(EventType.APPOINTMENT_CANCELLED, source, appointment_id, now,
                               status=AppointmentStatus.CANCELLED.value)
    events.insert(connection, [own, *events.finished_rows(superseded.rows, source, now)])
    return superseded.cancelled


def skip_number(connection: Connection, phone_hash: str, now: datetime) -> list[Any]:
    """Skip ("opted out") every unfinished reminder of every appointment of the number; the rows
    skipped (for their events)."""
    _require_from_unfinished(_S.SKIPPED)
    return _finish(connection, _LOCK_OF_NUMBER, _SKIP_OF_NUMBER, {"of_number": phone_hash, "reason": OPTED_OUT,
                                                                  "now": now})


def skip_confirmed(connection: Connection, appointment_id: str, now: datetime) -> list[Any]:
    """Skip ("confirmed") every unfinished reminder of a confirmed appointment; the rows skipped
    (for their events)."""
    _require_from_unfinished(_S.SKIPPED)
    return _finish(connection, LOCK_OF_APPOINTMENT, SKIP_OF_APPOINTMENT,
                   {"of_appointment": appointment_id, "reason": CONFIRMED_BY_CUSTOMER, "now": now})
