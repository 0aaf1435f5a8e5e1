"""What a provider's call events do to reminders and call attempts, for every provider (Twilio,
Telnyx): the ledger's part of the webhooks. Each operation is one transaction, keyed by the stamp
(reminder id + attempt id) the provider hands back, on the database's clock (service.db.clock).

- `record_event`: a status event. The call's id is recorded from whichever comes first (this or
  the create's response); the status moves only forward, by state and then by the provider's order
  (Twilio's SequenceNumber, Telnyx's occurred_at): a duplicated or late event changes nothing, and
  an event id already applied (Telnyx redelivers) is recognised. When the reminder's last live call
  ends unanswered, its `outcome` is recorded (`no_answer`, `busy`, `failed`) and, for no answer /
  busy with NO_ANSWER_RETRIES left, a reminder of the appointment's current plan goes back to
  `pending` for another call after NO_ANSWER_RETRY_DELAY. A call that was answered (`completed`)
  but never bound — no event of its answer came before it ended, so nothing was said into it —
  is called again at once (at most `UNHEARD_RECALLS` times per reminder), unless a fax answered.
- `answer`: a call was answered. The first answered call of a current reminder (its appointment
  scheduled, its plan the appointment's, not finished) is bound to it — a conditional UPDATE: first
  answer wins, on any replica — and speaks; any other answered call hangs up silently, a fax too.
- `command_greeting` / `greeting_sent`: where speech is a command (Telnyx), the bound call's first
  words are recorded as commanded BEFORE the command is sent, once per call (docs/decisions/0221).
- `keypad`: digits from the bound call of a current reminder, each keypad round once, pressed
  while the call was live: 1 confirms the appointment, 2 declines it (the appointment is cancelled,
  its unfinished reminders superseded). Any other digits change nothing.
- `mark_heard`: the bound call's message has begun (Telnyx's speech events): its outcome.
- `CallEvent`: a provider's event applied in the transaction of what it sets off (`answer`,
  `command_greeting`, `keypad`, `heard_event`), so that a Telnyx event is one transaction
  (docs/decisions/0261).

`record_event` and `answer` tell the caller which of the reminder's other calls to end now that one
is bound. Unknown, mismatched and replayed events change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, String, and_, bindparam, case, exists, or_, select, text, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.orm import aliased

from service.db import Database
from service.db.clock import SQLITE_NOW, db_now
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
from service.ledger import events
from service.ledger.cancellation import CALLED_BACK, DECLINED_BY_CUSTOMER, cancel_appointment, skip_confirmed
from service.ledger.consent import Listing, ListingSource, hash_phone, list_number
from service.ledger.events import (
    FINISHED_COLUMNS,
    EventSource,
    EventType,
    bound_and_finished,
    event_row,
    reminders_finished,
)
from service.metrics import CALL_OUTCOMES, CONFIRMATIONS, OPT_OUTS, SKIPPED_BY_CONSENT
from service.privacy import mask_phone
from service.reminders import (
    Answerer,
    NoAnswerPolicy,
    Wording,
    advances,
    keypad_answer,
    opts_out,
    outcome_of_final,
    retry_time,
    round_bit,
)
from service.reminders.lifecycle import require
from service.reminders.outcomes import (
    CALL_SPEAKING,
    CALL_SPOKEN,
    FINAL_CALL_STATES,
    LIVE_CALL_STATES,
    PRE_ANSWER_STATES,
    RANG_STATES,
    advances_clause,
    answerer,
)
from service.sql import one_of
from service.telephony.provider import GreetingWords, Stamp

__all__ = [
    "ANSWERED_UNHEARD",
    "UNHEARD_RECALLS",
    "Answer",
    "EventResult",
    "Fallback",
    "Greeting",
    "KeypadResult",
    "SPEAKING",
    "SPOKEN",
    "ANSWERED",
    "BIND",
    "BOUND_HERE",
    "FIRST_TIME",
    "HEARD",
    "PROGRESS",
    "CallEvent",
    "answer",
    "command_greeting",
    "greeting_sent",
    "greeting_words",
    "heard_event",
    "is_final",
    "keypad",
    "mark_heard",
    "record_event",
]

# Providers whose speech is a command (Telnyx): the bound call's message has begun / ended.
SPEAKING, SPOKEN = CALL_SPEAKING, CALL_SPOKEN
# A reminder that may still bind its call: not finished, not cancelled or skipped.
_BINDABLE = (ReminderStatus.PENDING, ReminderStatus.DISPATCHING, ReminderStatus.SENT)
# An answered call that ended before any event of its answer was applied (lost, or later than the
# callee waited in silence): nobody heard a word; the reminder is called again, this often at most.
ANSWERED_UNHEARD = "released: answered, but it ended before any event of its answer came"
UNHEARD_RECALLS = 2

# (row with customer_name, starts_at, timezone, language) → the words, for a reminder planned
# before its wording was stored
Fallback = Callable[[Any], Wording]


@dataclass(frozen=True)
class EventResult:
    known: bool  # the stamp names an attempt of that reminder, and the call id matches
    cancel: list[str] = field(default_factory=list)  # calls to end: the reminder is bound elsewhere
    outcome: ReminderOutcome | None = None  # recorded by this event (the reminder's last call ended unanswered)
    retry_at: datetime | None = None  # set: the reminder is `pending` again, called at this time
    duplicate: bool = False  # the event (by its id) was applied before: nothing done
    recalled: bool = False  # an answered call ended unbound, unheard: the reminder is called again now


@dataclass(frozen=True)
class Answer:
    speak: bool  # True: this is the reminder's bound call, say `wording`
    wording: Wording | None = None
    machine: bool = False  # the bound call was answered by a machine: the voicemail, no prompt
    newly_bound: bool = False
    cancel: list[str] = field(default_factory=list)  # the reminder's other calls, still pre-answer
    over: bool = False  # the call had already ended (a late or repeated answer): nothing to hang up
    incoming: bool = False  # a call the customer placed (a call-back): no machine detection to wait for
    event: EventResult = EventResult(known=True)  # what the event it came with did (`answer(event=)`)
    greeting: Greeting | None = None  # the greeting recorded with the answer (`answer(greet=)`)


@dataclass(frozen=True)
class Greeting:
    """The bound call's first words where speech is a command: `send` — this caller recorded the
    greeting and sends its command (`words`) now; otherwise it was commanded before."""

    send: bool
    words: GreetingWords | None = None
    bound: bool = True  # False: not the bound call of a current reminder (hang it up)


def greeting_words(kind: Answerer, wording: Wording) -> GreetingWords:
    """What the greeting of `kind` says: to a person the message and the keypad question, to a
    machine the voicemail. The same for every sender of the one greeting command of a call."""
    if kind is Answerer.MACHINE:
        return GreetingWords(machine=True, text=wording.voicemail, language=wording.language)
    return GreetingWords(machine=False, text=f"{wording.message} {wording.question}", language=wording.language)


@dataclass(frozen=True)
class KeypadResult:
    bound: bool  # the digits came from the bound call of a current reminder
    answer: Confirmation | None = None  # what the digits say (None: nothing usable, or the opt-out)
    confirmation: Confirmation | None = None  # the appointment's confirmation now
    wording: Wording | None = None
    changed: bool = False  # this request recorded it (not a repeat)
    repeated: bool = False  # this round was answered before (a replay): nothing recorded
    opted_out: bool = False  # the digits were the opt-out key: the number is on the do-not-call list
    # where the digits came from: `keypad` (a reminder call we placed) or `call-back` (a call the
    # customer placed, docs/decisions/0252): the `data.source` of the event the change reports
    source: EventSource = EventSource.KEYPAD
    event: EventResult = EventResult(known=True)  # what the event it came with did (`keypad(event=)`)


def is_final(status: str | None) -> bool:
    """The call is over (completed, busy, no-answer, canceled, failed)."""
    return status in FINAL_CALL_STATES


def _current() -> Any:
    """A WHERE clause: the reminder belongs to its appointment's current plan, and the appointment
    is scheduled (not cancelled or declined)."""
    return exists().where(Appointment.id == Reminder.appointment_id, Appointment.plan == Reminder.plan,
                          Appointment.status == AppointmentStatus.SCHEDULED)


# The statements below in capitals are public because `python -m bench webhooks` compiles the very
# same ones for its floors (bench/bare_webhooks.py).

# A provider's event id, recorded unless it was before (one text statement per database, built
# once: SQLAlchemy 2.0 caches no dialect-specific INSERT and compiled this one for every event).
FIRST_TIME = {
    dialect: text(f"INSERT INTO provider_events (id, received_at) VALUES (:event_id, {now}) "
                  "ON CONFLICT (id) DO NOTHING RETURNING id")
    for dialect, now in (("postgresql", "now()"), ("sqlite", f"{SQLITE_NOW}(0.0)"))
}


def _first_time(connection: Connection, event_id: str | None) -> bool:
    """Record a provider event id; False when it was recorded before (a redelivery)."""
    if not event_id:
        return True
    return connection.execute(FIRST_TIME[connection.dialect.name], {"event_id": event_id[:160]}).first() is not None


_ATTEMPT_COLUMNS = (
    CallAttempt.id, CallAttempt.reminder_id, CallAttempt.provider_call_id, CallAttempt.last_sequence,
    CallAttempt.call_status, CallAttempt.greeting, CallAttempt.greeting_at, CallAttempt.keypad_rounds,
    CallAttempt.ended_at, CallAttempt.answered_by, CallAttempt.rang_at, CallAttempt.state,
)


_BOUND_CALL = (select(Reminder.bound_call_id).where(Reminder.id == CallAttempt.reminder_id)
               .correlate(CallAttempt).scalar_subquery().label("bound_call_id"))
_ATTEMPT = (select(*_ATTEMPT_COLUMNS, db_now().label("now"), _BOUND_CALL)
            .where(CallAttempt.id == bindparam("attempt_id")).with_for_update(of=CallAttempt))


def _attempt(connection: Connection, stamp: Stamp, call_id: str) -> Row[Any] | None:
    """The attempt's row (locked on PostgreSQL), its reminder's bound call id (read, not locked)
    and the database's time, if the stamp is consistent and the call id matches."""
    row = connection.execute(_ATTEMPT, {"attempt_id": stamp.attempt_id}).first()
    if row is None or row.reminder_id != stamp.reminder_id:
        return None
    if row.provider_call_id is not None and row.provider_call_id != call_id:
        return None
    return row


_ATTEMPT_UPDATES: dict[frozenset[str], Any] = {}


def _attempt_update(columns: frozenset[str]) -> Any:
    """The attempt's UPDATE of `columns`, built once per set of them (a statement built
    per call costs more CPU than its round trip: SQLAlchemy caches its key on the object)."""
    statement = _ATTEMPT_UPDATES.get(columns)
    if statement is None:
        statement = _ATTEMPT_UPDATES[columns] = (
            update(CallAttempt).where(CallAttempt.id == bindparam("attempt_id", type_=String))
            .values({name: bindparam(name, type_=CallAttempt.__table__.c[name].type) for name in sorted(columns)}))
    return statement


# -- status events ---------------------------------------------------------------------------------


async def record_event(
    db: Database, stamp: Stamp, call_id: str, status: str | None, order: int | None,
    policy: NoAnswerPolicy | None = None, *, event_id: str | None = None, ended_at: datetime | None = None,
) -> EventResult:
    """Apply one status event of call `call_id` (`status` None: an event that moves no state, e.g.
    digits gathered; `order`: the provider's order of the call's events, if it gives one;
    `event_id`: the provider's id of the event, if it gives one; `ended_at`: the provider's time of
    a final event). `policy` None: no retries.

    An event that ends nothing (most of a call's events) is one UPDATE: on PostgreSQL without a
    transaction of its own when the provider gives no event id (Twilio), with the event id's record
    when it does (Telnyx). A final event may finish the reminder: a transaction that locks it."""
    if not is_final(status):
        if event_id:
            return await db.write(_record_progress_once, stamp, call_id, status, order, event_id)
        return await db.write_one(_record_progress, stamp, call_id, status, order)
    result = await db.write(_record_final, stamp, call_id, status, order, policy, event_id, ended_at)
    if result.outcome is not None:
        CALL_OUTCOMES.labels(result.outcome.value).inc()
    return result


_CALL = bindparam("call_id", type_=String)
_EVENT_ORDER = bindparam("order", type_=BigInteger)
# The attempt named by the stamp, if the call id is the attempt's (or it has none yet).
_TOUCH = (
    update(CallAttempt)
    .where(CallAttempt.id == bindparam("attempt_id", type_=String),
           CallAttempt.reminder_id == bindparam("stamp_reminder_id", type_=String),
           or_(CallAttempt.provider_call_id.is_(None), CallAttempt.provider_call_id == _CALL))
    .values(last_event_at=db_now(), provider_call_id=_CALL)
    .returning(CallAttempt.call_status, _BOUND_CALL)
)


def _progress(status: str) -> Any:
    """`_TOUCH`, and an event of state `status` moves the call on by `advances` (SET sees the row
    as it was before the update)."""
    applies = advances_clause(CallAttempt.call_status, CallAttempt.last_sequence, status, _EVENT_ORDER)
    values: dict[str, Any] = {
        "call_status": case((applies, status), else_=CallAttempt.call_status),
        "last_sequence": case((and_(applies, _EVENT_ORDER.is_not(None)), _EVENT_ORDER),
                              else_=CallAttempt.last_sequence),
    }
    if status in RANG_STATES:  # it reached the number, whatever comes after (a cap counts it)
        values["rang_at"] = case((and_(CallAttempt.rang_at.is_(None), CallAttempt.state != AttemptState.INCOMING),
                                  db_now()), else_=CallAttempt.rang_at)
    return _TOUCH.values(values)


# one statement per state an event can move a call to without ending it, built once
PROGRESS = {status: _progress(status) for status in LIVE_CALL_STATES | {"answered"}}


def _record_progress(connection: Connection, stamp: Stamp, call_id: str, status: str | None,
                     order: int | None) -> EventResult:
    """An event that ends nothing: the call's id, its state moved on, in one UPDATE. Its reminder
    is not touched: only the call, if it still rings while its reminder is bound to another, is to
    end (the event need not be the one that moved it: ending it again is harmless)."""
    params = {"attempt_id": stamp.attempt_id, "stamp_reminder_id": stamp.reminder_id, "call_id": call_id}
    progress = PROGRESS.get(status) if status is not None else None
    row = connection.execute(_TOUCH if progress is None else progress, {**params, "order": order}).first()
    if row is None:
        return EventResult(known=False)
    still_rings = status in PRE_ANSWER_STATES and row.call_status == status
    bound = row.bound_call_id
    return EventResult(known=True, cancel=[call_id] if still_rings and bound is not None and bound != call_id else [])


def _record_progress_once(connection: Connection, stamp: Stamp, call_id: str, status: str | None, order: int | None,
                          event_id: str) -> EventResult:
    if not _first_time(connection, event_id):
        return EventResult(known=True, duplicate=True)
    return _record_progress(connection, stamp, call_id, status, order)


@dataclass(frozen=True)
class CallEvent:
    """A provider's event of a call, applied in the transaction of what it sets off (Telnyx: the
    binding, the greeting's record, the keypad answer, the message heard), so that one event is
    one transaction: its id remembered (a redelivery is recognised), the call's state moved on
    (`status` None: an event of no state). Never a final event: `record_event` applies those."""

    status: str | None
    order: int | None = None
    event_id: str | None = None


def _apply_event(connection: Connection, stamp: Stamp, call_id: str, event: CallEvent | None) -> EventResult:
    """`event` applied as `record_event` applies it (None: nothing to apply, a known call)."""
    if event is None:
        return EventResult(known=True)
    assert not is_final(event.status), "a final event is record_event's"
    if not _first_time(connection, event.event_id):
        return EventResult(known=True, duplicate=True)
    return _record_progress(connection, stamp, call_id, event.status, event.order)


def _record_final(connection: Connection, stamp: Stamp, call_id: str, status: str | None, order: int | None,
                  policy: NoAnswerPolicy | None, event_id: str | None, ended_at: datetime | None) -> EventResult:
    """A final event: the call is over. A reminder bound to a call was finished when it was bound
    (its outcome recorded then): only the call is updated. An unbound one is locked and read again,
    and its outcome follows from its calls (no answer, busy, retried; answered but unheard: called again)."""
    if not _first_time(connection, event_id):
        return EventResult(known=True, duplicate=True)
    attempt = _attempt(connection, stamp, call_id)
    if attempt is None:
        return EventResult(known=False)
    assert status is not None
    now = attempt.now
    values: dict[str, object] = {"last_event_at": now, "provider_call_id": call_id}
    applies = advances(attempt.call_status, attempt.last_sequence, status, order)
    if status in RANG_STATES and attempt.rang_at is None and attempt.state != AttemptState.INCOMING:
        values["rang_at"] = now  # it reached the number, whatever comes after (a cap counts it)
    if applies:
        values["call_status"] = status
        if order is not None:
            values["last_sequence"] = order
        values["ended_at"] = ended_at or now
    connection.execute(_attempt_update(frozenset(values)), {"attempt_id": attempt.id, **values})
    if not applies or attempt.bound_call_id is not None:
        # a binding is never undone: the reminder's outcome and its reminder.finished were written with it
        return EventResult(known=True)
    reminder = connection.execute(
        select(Reminder.bound_call_id, Reminder.status, Reminder.no_answer_retries, Reminder.plan,
               Appointment.plan.label("current_plan"), Appointment.starts_at, Appointment.timezone,
               Appointment.status.label("appointment_status"))
        .join(Appointment, Appointment.id == Reminder.appointment_id)
        .where(Reminder.id == stamp.reminder_id)
        .with_for_update(of=Reminder)
    ).first()
    outcome, retry_at, recalled = None, None, False
    if reminder is not None and reminder.bound_call_id is None:
        if not _other_calls_alive(connection, stamp):
            if status == "completed" and answerer(attempt.answered_by) is not Answerer.FAX:
                recalled = _answered_unheard(connection, stamp, reminder, now)
                retry_at = now if recalled else None
            if not recalled:
                outcome, retry_at = _unanswered(connection, stamp, reminder, status, now, policy)
    reminders_finished(connection, [stamp.reminder_id], EventSource.SYSTEM)  # its last call over: finished?
    return EventResult(known=True, outcome=outcome, retry_at=retry_at, recalled=recalled)


def _answered_unheard(connection: Connection, stamp: Stamp, reminder: Row[Any], now: datetime) -> bool:
    """The reminder's last live call was answered and ended unbound: no event of its answer was
    applied in time (lost, or later than the callee waited), so nothing was said into it (words
    are said only into a bound call). A reminder of the appointment's current plan, scheduled,
    whose call was placed (`sent`) or whose events beat the create's response (`dispatching`), is
    `pending` again, due now — unless it was called again so `UNHEARD_RECALLS` times already."""
    if (reminder.status not in (ReminderStatus.SENT, ReminderStatus.DISPATCHING)
            or reminder.plan != reminder.current_plan or reminder.appointment_status != AppointmentStatus.SCHEDULED):
        return False
    recalls = connection.execute(
        select(CallAttempt.id).where(CallAttempt.reminder_id == stamp.reminder_id,
                                     CallAttempt.error == ANSWERED_UNHEARD)).all()
    if len(recalls) >= UNHEARD_RECALLS:
        return False
    require(reminder.status, ReminderStatus.PENDING)
    moved = connection.execute(
        update(Reminder).where(Reminder.id == stamp.reminder_id, Reminder.bound_call_id.is_(None),
                               Reminder.status == reminder.status)
        .values(status=ReminderStatus.PENDING, next_attempt_at=now,
                last_error="answered, but nothing was said (no event of the answer came in time): calling again")
    )
    if moved.rowcount != 1:
        return False
    connection.execute(update(CallAttempt).where(CallAttempt.id == stamp.attempt_id).values(error=ANSWERED_UNHEARD))
    return True


def _other_calls_alive(connection: Connection, stamp: Stamp) -> bool:
    """Whether another attempt of the reminder may still ring or be answered (an attempt whose
    result is unknown counts: its call may exist)."""
    others = connection.execute(
        select(CallAttempt.state, CallAttempt.call_status)
        .where(CallAttempt.reminder_id == stamp.reminder_id, CallAttempt.id != stamp.attempt_id)
    )
    return any(state != AttemptState.NOT_CREATED and not is_final(call_status) for state, call_status in others)


def _unanswered(connection: Connection, stamp: Stamp, reminder: Row[Any], status: str, now: datetime,
                policy: NoAnswerPolicy | None) -> tuple[ReminderOutcome | None, datetime | None]:
    """The reminder's last live call ended without an answer: record the outcome, and retry if due:
    only a reminder of the appointment's current plan, scheduled, whose call was placed (`sent`) or
    whose events beat the create's response (`dispatching`)."""
    outcome = outcome_of_final(status)
    if outcome is None:
        return None, None
    retry_at = None
    if (policy is not None and reminder.status in (ReminderStatus.SENT, ReminderStatus.DISPATCHING)
            and reminder.plan == reminder.current_plan
            and reminder.appointment_status == AppointmentStatus.SCHEDULED):
        retry_at = retry_time(policy, outcome=outcome, retries_used=reminder.no_answer_retries, now=now,
                              starts_at=reminder.starts_at, timezone=reminder.timezone)
    statement = update(Reminder).where(Reminder.id == stamp.reminder_id, Reminder.bound_call_id.is_(None))
    if retry_at is None:
        if reminder.status == ReminderStatus.DISPATCHING:
            # the event beat the create's response, or its leader died before recording it: the
            # call existed and is over, nothing is to come — `sent`, so that no leader re-claims it
            # and, seeing only a finished call, makes another (the leader's late `sent` is refused)
            require(reminder.status, ReminderStatus.SENT)
            connection.execute(statement.where(Reminder.status == reminder.status)
                               .values(outcome=outcome, status=ReminderStatus.SENT, sent_at=now))
        else:
            connection.execute(statement.values(outcome=outcome))
        return outcome, None
    # sent → pending (or dispatching → pending when the event beat the create's response: the
    # dispatcher's late `sent` is then refused, the reminder being no longer its claim)
    require(reminder.status, ReminderStatus.PENDING)
    connection.execute(
        statement.where(Reminder.status == reminder.status)
        .values(outcome=outcome, status=ReminderStatus.PENDING, next_attempt_at=retry_at,
                no_answer_retries=Reminder.no_answer_retries + 1,
                last_error=f"{outcome.value.replace('_', ' ')}: calling again")
    )
    return outcome, retry_at


# -- answering -------------------------------------------------------------------------------------


def _wording(row: Any, fallback: Fallback) -> Wording:
    return Wording.from_json(row.wording) if row.wording else fallback(row)


_WORDS = (Reminder.bound_call_id, Reminder.outcome, Reminder.wording, Appointment.customer_name,
          Appointment.starts_at, Appointment.timezone, Appointment.language)


@dataclass(frozen=True)
class _Bound:
    """`_answer`'s word for the bound call: its words' row, whether a machine answered, the
    reminder's other calls to end, and the outcome recorded if this request bound it."""

    row: Any
    machine: bool
    cancel: list[str]
    newly_bound: bool
    outcome: ReminderOutcome | None
    incoming: bool = False
    event: EventResult = EventResult(known=True)
    greeting: Greeting | None = None


async def answer(
    db: Database, stamp: Stamp, call_id: str, *, who: Answerer = Answerer.PERSON, answered_by: str | None = None,
    fallback: Fallback, heard_later: bool = False, event: CallEvent | None = None, greet: Answerer | None = None,
) -> Answer:
    """Bind `call_id` to its reminder if none is bound yet; say whether it may speak, and what.

    `who` answered (a machine: the outcome is `voicemail`; a fax is never bound). `heard_later`:
    the message is a later command (Telnyx): bound without an outcome, which `greeting_sent` or
    `mark_heard` records. A call already over is never bound (a late, repeated answer), nor a
    reminder that is finished, superseded by a re-plan, or whose appointment is cancelled.

    In the same transaction: `event`, the provider's event that says so, applied first (an
    unknown call: nothing more; a redelivered one still answers — the binding is once however
    often it is asked); `greet`, the greeting of that kind recorded as `command_greeting` records
    it, if the call may speak."""
    result = await db.write(_answer, stamp, call_id, who, answered_by, heard_later, event, greet, fallback)
    if isinstance(result, Answer):
        return result
    if result.outcome is not None:
        CALL_OUTCOMES.labels(result.outcome.value).inc()
    return Answer(speak=True, wording=_wording(result.row, fallback), machine=result.machine,
                  newly_bound=result.newly_bound, cancel=result.cancel, incoming=result.incoming,
                  event=result.event, greeting=result.greeting)


_OTHER = aliased(CallAttempt)
# The answered call's attempt (locked: one answer of a call at a time, on any replica), its
# reminder's words and binding as they are, and whether the reminder has other calls still ringing.
ANSWERED = (
    select(*_ATTEMPT_COLUMNS, db_now().label("now"), *_WORDS,
           exists().where(_OTHER.reminder_id == CallAttempt.reminder_id, _OTHER.id != CallAttempt.id,
                          _OTHER.provider_call_id.is_not(None),
                          or_(_OTHER.call_status.is_(None), one_of(_OTHER.call_status, PRE_ANSWER_STATES)))
           .label("others_ringing"))
    .join(Reminder, Reminder.id == CallAttempt.reminder_id)
    .join(Appointment, Appointment.id == Reminder.appointment_id)
    .where(CallAttempt.id == bindparam("attempt_id"))
    .with_for_update(of=CallAttempt)
)
# The first answer binds: no call bound yet, the reminder current and not finished; what its
# reminder.finished needs comes back.
BIND = (
    update(Reminder)
    .where(Reminder.id == bindparam("stamp_reminder_id"), Reminder.bound_call_id.is_(None),
           one_of(Reminder.status, _BINDABLE), _current())
    .values(bound_call_id=bindparam("call_id"), bound_attempt_id=bindparam("attempt_id"),
            outcome=bindparam("answer_outcome"), answered_at=bindparam("answered_at"))
    .returning(*FINISHED_COLUMNS)
)


def _answer(connection: Connection, stamp: Stamp, call_id: str, who: Answerer, answered_by: str | None,
            heard_later: bool, event: CallEvent | None, greet: Answerer | None, fallback: Fallback) -> Answer | _Bound:
    applied = _apply_event(connection, stamp, call_id, event)
    if not applied.known:
        return Answer(speak=False, event=applied)
    found = _bind(connection, stamp, call_id, who, answered_by, heard_later)
    if isinstance(found, Answer):
        return replace(found, event=applied, cancel=[*applied.cancel, *found.cancel])
    greeting = _command_greeting(connection, stamp, call_id, greet, fallback) if greet is not None else None
    return replace(found, event=applied, greeting=greeting, cancel=[*applied.cancel, *found.cancel])


def _bind(connection: Connection, stamp: Stamp, call_id: str, who: Answerer, answered_by: str | None,
          heard_later: bool) -> Answer | _Bound:
    attempt = connection.execute(ANSWERED, {"attempt_id": stamp.attempt_id}).first()
    if attempt is None or attempt.reminder_id != stamp.reminder_id or (
            attempt.provider_call_id is not None and attempt.provider_call_id != call_id):
        return Answer(speak=False)
    if is_final(attempt.call_status):
        return Answer(speak=False, over=True)
    values: dict[str, object] = {"provider_call_id": call_id, "last_event_at": attempt.now}
    incoming = attempt.state == AttemptState.INCOMING
    if attempt.rang_at is None and not incoming:
        values["rang_at"] = attempt.now
    if answered_by:
        values["answered_by"] = answered_by[:32]
    connection.execute(_attempt_update(frozenset(values)), {"attempt_id": attempt.id, **values})
    if who is Answerer.FAX:
        return Answer(speak=False)
    outcome = ReminderOutcome.VOICEMAIL if who is Answerer.MACHINE else ReminderOutcome.ANSWERED
    recorded = None if heard_later else outcome
    bound = connection.execute(BIND, {"stamp_reminder_id": stamp.reminder_id, "call_id": call_id,
                                       "attempt_id": stamp.attempt_id, "answer_outcome": recorded,
                                       "answered_at": attempt.now}).first()
    if bound is not None:
        if recorded is not None:
            bound_and_finished(connection, bound, EventSource.SYSTEM, attempt.now)
        cancel = _other_calls_to_end(connection, stamp) if attempt.others_ringing else []
        return _Bound(attempt, recorded == ReminderOutcome.VOICEMAIL, cancel, True, recorded, incoming)
    # not bound now: it speaks only if it was bound before (read under this call's lock: a repeat
    # of its answer); a call bound meanwhile is another call (the same call's answers wait for the lock)
    if attempt.bound_call_id != call_id:
        return Answer(speak=False)
    return _Bound(attempt, attempt.outcome == ReminderOutcome.VOICEMAIL, [], False, None, incoming)


def _other_calls_to_end(connection: Connection, stamp: Stamp) -> list[str]:
    """The reminder's other calls that may still ring: a bound reminder ends them."""
    others = connection.execute(
        select(CallAttempt.provider_call_id).where(
            CallAttempt.reminder_id == stamp.reminder_id,
            CallAttempt.id != stamp.attempt_id,
            CallAttempt.provider_call_id.is_not(None),
            or_(CallAttempt.call_status.is_(None), one_of(CallAttempt.call_status, PRE_ANSWER_STATES)),
        )
    )
    return [other for (other,) in others]


# -- the greeting (speech as a command) ------------------------------------------------------------


BOUND_HERE = (Reminder.bound_call_id, Reminder.bound_attempt_id, Reminder.status, Reminder.skip_reason,
               Reminder.plan, Reminder.outcome,
               Reminder.wording, Appointment.plan.label("current_plan"), Appointment.status.label("appointment_status"),
               Appointment.customer_name, Appointment.starts_at, Appointment.timezone, Appointment.language)


def _bound_and_current(row: Any, stamp: Stamp, call_id: str) -> bool:
    return (row is not None and row.bound_call_id == call_id and row.bound_attempt_id == stamp.attempt_id
            and row.plan == row.current_plan and row.appointment_status == AppointmentStatus.SCHEDULED
            and (row.status != ReminderStatus.SKIPPED or row.skip_reason == CALLED_BACK)
            and row.status != ReminderStatus.CANCELLED)


async def command_greeting(db: Database, stamp: Stamp, call_id: str, kind: Answerer, *,
                           fallback: Fallback) -> Greeting:
    """Record that the bound call's greeting (`kind`: a person's message and question, or a
    machine's voicemail) is about to be commanded — once per call, whoever comes first (an event's
    handler, the leader's sweep). The caller that gets `send` sends the command; a later caller
    finds it recorded and sends nothing (a repeat could speak twice). An event that sets it off
    comes with its binding: `answer(event=, greet=)`."""
    return await db.write(_command_greeting, stamp, call_id, kind, fallback)


def _command_greeting(connection: Connection, stamp: Stamp, call_id: str, kind: Answerer,
                      fallback: Fallback) -> Greeting:
    row = connection.execute(_GREETING_READ, {"attempt_id": stamp.attempt_id}).first()
    if (row is None or row.reminder_id != stamp.reminder_id or row.provider_call_id not in (None, call_id)
            or is_final(row.call_status) or not _bound_and_current(row, stamp, call_id)):
        return Greeting(send=False, bound=False)
    recorded = connection.execute(_GREETING_RECORD, {"attempt_id": row.id, "greeting": kind, "now": row.now})
    if recorded.rowcount != 1:
        return Greeting(send=False)
    return Greeting(send=True, words=greeting_words(kind, _wording(row, fallback)))


# the greeting commanded, once per call
_GREETING_RECORD = (
    update(CallAttempt).where(CallAttempt.id == bindparam("attempt_id", type_=String), CallAttempt.greeting.is_(None))
    .values(greeting=bindparam("greeting", type_=CallAttempt.greeting.type),
            greeting_at=bindparam("now", type_=CallAttempt.greeting_at.type))
)
# the call's attempt (locked: one greeting per call) with its reminder's binding and words
_GREETING_READ = (
    select(*_ATTEMPT_COLUMNS, db_now().label("now"), *BOUND_HERE)
    .join(Reminder, Reminder.id == CallAttempt.reminder_id)
    .join(Appointment, Appointment.id == Reminder.appointment_id)
    .where(CallAttempt.id == bindparam("attempt_id"))
    .with_for_update(of=CallAttempt)
)


async def greeting_sent(db: Database, stamp: Stamp, call_id: str, *, accepted: bool | None) -> None:
    """What the provider said of the greeting's command: `accepted` (the words are under way: the
    reminder's outcome, `answered` or `voicemail`, recorded once), False (the call was already over:
    nothing spoken), None (unknown: the command may have run)."""
    if accepted is None:
        return
    outcome = await db.write(_greeting_sent, stamp, call_id, accepted)
    if outcome is not None:
        CALL_OUTCOMES.labels(outcome.value).inc()


# what the provider said of the greeting's command, once
_GREETING_RESULT = (
    update(CallAttempt)
    .where(CallAttempt.id == bindparam("attempt_id", type_=String), CallAttempt.provider_call_id == _CALL,
           CallAttempt.greeting.is_not(None), CallAttempt.greeting_result.is_(None))
    .values(greeting_result=bindparam("result", type_=CallAttempt.greeting_result.type))
    .returning(CallAttempt.greeting)
)


def _greeting_sent(connection: Connection, stamp: Stamp, call_id: str, accepted: bool) -> ReminderOutcome | None:
    attempt = connection.execute(_GREETING_RESULT, {"attempt_id": stamp.attempt_id, "call_id": call_id,
                                                    "result": "accepted" if accepted else "ended"}).first()
    if attempt is None or not accepted:
        return None
    return _heard(connection, stamp, call_id, Answerer(attempt.greeting) is Answerer.MACHINE)


# The bound call's outcome (`answered`, or `voicemail` for a machine: the key), recorded once; bind
# parameters `reminder_id`, `call_id`, `attempt_id`. The sweep sends it as it is; the webhooks with
# what `reminder.finished` needs returned (`_HEARD`).
HEARD = {
    machine: (
        update(Reminder)
        .where(Reminder.id == bindparam("reminder_id", type_=String), Reminder.bound_call_id == _CALL,
               Reminder.bound_attempt_id == bindparam("attempt_id", type_=String), Reminder.outcome.is_(None))
        .values(outcome=ReminderOutcome.VOICEMAIL if machine else ReminderOutcome.ANSWERED)
    )
    for machine in (False, True)
}
_HEARD = {machine: statement.returning(*FINISHED_COLUMNS, db_now().label("now"))
          for machine, statement in HEARD.items()}
_IS_BOUND = select(Reminder.id).where(
    Reminder.id == bindparam("reminder_id", type_=String), Reminder.bound_call_id == _CALL,
    Reminder.bound_attempt_id == bindparam("attempt_id", type_=String))


def _heard(connection: Connection, stamp: Stamp, call_id: str, machine: bool) -> ReminderOutcome | None:
    """The bound call's outcome, recorded once; the outcome if this recorded it."""
    first = connection.execute(_HEARD[machine], {"reminder_id": stamp.reminder_id, "call_id": call_id,
                                                 "attempt_id": stamp.attempt_id}).first()
    if first is None:
        return None
    bound_and_finished(connection, first, EventSource.SYSTEM, first.now)
    return ReminderOutcome.VOICEMAIL if machine else ReminderOutcome.ANSWERED


async def mark_heard(db: Database, stamp: Stamp, call_id: str, *, machine: bool = False) -> bool:
    """The bound call's message has begun (Telnyx's `call.speak.started` / `.ended`): the reminder's
    outcome is `answered` (`voicemail` for a machine), recorded once. False if the call is not the
    bound one."""
    outcome, bound = await db.write(_mark_heard, stamp, call_id, machine)
    if outcome is not None:
        CALL_OUTCOMES.labels(outcome.value).inc()
    return bound


def _mark_heard(connection: Connection, stamp: Stamp, call_id: str, machine: bool) -> tuple[Any, bool]:
    outcome = _heard(connection, stamp, call_id, machine)
    if outcome is not None:
        return outcome, True
    bound = connection.execute(_IS_BOUND, {"reminder_id": stamp.reminder_id, "call_id": call_id,
                                           "attempt_id": stamp.attempt_id}).first() is not None
    return outcome, bound


async def heard_event(db: Database, stamp: Stamp, call_id: str, event: CallEvent) -> EventResult:
    """A speech event of the call (Telnyx's `call.speak.started` / `.ended`), applied, and — when it
    is new and names a known call — the bound call's message begun (`mark_heard`), in one transaction."""
    applied, outcome = await db.write(_heard_event, stamp, call_id, event)
    if outcome is not None:
        CALL_OUTCOMES.labels(outcome.value).inc()
    return applied


def _heard_event(connection: Connection, stamp: Stamp, call_id: str,
                 event: CallEvent) -> tuple[EventResult, ReminderOutcome | None]:
    applied = _apply_event(connection, stamp, call_id, event)
    if not applied.known or applied.duplicate:
        return applied, None
    return applied, _heard(connection, stamp, call_id, machine=False)


# -- the keypad --------------------------------------------------------------------------------------


async def keypad(
    db: Database, stamp: Stamp, call_id: str, digits: str | None, *, round_: int = 1,
    pressed_at: datetime | None = None, event: CallEvent | None = None, fallback: Fallback,
    call_after_confirmation: bool = False, source: EventSource = EventSource.KEYPAD,
) -> KeypadResult:
    """Apply the digits pressed on `call_id` at keypad round `round_`: only the bound call of a
    current reminder answers, each round once, and only while the call was live (`pressed_at`, the
    provider's time of the digits, not after its hang-up). 1 confirms the appointment (its
    unfinished reminders are skipped, "confirmed", unless `call_after_confirmation`), 2 declines it
    (the appointment is cancelled, its unfinished reminders superseded), the opt-out key its
    wording announced lists the number (every unfinished reminder of its appointments skipped,
    "opted out"). The events say so, from `source` (the keypad of a reminder call, or of a call-back).
    `event`: the provider's event of the digits, applied first in the same transaction (an unknown
    call or a redelivery: nothing more, `result.event` says which)."""
    found = await db.write(_keypad_event, stamp, call_id, digits, round_bit(round_), pressed_at, event, fallback,
                           call_after_confirmation, source)
    if isinstance(found, KeypadResult):
        return found
    if found.changed and found.answer is not None:
        CONFIRMATIONS.labels(found.answer.value).inc()
    if found.listing is not None and found.listing.new:
        OPT_OUTS.labels(ListingSource.KEYPAD.value).inc()
    if found.skipped:
        SKIPPED_BY_CONSENT.labels("opted_out" if found.listing is not None else "confirmed").inc(len(found.skipped))
    return found.result


@dataclass(frozen=True)
class _Pressed:
    result: KeypadResult
    changed: bool = False
    answer: Confirmation | None = None
    listing: Listing | None = None
    skipped: frozenset[str] = frozenset()


def _keypad_event(connection: Connection, stamp: Stamp, call_id: str, digits: str | None, bit: int,
                  pressed_at: datetime | None, event: CallEvent | None, fallback: Fallback,
                  call_after_confirmation: bool, source: EventSource) -> _Pressed | KeypadResult:
    applied = _apply_event(connection, stamp, call_id, event)
    if not applied.known or applied.duplicate:
        return KeypadResult(bound=False, event=applied)
    pressed = _keypad(connection, stamp, call_id, digits, bit, pressed_at, fallback, call_after_confirmation, source)
    return KeypadResult(bound=False, event=applied) if pressed is None else pressed


# The bound call's reminder as the keypad needs it, its appointment locked (one answer at a time),
# the attempt's rounds and end, and the database's time.
KEYPAD_READ = (
    select(*BOUND_HERE, Appointment.id.label("appointment_id"), Appointment.confirmation, Appointment.phone,
           Appointment.phone_hash, CallAttempt.keypad_rounds, CallAttempt.ended_at,
           CallAttempt.state.label("attempt_state"), db_now().label("now"))
    .join(Appointment, Appointment.id == Reminder.appointment_id)
    .join(CallAttempt, CallAttempt.id == bindparam("attempt_id", type_=CallAttempt.id.type))
    .where(Reminder.id == bindparam("reminder_id", type_=Reminder.id.type))
    .with_for_update(of=Appointment)
)
# A keypad round taken (a bit per round).
KEYPAD_ROUND = (
    update(CallAttempt).where(CallAttempt.id == bindparam("attempt_id", type_=CallAttempt.id.type))
    .values(keypad_rounds=CallAttempt.keypad_rounds.op("|")(bindparam("bit", type_=CallAttempt.keypad_rounds.type)))
)
# The appointment's confirmation, as the keypad answered it.
CONFIRM = (
    update(Appointment).where(Appointment.id == bindparam("appointment_id", type_=Appointment.id.type))
    .values(confirmation=bindparam("confirmation", type_=Appointment.confirmation.type),
            updated_at=bindparam("now", type_=Appointment.updated_at.type))
)


def _keypad(connection: Connection, stamp: Stamp, call_id: str, digits: str | None, bit: int,
            pressed_at: datetime | None, fallback: Fallback,
            call_after_confirmation: bool, source: EventSource) -> _Pressed | None:
    """What the digits did; None if `call_id` is not the bound call of a current reminder, or they
    were pressed after it ended."""
    row = connection.execute(KEYPAD_READ, {"attempt_id": stamp.attempt_id, "reminder_id": stamp.reminder_id}).first()
    if not _bound_and_current(row, stamp, call_id):
        return None
    if pressed_at is not None and row.ended_at is not None and pressed_at > row.ended_at:
        return None  # pressed after the call ended: not an answer of this call
    wording = _wording(row, fallback)
    opt_out = opts_out(digits, wording.opt_out_digit)
    answer_ = None if opt_out else keypad_answer(digits)
    confirmation = Confirmation(row.confirmation) if row.confirmation else None
    if row.attempt_state == AttemptState.INCOMING:
        source = EventSource.CALL_BACK  # a call the customer placed (docs/decisions/0252)
    result = KeypadResult(bound=True, answer=answer_, confirmation=confirmation, wording=wording, opted_out=opt_out,
                          source=source)
    if row.keypad_rounds & bit:
        return _Pressed(replace(result, repeated=True))
    connection.execute(KEYPAD_ROUND, {"attempt_id": stamp.attempt_id, "bit": bit})
    if opt_out:
        listing = list_number(connection, row.phone_hash or hash_phone(connection, row.phone), ListingSource.KEYPAD,
                              mask_phone(row.phone), event_source=source)
        return _Pressed(replace(result, changed=listing.new), listing=listing, skipped=listing.skipped)
    if answer_ is None:
        return _Pressed(result)
    now = row.now
    if answer_ is Confirmation.DECLINED:
        cancel_appointment(connection, row.appointment_id, DECLINED_BY_CUSTOMER, now, source=source,
                           confirmation=answer_, reminder_id=stamp.reminder_id)
        return _Pressed(replace(result, confirmation=answer_, changed=True), changed=True, answer=answer_)
    connection.execute(CONFIRM, {"appointment_id": row.appointment_id, "confirmation": answer_, "now": now})
    changed = confirmation != answer_
    rows = [] if call_after_confirmation else skip_confirmed(connection, row.appointment_id, now)
    confirmed = [event_row(EventType.APPOINTMENT_CONFIRMED, source, row.appointment_id, now,
                           reminder_id=stamp.reminder_id, confirmation=answer_.value)] if changed else []
    events.insert(connection, [*confirmed, *events.finished_rows(rows, source, now)])
    skipped = frozenset(skipped_row.id for skipped_row in rows)
    return _Pressed(replace(result, confirmation=answer_, changed=changed), changed=changed, answer=answer_,
                    skipped=skipped)
