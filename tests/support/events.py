"""What the events say, checked against the rows: `reminder.finished` once for every reminder the
service finished, and for none other (service.ledger.events)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, inspect, literal, select
from sqlalchemy.engine import Connection

from service.db import Database
from service.db.models import Appointment, Event, Reminder
from service.ledger.events import FINISHED, EventType

__all__ = ["finished_event_problems"]

_KEY = literal(f"{EventType.REMINDER_FINISHED.value}:") + Reminder.id


# A reminder the service changed after it was made (a test's insert sets created_at and updated_at
# microseconds apart; a reminder stored finished by the create or a re-plan made no transition,
# and has them equal).
_CHANGED_AFTER = timedelta(milliseconds=1)


def _problems(connection: Connection, missing: bool) -> list[str]:
    if "events" not in inspect(connection).get_table_names():
        return []  # a test that left the schema before the outbox
    events = func.count(Event.seq)
    finished = connection.execute(
        select(Reminder.id, Reminder.status, Reminder.outcome, Reminder.created_at, Reminder.updated_at,
               events.label("events"))
        .join(Appointment, Appointment.id == Reminder.appointment_id)
        .outerjoin(Event, Event.dedupe == _KEY)
        # erasure rewrites an appointment's reminders (its words): their updated_at says nothing
        .where(FINISHED, Appointment.erased_at.is_(None))
        .group_by(Reminder.id, Reminder.status, Reminder.outcome, Reminder.created_at, Reminder.updated_at)
    ).all()
    lacking = [row for row in finished if row.events != 1 and row.updated_at - row.created_at > _CHANGED_AFTER
               and missing]
    invented = connection.execute(
        select(Event.dedupe, Reminder.status, Reminder.outcome)
        .outerjoin(Reminder, Event.dedupe == _KEY)
        .where(Event.type == EventType.REMINDER_FINISHED.value, ~FINISHED | Reminder.id.is_(None))
    ).all()
    return ([f"reminder {row.id} ({row.status}, {row.outcome}): {row.events} reminder.finished event(s)"
             for row in lacking]
            + [f"{row.dedupe}: the reminder is {row.status} ({row.outcome}), not finished" for row in invented])


async def finished_event_problems(url: str, *, missing: bool = True) -> list[str]:
    """Every reminder finished by the service has one `reminder.finished` (with `missing`); every
    one names a finished reminder (one of a reminder a re-plan deleted names none: it is never
    emitted)."""
    db = Database(url, pool_size=1)
    try:
        return await db.read(_problems, missing)
    finally:
        await db.dispose()
