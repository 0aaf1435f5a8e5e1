"""Customers who call back: the ledger's part of an incoming call (docs/decisions/0252).

The caller's number (its keyed hash, service.ledger.consent) selects a reminder: of the number's
next upcoming appointment (scheduled, not erased, starting in the future), the latest of its
current plan's reminders already due that may still bind a call, else the next one. The call then
goes through the same first-answer gate as an outgoing call (service.ledger.calls): one
conditional UPDATE binds it (`bound_call_id IS NULL`), in one transaction with

- an attempt row for the incoming call (`state = incoming`: never reconciled, never counted
  against the caps per number) — the stamp (reminder id + attempt id) under which the keypad path,
  the greeting and the call's events treat it as the reminder's bound call;
- the reminder's status: a `pending` one (a no-answer retry, or one not called yet) or a
  `dispatching` one becomes `skipped` ("answered by call-back"): the dispatcher's `begin` refuses
  it, a call already on its way binds nothing (hung up silently when answered); a `sent` one stays
  `sent`;
- its outcome `answered` (heard on the customer's own call: counted apart, in
  `reminders_incoming_calls_total{result="identified"}`, not in `reminders_call_outcomes_total`).

The caller ends the reminder's other queued or ringing calls (`cancel`); the leader's sweep ends
any it missed. Who may get this far (the caller ID's attestation) is the webhook's decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from service.db import Database
from service.db.clock import db_now
from service.db.models import (
    Appointment,
    AppointmentStatus,
    AttemptState,
    CallAttempt,
    Reminder,
    ReminderOutcome,
    ReminderStatus,
    new_id,
)
from service.ledger.calls import _BINDABLE, _WORDS, Fallback, _current, _other_calls_to_end, _wording
from service.ledger.cancellation import CALLED_BACK
from service.ledger.consent import phone_hasher
from service.ledger.events import EventSource, reminders_finished
from service.reminders import Wording
from service.reminders.lifecycle import require
from service.reminders.outcomes import CALL_ANSWERED
from service.sql import one_of
from service.telephony.provider import Stamp

__all__ = ["CallBack", "call_back"]


@dataclass(frozen=True)
class CallBack:
    """What an identified caller's call is: `stamp` None — no reminder of theirs to answer (no
    upcoming appointment, or none of its reminders may still bind a call)."""

    stamp: Stamp | None = None
    wording: Wording | None = None
    cancel: list[str] = field(default_factory=list)  # the reminder's other calls, still pre-answer
    was: str | None = None  # the reminder's status before


async def call_back(db: Database, phone: str, call_id: str, *, fallback: Fallback) -> CallBack:
    """Bind the incoming call `call_id` from `phone` (E.164, its caller ID attested) to the
    reminder it selects, if any (one transaction)."""
    phone_hash = (await phone_hasher(db))(phone)
    return await db.write(_call_back, phone_hash, call_id, fallback)


def _select(connection: Connection, phone_hash: str, now: datetime) -> tuple[str, str] | None:
    """(reminder id, its status) the number's call-back answers, or None."""
    appointment = connection.execute(
        select(Appointment.id, Appointment.plan)
        .where(Appointment.phone_hash == phone_hash, Appointment.status == AppointmentStatus.SCHEDULED,
               Appointment.erased_at.is_(None), Appointment.starts_at > now)
        .order_by(Appointment.starts_at, Appointment.id).limit(1)
    ).first()
    if appointment is None:
        return None
    rows = connection.execute(
        select(Reminder.id, Reminder.status, Reminder.due_at)
        .where(Reminder.appointment_id == appointment.id, Reminder.plan == appointment.plan,
               one_of(Reminder.status, _BINDABLE), Reminder.bound_call_id.is_(None))
        .order_by(Reminder.due_at, Reminder.id)
    ).all()
    due = [row for row in rows if row.due_at <= now]
    chosen = due[-1] if due else (rows[0] if rows else None)
    return None if chosen is None else (chosen.id, chosen.status)


def _again(connection: Connection, call_id: str, fallback: Fallback) -> CallBack | None:
    """The call was bound before (its webhook delivered or asked again): the same answer."""
    row = connection.execute(
        select(CallAttempt.id, CallAttempt.reminder_id, *_WORDS)
        .join(Reminder, Reminder.bound_attempt_id == CallAttempt.id)
        .join(Appointment, Appointment.id == Reminder.appointment_id)
        .where(CallAttempt.provider_call_id == call_id[:128], CallAttempt.state == AttemptState.INCOMING)
    ).first()
    if row is None:
        return None
    return CallBack(stamp=Stamp(row.reminder_id, row.id), wording=_wording(row, fallback), was="bound before")


def _call_back(connection: Connection, phone_hash: str, call_id: str, fallback: Fallback) -> CallBack:
    again = _again(connection, call_id, fallback)
    if again is not None:
        return again
    now = connection.execute(select(db_now())).scalar_one()
    chosen = _select(connection, phone_hash, now)
    if chosen is None:
        return CallBack()
    reminder_id, status = chosen
    stamp = Stamp(reminder_id, new_id())
    values: dict[str, object] = {"bound_call_id": call_id, "bound_attempt_id": stamp.attempt_id,
                                 "outcome": ReminderOutcome.ANSWERED, "answered_at": now}
    if status != ReminderStatus.SENT:  # pending (a retry, or not called yet) or dispatching
        require(status, ReminderStatus.SKIPPED)
        values.update(status=ReminderStatus.SKIPPED, skip_reason=CALLED_BACK, updated_at=now)
    bound = connection.execute(
        update(Reminder)
        .where(Reminder.id == reminder_id, Reminder.status == status, Reminder.bound_call_id.is_(None), _current())
        .values(values)
    )
    if bound.rowcount != 1:
        return CallBack()  # an outgoing call of it was answered meanwhile: first answer wins
    connection.execute(insert(CallAttempt).values(
        id=stamp.attempt_id, reminder_id=reminder_id, fencing_token=0, state=AttemptState.INCOMING,
        provider_call_id=call_id[:128], call_status=CALL_ANSWERED, last_event_at=now, created_at=now,
        updated_at=now))
    cancel = _other_calls_to_end(connection, stamp)
    # a pending or dispatching one is skipped now: its one `reminder.finished` (a sent one may be too)
    reminders_finished(connection, [reminder_id], EventSource.CALL_BACK)
    row = connection.execute(
        select(*_WORDS).join(Appointment, Appointment.id == Reminder.appointment_id).where(Reminder.id == reminder_id)
    ).one()
    return CallBack(stamp=stamp, wording=_wording(row, fallback), cancel=cancel, was=str(status))
