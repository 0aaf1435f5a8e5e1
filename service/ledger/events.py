"""Events for the booking system: their types, their body, and their insert into the outbox — in
the caller's transaction, so an event commits with the change it reports and rolls back with it
(docs/decisions/0251). The ledger's writers call it; `service.ledger.outbox` numbers, delivers and
prunes what it inserted.

A body is `{"id", "type", "timestamp", "data"}`; `data` always holds `appointment_id` (null for a
`phone.opted_out` that affects no appointment) and `source`, and never a phone number unmasked.
`reminder.finished` is emitted once per reminder (a unique key), by whichever write makes it
`finished()`: no status change can follow — `failed`, `skipped`, `cancelled`, or `sent` by the
generic provider, or `sent` by a real provider with its outcome known and no call left that may
ring (an answered call is bound: nothing follows it either). A reminder stored finished by the
create or a re-plan (its number listed, its appointment confirmed) made no transition: none; nor
one a re-plan deletes (docs/decisions/0125).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson
from sqlalchemy import and_, bindparam, exists, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from service.db.clock import UTCDateTime, db_now
from service.db.models import Appointment, AppointmentStatus, AttemptState, CallAttempt, Event, Reminder, new_id
from service.privacy import scrub
from service.reminders.lifecycle import ReminderStatus
from service.reminders.outcomes import FINAL_CALL_STATES
from service.sql import none_of, one_of

__all__ = [
    "FINISHED", "FINISHED_COLUMNS", "EventSource", "EventType", "body", "bound_and_finished", "emit", "event_row",
    "finished_in", "finished_rows", "insert", "INSERT_ONE", "opted_out", "reminders_finished",
]


class EventType(StrEnum):
    """What happened; the list can grow (a receiver ignores a type it does not know)."""

    APPOINTMENT_CONFIRMED = "appointment.confirmed"  # the customer's 1
    APPOINTMENT_DECLINED = "appointment.declined"  # the customer's 2: the appointment is cancelled too
    APPOINTMENT_CANCELLED = "appointment.cancelled"  # the API's DELETE
    REMINDER_FINISHED = "reminder.finished"  # no status change can follow
    PHONE_OPTED_OUT = "phone.opted_out"  # the number is on the do-not-call list


class EventSource(StrEnum):
    """Who caused it: the API, the customer's keypad on a reminder call or on a call they placed
    (`call-back`), or the service itself (a call's outcome, the dispatcher)."""

    API = "api"
    KEYPAD = "keypad"
    CALL_BACK = "call-back"
    SYSTEM = "system"


def body(event_id: str, type_: EventType, at: datetime, data: Mapping[str, Any]) -> str:
    """The event as JSON text: what the feed shows and every delivery try sends, byte for byte."""
    return orjson.dumps({"id": event_id, "type": type_.value, "timestamp": at, "data": data},
                        option=orjson.OPT_UTC_Z).decode()


def event_row(type_: EventType, source: EventSource, appointment_id: str | None, at: datetime, *,
              dedupe: str | None = None, **data: Any) -> dict[str, Any]:
    """A new event's row (for `insert`): its own id, its body."""
    event_id = new_id()
    full = {"appointment_id": appointment_id, "source": source.value, **data}
    return {"id": event_id, "type": type_.value, "appointment_id": appointment_id, "created_at": at,
            "body": body(event_id, type_, at, full), "dedupe": dedupe}


# The INSERT that drops a row whose `dedupe` key exists, the same SQL on PostgreSQL and SQLite. Text,
# not `postgresql.insert(...).on_conflict_do_nothing()`: SQLAlchemy 2.0 caches no dialect-specific
# INSERT, and compiled it again for every event (a tenth of a Telnyx webhook's CPU with the id's record).
INSERT_ONE = text(
    "INSERT INTO events (id, type, appointment_id, body, dedupe, created_at) "
    "VALUES (:id, :type, :appointment_id, :body, :dedupe, :created_at) ON CONFLICT (dedupe) DO NOTHING"
).bindparams(bindparam("created_at", type_=UTCDateTime()))


def insert(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """The events of `rows`, in the caller's transaction; a row whose `dedupe` key exists already
    is dropped. One row (a webhook's): the text statement built once. Several (a batch of outcomes):
    the dialect's INSERT, compiled per batch but sent as multi-row INSERTs (SQLAlchemy's
    insertmanyvalues), where the text one would be one execution per row."""
    if len(rows) == 1:
        connection.execute(INSERT_ONE, rows)
    elif rows:
        dialect_insert = postgresql.insert if connection.dialect.name != "sqlite" else sqlite.insert
        connection.execute(dialect_insert(Event).on_conflict_do_nothing(index_elements=[Event.dedupe]), rows)


def emit(connection: Connection, type_: EventType, source: EventSource, appointment_id: str | None, at: datetime,
         **data: Any) -> None:
    """Insert one event, in the caller's transaction."""
    insert(connection, [event_row(type_, source, appointment_id, at, **data)])


# -- reminder.finished -------------------------------------------------------------------------------

_R, _C = Reminder.__table__, CallAttempt.__table__
_S = ReminderStatus
_ATTEMPTED = exists().where(_C.c.reminder_id == _R.c.id)
# a call of the reminder that may still ring or be answered (an attempt of unknown fate counts)
_LIVE_CALL = exists().where(_C.c.reminder_id == _R.c.id, _C.c.state != AttemptState.NOT_CREATED,
                            or_(_C.c.call_status.is_(None), none_of(_C.c.call_status, FINAL_CALL_STATES)))
# No status change can follow (service.reminders.lifecycle; service.ledger.cancellation's
# `_UNFINISHED` and the no-answer retry need an unbound `sent` without an outcome, or a live call).
FINISHED = or_(
    one_of(_R.c.status, (_S.FAILED, _S.CANCELLED, _S.SKIPPED)),
    and_(_R.c.status == _S.SENT,
         or_(~_ATTEMPTED, and_(_R.c.outcome.is_not(None), or_(_R.c.bound_call_id.is_not(None), ~_LIVE_CALL)))),
)
# what a reminder.finished says of its reminder (`finished_rows`)
FINISHED_COLUMNS = (_R.c.id, _R.c.appointment_id, _R.c.status, _R.c.outcome, _R.c.skip_reason, _R.c.last_error)
_FINISHED_ROWS = (
    select(*FINISHED_COLUMNS, db_now().label("now"))
    .where(_R.c.id.in_(bindparam("ids", expanding=True)), FINISHED)
)


def _reason(row: Any) -> str | None:
    text = row.skip_reason if row.status in (_S.SKIPPED, _S.CANCELLED) else row.last_error
    return scrub(text)[:200] if text else None


def finished_rows(reminders: Iterable[Any], source: EventSource, at: datetime) -> list[dict[str, Any]]:
    """`reminder.finished` rows for `reminders` (rows with id, appointment_id, status, outcome,
    skip_reason, last_error), each known finished by its writer."""
    return [event_row(EventType.REMINDER_FINISHED, source, row.appointment_id, at,
                      dedupe=f"{EventType.REMINDER_FINISHED.value}:{row.id}", reminder_id=row.id, status=row.status,
                      outcome=row.outcome, reason=_reason(row))
            for row in reminders]


def reminders_finished(connection: Connection, reminder_ids: Collection[str], source: EventSource) -> None:
    """`reminder.finished` for each of `reminder_ids` that is `FINISHED` now and has none yet, in the
    caller's transaction (every write that may finish a reminder calls this, or `finished_rows`,
    with the ones it touched)."""
    if not reminder_ids:
        return
    rows = connection.execute(_FINISHED_ROWS, {"ids": list(reminder_ids)}).all()
    insert(connection, finished_rows(rows, source, rows[0].now) if rows else [])


def bound_and_finished(connection: Connection, reminder: Any, source: EventSource, at: datetime) -> None:
    """`reminder.finished` for a reminder this transaction has just bound to its call with an
    outcome (`reminder`: its FINISHED_COLUMNS, as the binding UPDATE returned them). FINISHED's case
    of a bound reminder with an outcome: `sent` is finished; `pending` or `dispatching` (the answer
    beat the create's response) is finished by the dispatcher's `sent` later."""
    if reminder.status == _S.SENT:
        insert(connection, finished_rows([reminder], source, at))


def finished_in(session: Session, reminder_ids: Collection[str], source: EventSource) -> None:
    """`reminders_finished` in an AsyncSession's transaction (`await session.run_sync(finished_in, …)`)."""
    reminders_finished(session.connection(), reminder_ids, source)


# -- phone.opted_out ---------------------------------------------------------------------------------


def opted_out(connection: Connection, phone_hash: str, masked_phone: str, source: EventSource,
              at: datetime) -> list[dict[str, Any]]:
    """`phone.opted_out` rows: one per appointment of the number still ahead (scheduled, not
    started), or one with `appointment_id` null when there is none."""
    ahead = connection.execute(
        select(Appointment.id).where(Appointment.phone_hash == phone_hash,
                                     Appointment.status == AppointmentStatus.SCHEDULED, Appointment.starts_at > at)
        .order_by(Appointment.starts_at, Appointment.id)
    ).scalars().all()
    return [event_row(EventType.PHONE_OPTED_OUT, source, appointment_id, at, phone=masked_phone)
            for appointment_id in (ahead or [None])]
