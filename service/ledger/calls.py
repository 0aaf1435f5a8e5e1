"""What a provider's call events do to reminders and call attempts, for every provider (Twilio,
Telnyx): the ledger's part of the webhooks.

Three operations, each one transaction, keyed by the stamp (reminder id + attempt id) the provider
hands back:

- `record_event`: a status event. The call's id is recorded from whichever comes first (this or
  the create's response); the status moves only forward, by state and then by the provider's order
  (Twilio's SequenceNumber, Telnyx's occurred_at): a duplicated or late event changes nothing.
  When the reminder's last live call ends unanswered, its `outcome` is recorded (`no_answer`,
  `busy`, `failed`) and, for no answer / busy with NO_ANSWER_RETRIES left, the reminder goes back
  to `pending` for another call after NO_ANSWER_RETRY_DELAY.
- `answer`: a call was answered. The first answered call of a reminder is bound to it (a
  conditional UPDATE: first answer wins, on any replica) and speaks — the message and the keypad
  prompt to a person (`answered`), the short voicemail to a machine (`voicemail`); a repeated
  request for the bound call speaks again (it is the same call); any other answered call must
  hang up silently.
- `keypad`: a digit from the bound call: 1 confirms the appointment, 2 declines it (the appointment
  is cancelled, its pending reminders too). A digit from any other call changes nothing.

`record_event` and `answer` tell the caller which of the reminder's other calls to cancel now that
one is bound. Unknown, mismatched and replayed events change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.engine import Connection

from service.db import Database
from service.db.models import (
    Appointment,
    AppointmentStatus,
    AttemptState,
    CallAttempt,
    Confirmation,
    Reminder,
    ReminderOutcome,
    ReminderStatus,
)
from service.ledger.cancellation import DECLINED_BY_CUSTOMER, cancel_appointment
from service.metrics import CALL_OUTCOMES, CONFIRMATIONS
from service.reminders import (
    NoAnswerPolicy,
    Wording,
    advances,
    keypad_answer,
    outcome_of_final,
    retry_time,
)
from service.reminders.lifecycle import require
from service.reminders.outcomes import CALL_SPEAKING, CALL_SPOKEN, FINAL_CALL_STATES, PRE_ANSWER_STATES
from service.telephony.provider import Stamp

__all__ = [
    "Answer",
    "EventResult",
    "Fallback",
    "KeypadResult",
    "SPEAKING",
    "SPOKEN",
    "answer",
    "is_final",
    "keypad",
    "mark_heard",
    "record_event",
]

# Providers whose speech is a command (Telnyx): the bound call's message has begun / ended.
SPEAKING, SPOKEN = CALL_SPEAKING, CALL_SPOKEN

# (row with customer_name, starts_at, timezone, language) → the words, for a reminder planned
# before its wording was stored
Fallback = Callable[[Any], Wording]


@dataclass(frozen=True)
class EventResult:
    known: bool  # the stamp names an attempt of that reminder, and the call id matches
    cancel: list[str] = field(default_factory=list)  # calls to cancel: the reminder is bound elsewhere
    outcome: ReminderOutcome | None = None  # recorded by this event (the reminder's last call ended unanswered)
    retry_at: datetime | None = None  # set: the reminder is `pending` again, called at this time


@dataclass(frozen=True)
class Answer:
    speak: bool  # True: this is the reminder's bound call, say `wording`
    wording: Wording | None = None
    machine: bool = False  # the bound call was answered by a machine: the voicemail, no prompt
    newly_bound: bool = False
    cancel: list[str] = field(default_factory=list)  # the reminder's other calls, still pre-answer
    over: bool = False  # the call had already ended (a late or repeated answer): nothing to hang up


@dataclass(frozen=True)
class KeypadResult:
    bound: bool  # the digits came from the reminder's bound call
    answer: Confirmation | None = None  # what the digits say (None: nothing usable)
    confirmation: Confirmation | None = None  # the appointment's confirmation now
    wording: Wording | None = None
    changed: bool = False  # this request recorded it (not a repeat)


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


def is_final(status: str | None) -> bool:
    """The call is over (completed, busy, no-answer, canceled, failed)."""
    return status in FINAL_CALL_STATES


async def record_event(
    db: Database, stamp: Stamp, call_id: str, status: str | None, order: int | None, now: datetime,
    policy: NoAnswerPolicy | None = None,
) -> EventResult:
    """Apply one status event of call `call_id` (`status` None: an event that moves no state, e.g.
    digits gathered; `order`: the provider's order of the call's events, if it gives one); returns
    what else to do. `policy` None: no retries."""
    async with db.session() as session:
        attempt = await _attempt_for(session, stamp, call_id)
        if attempt is None:
            await session.rollback()
            return EventResult(known=False)
        values: dict[str, object] = {"last_event_at": now, "provider_call_id": call_id}
        applies = status is not None and advances(attempt.call_status, attempt.last_sequence, status, order)
        if applies:
            values["call_status"] = status
            if order is not None:
                values["last_sequence"] = order
        await session.execute(update(CallAttempt).where(CallAttempt.id == attempt.id).values(values))
        reminder = (
            await session.execute(
                select(Reminder.bound_call_id, Reminder.status, Reminder.no_answer_retries, Appointment.starts_at,
                       Appointment.timezone, Appointment.status.label("appointment_status"))
                .join(Appointment, Appointment.id == Reminder.appointment_id)
                .where(Reminder.id == stamp.reminder_id)
                .with_for_update(of=Reminder)
            )
        ).first()
        outcome, retry_at = None, None
        if applies and status in FINAL_CALL_STATES and reminder is not None and reminder.bound_call_id is None:
            if not await _other_calls_alive(session, stamp):
                outcome, retry_at = await _unanswered(session, stamp, reminder, status, now, policy)
        await session.commit()
    if outcome is not None:
        CALL_OUTCOMES.labels(outcome.value).inc()
    bound = reminder.bound_call_id if reminder is not None else None
    cancel = [call_id] if bound is not None and bound != call_id and applies and status in PRE_ANSWER_STATES else []
    return EventResult(known=True, cancel=cancel, outcome=outcome, retry_at=retry_at)


async def _other_calls_alive(session: Any, stamp: Stamp) -> bool:
    """Whether another attempt of the reminder may still ring or be answered (an attempt whose
    result is unknown counts: its call may exist)."""
    others = await session.execute(
        select(CallAttempt.state, CallAttempt.call_status)
        .where(CallAttempt.reminder_id == stamp.reminder_id, CallAttempt.id != stamp.attempt_id)
    )
    return any(state != AttemptState.NOT_CREATED and call_status not in FINAL_CALL_STATES
               for state, call_status in others)


async def _unanswered(
    session: Any, stamp: Stamp, reminder: Any, status: str, now: datetime, policy: NoAnswerPolicy | None
) -> tuple[ReminderOutcome | None, datetime | None]:
    """The reminder's last live call ended without an answer: record the outcome, and retry if due."""
    outcome = outcome_of_final(status)
    if outcome is None:
        return None, None
    retry_at = None
    # a call placed (`sent`), or one whose events beat the create's response (`dispatching`)
    if (policy is not None and reminder.status in (ReminderStatus.SENT, ReminderStatus.DISPATCHING)
            and reminder.appointment_status == AppointmentStatus.SCHEDULED):
        retry_at = retry_time(policy, outcome=outcome, retries_used=reminder.no_answer_retries, now=now,
                              starts_at=reminder.starts_at, timezone=reminder.timezone)
    statement = update(Reminder).where(Reminder.id == stamp.reminder_id, Reminder.bound_call_id.is_(None))
    if retry_at is None:
        await session.execute(statement.values(outcome=outcome))
        return outcome, None
    # sent → pending (or dispatching → pending when the event beat the create's response: the
    # dispatcher's late `sent` is then refused, the reminder being no longer its claim)
    require(reminder.status, ReminderStatus.PENDING)
    await session.execute(
        statement.where(Reminder.status == reminder.status)
        .values(outcome=outcome, status=ReminderStatus.PENDING, next_attempt_at=retry_at,
                no_answer_retries=Reminder.no_answer_retries + 1,
                last_error=f"{outcome.value.replace('_', ' ')}: calling again")
    )
    return outcome, retry_at


def _wording(row: Any, fallback: Fallback) -> Wording:
    return Wording.from_json(row.wording) if row.wording else fallback(row)


async def answer(
    db: Database, stamp: Stamp, call_id: str, now: datetime, *, machine: bool = False,
    fallback: Fallback, heard_later: bool = False,
) -> Answer:
    """Bind `call_id` to its reminder if none is bound yet; say whether it may speak, and what.

    `machine`: the provider detected an answering machine (the outcome is then `voicemail`).
    `heard_later`: the message is a later command (Telnyx): bound without an outcome, which
    `mark_heard` records when the speech begins. A call already over is never bound (a late,
    repeated answer)."""
    async with db.session() as session:
        attempt = await _attempt_for(session, stamp, call_id)
        if attempt is None or is_final(attempt.call_status):
            await session.rollback()
            return Answer(speak=False, over=attempt is not None)
        await session.execute(
            update(CallAttempt)
            .where(CallAttempt.id == attempt.id)
            .values(provider_call_id=call_id, last_event_at=now)
        )
        scheduled = exists().where(
            Appointment.id == Reminder.appointment_id, Appointment.status == AppointmentStatus.SCHEDULED
        )
        outcome = ReminderOutcome.VOICEMAIL if machine else ReminderOutcome.ANSWERED
        bound = await session.execute(
            update(Reminder)
            .where(
                Reminder.id == stamp.reminder_id,
                Reminder.bound_call_id.is_(None),
                Reminder.status.not_in((ReminderStatus.CANCELLED, ReminderStatus.SKIPPED)),
                scheduled,
            )
            .values(bound_call_id=call_id, bound_attempt_id=stamp.attempt_id,
                    outcome=None if heard_later else outcome, answered_at=now)
            .execution_options(synchronize_session=False)
        )
        newly_bound = bound.rowcount == 1
        row = (
            await session.execute(
                select(Reminder.bound_call_id, Reminder.outcome, Reminder.wording, Appointment.customer_name,
                       Appointment.starts_at, Appointment.timezone, Appointment.language)
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
                    or_(CallAttempt.call_status.is_(None), CallAttempt.call_status.in_(PRE_ANSWER_STATES)),
                )
            )
            cancel = [other for (other,) in others]
        await session.commit()
    if newly_bound and not heard_later:
        CALL_OUTCOMES.labels(outcome.value).inc()
    if not speak:
        return Answer(speak=False, newly_bound=newly_bound, cancel=cancel)
    assert row is not None
    return Answer(speak=True, wording=_wording(row, fallback), machine=row.outcome == ReminderOutcome.VOICEMAIL,
                  newly_bound=newly_bound, cancel=cancel)


async def keypad(
    db: Database, stamp: Stamp, call_id: str, digits: str | None, now: datetime, *, fallback: Fallback
) -> KeypadResult:
    """Apply the digits pressed on `call_id`: only the reminder's bound call may answer. 1 confirms
    the appointment, 2 declines it (the appointment and its pending reminders are cancelled)."""
    answer_ = keypad_answer(digits)
    found = await db.write(_keypad, stamp, call_id, answer_, now)
    if found is None:
        return KeypadResult(bound=False)
    row, changed = found
    now_confirmation = answer_ if changed else (Confirmation(row.confirmation) if row.confirmation else None)
    if changed:
        CONFIRMATIONS.labels(answer_.value).inc()  # type: ignore[union-attr]
    return KeypadResult(bound=True, answer=answer_, confirmation=now_confirmation, wording=_wording(row, fallback),
                        changed=changed)


def _keypad(connection: Connection, stamp: Stamp, call_id: str, answer_: Confirmation | None,
            now: datetime) -> tuple[Any, bool] | None:
    """The reminder's row and whether `answer_` changed the appointment; None if `call_id` is not
    the reminder's bound call."""
    row = connection.execute(
        select(Reminder.bound_call_id, Reminder.bound_attempt_id, Reminder.wording, Appointment.id,
               Appointment.status, Appointment.confirmation, Appointment.customer_name,
               Appointment.starts_at, Appointment.timezone, Appointment.language)
        .join(Appointment, Appointment.id == Reminder.appointment_id)
        .where(Reminder.id == stamp.reminder_id)
        .with_for_update(of=Appointment)
    ).first()
    if row is None or row.bound_call_id != call_id or row.bound_attempt_id != stamp.attempt_id:
        return None
    if answer_ is None or row.status != AppointmentStatus.SCHEDULED:
        return row, False
    if answer_ is Confirmation.DECLINED:
        cancel_appointment(connection, row.id, DECLINED_BY_CUSTOMER, now, confirmation=answer_)
        return row, True
    connection.execute(update(Appointment).where(Appointment.id == row.id)
                       .values(confirmation=answer_, updated_at=now))
    return row, row.confirmation != answer_


async def mark_heard(db: Database, stamp: Stamp, call_id: str, *, machine: bool = False) -> bool:
    """The bound call's message has begun (Telnyx's `call.speak.started` / `.ended`, the gather's
    speech accepted; in any order): the reminder's outcome is `answered` (`voicemail` for a
    machine), recorded once. False if the call is not the bound one."""
    outcome = ReminderOutcome.VOICEMAIL if machine else ReminderOutcome.ANSWERED
    bound_here = (Reminder.id == stamp.reminder_id, Reminder.bound_call_id == call_id,
                  Reminder.bound_attempt_id == stamp.attempt_id)
    async with db.session() as session:
        first = await session.execute(
            update(Reminder).where(*bound_here, Reminder.outcome.is_(None)).values(outcome=outcome)
            .execution_options(synchronize_session=False)
        )
        bound = (await session.execute(select(Reminder.id).where(*bound_here))).first() is not None
        await session.commit()
    if first.rowcount == 1:
        CALL_OUTCOMES.labels(outcome.value).inc()
    return bound
