"""What a provider's call events do to the database, for every provider (Twilio, Telnyx).

Two operations, each one transaction, keyed by the stamp (reminder id + attempt id) the provider
hands back:

- `record_event`: a status event. The call's id is recorded from whichever comes first (this or
  the create's response); the status moves only forward, by the provider's sequence.
- `answer`: a call was answered. The first answered call of a reminder is bound to it (a
  conditional UPDATE: first answer wins, on any replica) and speaks; a repeated request for the
  bound call speaks again (it is the same call); any other answered call must hang up silently.

Both tell the caller which of the reminder's other calls to cancel now that one is bound.
Unknown, mismatched and replayed events change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import exists, or_, select, update

from service.db import Database
from service.db.models import (
    Appointment,
    AppointmentStatus,
    CallAttempt,
    Reminder,
    ReminderOutcome,
    ReminderStatus,
)
from service.telephony.provider import Stamp

__all__ = [
    "Answer", "EventResult", "PRE_ANSWER_STATUSES", "SPEAKING", "SPOKEN", "answer", "is_final", "mark_heard",
    "record_event",
]

# Statuses of a call that has not been answered yet: it can still be cancelled.
PRE_ANSWER_STATUSES = ("queued", "initiated", "ringing")
# Providers whose speech is a command (Telnyx): the bound call's message has begun / ended.
SPEAKING, SPOKEN = "speaking", "spoken"
# A call's state never goes back: a status applies only if it ranks at least as high as the
# recorded one (then the provider's order decides: Twilio's SequenceNumber, Telnyx's occurred_at).
# Any status not listed here is a final one (completed, busy, no-answer, canceled, failed).
_RANK = {"queued": 0, "initiated": 1, "ringing": 2, "in-progress": 3, SPEAKING: 4, SPOKEN: 5}
_FINAL_RANK = 9


def is_final(status: str | None) -> bool:
    """The call is over (completed, busy, no-answer, canceled, failed, …)."""
    return status is not None and status not in _RANK


def _newer(status: str, order: int | None, current: str | None, current_order: int | None) -> bool:
    """Whether an event (`status`, `order`) moves the call past the recorded (`current`, `current_order`)."""
    if current is not None:
        rank, current_rank = _RANK.get(status, _FINAL_RANK), _RANK.get(current, _FINAL_RANK)
        if rank != current_rank:
            return rank > current_rank
    return order is None or current_order is None or order > current_order


@dataclass(frozen=True)
class EventResult:
    known: bool  # the stamp names an attempt of that reminder, and the call id matches
    cancel: list[str] = field(default_factory=list)  # calls to cancel: the reminder is bound elsewhere


@dataclass(frozen=True)
class Answer:
    speak: bool  # True: this is the reminder's bound call, say `message`
    message: str | None = None
    newly_bound: bool = False
    cancel: list[str] = field(default_factory=list)  # the reminder's other calls, still pre-answer


async def _attempt_for(session: Any, stamp: Stamp, call_id: str) -> Any | None:
    """The attempt row, locked (PostgreSQL), if the stamp is consistent and the call id matches."""
    row = (
        await session.execute(
            select(CallAttempt.id, CallAttempt.reminder_id, CallAttempt.provider_call_id, CallAttempt.last_sequence,
                   CallAttempt.call_status)
            .where(CallAttempt.id == stamp.attempt_id)
            .with_for_update()
        )
    ).first()
    if row is None or row.reminder_id != stamp.reminder_id:
        return None
    if row.provider_call_id is not None and row.provider_call_id != call_id:
        return None
    return row


async def record_event(
    db: Database, stamp: Stamp, call_id: str, status: str | None, sequence: int | None, now: datetime
) -> EventResult:
    """Apply one status event of call `call_id` (`status` None: an event that moves no state, e.g.
    digits gathered); `sequence` orders events of one status. Returns what else to do."""
    async with db.session() as session:
        attempt = await _attempt_for(session, stamp, call_id)
        if attempt is None:
            await session.rollback()
            return EventResult(known=False)
        values: dict[str, object] = {"last_event_at": now, "provider_call_id": call_id}
        newer = status is not None and _newer(status, sequence, attempt.call_status, attempt.last_sequence)
        if newer:
            values["call_status"] = status
            if sequence is not None:
                values["last_sequence"] = sequence
        await session.execute(update(CallAttempt).where(CallAttempt.id == attempt.id).values(values))
        bound = (await session.execute(select(Reminder.bound_call_id).where(Reminder.id == stamp.reminder_id))).scalar()
        await session.commit()
    cancel = [call_id] if bound is not None and bound != call_id and newer and status in PRE_ANSWER_STATUSES else []
    return EventResult(known=True, cancel=cancel)


async def answer(
    db: Database, stamp: Stamp, call_id: str, now: datetime, wording: Callable[[Any], str],
    *, outcome: str | None = ReminderOutcome.ANSWERED,
) -> Answer:
    """Bind `call_id` to its reminder if none is bound yet; say whether it may speak, and what.

    `wording(row)` makes the message from a row with `customer_name`, `starts_at`, `timezone`.
    `outcome` is set with the binding; None where the message is a later command (Telnyx), whose
    start `mark_heard` records. A call already over is never bound (a late, repeated answer).
    """
    async with db.session() as session:
        attempt = await _attempt_for(session, stamp, call_id)
        if attempt is None or is_final(attempt.call_status):
            await session.rollback()
            return Answer(speak=False)
        await session.execute(
            update(CallAttempt)
            .where(CallAttempt.id == attempt.id)
            .values(provider_call_id=call_id, last_event_at=now)
        )
        scheduled = exists().where(
            Appointment.id == Reminder.appointment_id, Appointment.status == AppointmentStatus.SCHEDULED
        )
        bound = await session.execute(
            update(Reminder)
            .where(
                Reminder.id == stamp.reminder_id,
                Reminder.bound_call_id.is_(None),
                Reminder.status.not_in((ReminderStatus.CANCELLED, ReminderStatus.SKIPPED)),
                scheduled,
            )
            .values(
                bound_call_id=call_id,
                bound_attempt_id=stamp.attempt_id,
                outcome=outcome,
                answered_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        newly_bound = bound.rowcount == 1
        row = (
            await session.execute(
                select(Reminder.bound_call_id, Appointment.customer_name, Appointment.starts_at, Appointment.timezone)
                .join(Appointment, Appointment.id == Reminder.appointment_id)
                .where(Reminder.id == stamp.reminder_id)
            )
        ).first()
        speak = row is not None and row.bound_call_id == call_id
        cancel: list[str] = []
        if newly_bound:
            others = await session.execute(
                select(CallAttempt.provider_call_id).where(
                    CallAttempt.reminder_id == stamp.reminder_id,
                    CallAttempt.id != stamp.attempt_id,
                    CallAttempt.provider_call_id.is_not(None),
                    or_(CallAttempt.call_status.is_(None), CallAttempt.call_status.in_(PRE_ANSWER_STATUSES)),
                )
            )
            cancel = [other for (other,) in others]
        await session.commit()
    return Answer(speak=speak, message=wording(row) if speak else None, newly_bound=newly_bound, cancel=cancel)


async def mark_heard(db: Database, stamp: Stamp, call_id: str) -> bool:
    """The bound call's message has begun (Telnyx's `call.speak.started` / `.ended`, in either
    order): the reminder's outcome is `answered`. False if the call is not the bound one."""
    async with db.session() as session:
        result = await session.execute(
            update(Reminder)
            .where(Reminder.id == stamp.reminder_id, Reminder.bound_call_id == call_id,
                   Reminder.bound_attempt_id == stamp.attempt_id)
            .values(outcome=ReminderOutcome.ANSWERED)
            .execution_options(synchronize_session=False)
        )
        await session.commit()
    return result.rowcount == 1
