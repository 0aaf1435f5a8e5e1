"""An appointment's plan in the database: the create's statement (the appointment with its
reminders) and a change (the appointment's fields, and on a re-plan the old plan's reminders
superseded and the new plan's inserted).

Functions over a SQLAlchemy `Connection`, run by the appointments service inside its one
transaction (`Database.write`, or `write_one` for a create: docs/decisions/0161, 0162).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, bindparam, delete, insert, select, union_all, update
from sqlalchemy.engine import Connection

from service.db.models import Appointment, Reminder, new_id
from service.ledger.cancellation import REPLANNED, supersede
from service.reminders.calls import idempotency_key
from service.reminders.lifecycle import ReminderStatus

__all__ = [
    "APPOINTMENT_INSERT_COLUMNS", "REMINDER_INSERT_COLUMNS", "Replanned", "change_appointment", "insert_appointment",
    "insert_plan", "reminder_row",
]

_A, _R = Appointment.__table__, Reminder.__table__

APPOINTMENT_INSERT_COLUMNS = ("id", "customer_name", "phone", "starts_at", "timezone", "notes", "remind_at", "status",
                              "language", "created_at", "updated_at")
REMINDER_INSERT_COLUMNS = ("id", "appointment_id", "due_at", "next_attempt_at", "status", "attempts",
                           "idempotency_key", "wording", "no_answer_retries", "plan", "created_at", "updated_at")
# Every column named with its type: a create's parameters are exactly these.
_INSERT_APPOINTMENT = insert(_A).values({name: bindparam(name, type_=_A.c[name].type)
                                         for name in APPOINTMENT_INSERT_COLUMNS})
_INSERT_REMINDERS = insert(_R)
# The reminders a re-plan superseded that no leader ever touched (docs/decisions/0125): never
# claimed, cancelled by this re-plan or an earlier one.
_PRUNE_SUPERSEDED = (
    delete(_R)
    .where(
        _R.c.appointment_id == bindparam("of_appointment"), _R.c.attempts == 0, _R.c.fence_token.is_(None),
        _R.c.claimed_at.is_(None), _R.c.status == ReminderStatus.CANCELLED, _R.c.skip_reason == REPLANNED,
    )
    .returning(_R.c.id)
)


def reminder_row(appointment_id: str, due: datetime, wording: dict[str, str], now: datetime, *,
                 plan: int = 0) -> dict[str, Any]:
    """A new `pending` reminder of `appointment_id` due at `due`, as the create and a re-plan insert
    it (every REMINDER_INSERT_COLUMNS): its own id and idempotency key, the words fixed now."""
    reminder_id = new_id()
    return {"id": reminder_id, "appointment_id": appointment_id, "due_at": due, "next_attempt_at": due,
            "status": ReminderStatus.PENDING, "attempts": 0, "idempotency_key": idempotency_key(reminder_id),
            "wording": wording, "no_answer_retries": 0, "plan": plan, "created_at": now, "updated_at": now}


@functools.lru_cache(maxsize=64)
def _create_statement(reminders: int) -> Insert:
    """PostgreSQL: an appointment and `reminders` reminders in ONE statement (the appointment's
    INSERT in a WITH), atomic on its own. Parameters: the appointment's columns by name, reminder
    i's as `r<i>_<column>`."""
    # rows as SELECTs of parameters, not a multi-row VALUES: SQLAlchemy caches the compiled form of
    # these, and compiling a multi-row VALUES on every request cost more than the round trips saved
    rows = [select(*(bindparam(f"r{i}_{name}", type_=_R.c[name].type) for name in REMINDER_INSERT_COLUMNS))
            for i in range(reminders)]
    return (insert(_R).from_select(REMINDER_INSERT_COLUMNS, rows[0] if reminders == 1 else union_all(*rows))
            .add_cte(_INSERT_APPOINTMENT.cte("new_appointment")))


def _insert_reminders(connection: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:  # one executemany: one round trip for all of them
        connection.execute(_INSERT_REMINDERS, rows)


def insert_appointment(connection: Connection, appointment: dict[str, Any], reminders: list[dict[str, Any]]) -> None:
    """The appointment and its (`pending`) reminders: one statement on PostgreSQL; SQLite has no
    INSERT inside WITH, so two there (`Database.write_one` runs them in one transaction)."""
    if not reminders:
        connection.execute(_INSERT_APPOINTMENT, appointment)
    elif connection.dialect.name == "sqlite":
        connection.execute(_INSERT_APPOINTMENT, appointment)
        _insert_reminders(connection, reminders)
    else:
        params = dict(appointment)
        for i, row in enumerate(reminders):
            params.update({f"r{i}_{name}": row[name] for name in REMINDER_INSERT_COLUMNS})
        connection.execute(_create_statement(len(reminders)), params)


@dataclass(frozen=True)
class Replanned:
    plan: int  # the appointment's plan now: the new reminders' plan
    pruned: set[str]  # reminders of the old plan deleted: no leader ever touched them
    cancelled: set[str]  # reminders of the old plan superseded (`cancelled`, "re-planned")
    owed: list[datetime]  # when each superseded reminder was owed a call not yet made


def change_appointment(connection: Connection, appointment_id: str, values: dict[str, Any], now: datetime, *,
                       replan: bool, clear_confirmation: bool) -> Replanned | None:
    """Write `values` to the appointment (its row locked by the caller) in one UPDATE, its
    `confirmation` cleared when the customer's answer was for the old time. With `replan`, the
    appointment's next plan begins: every unfinished reminder of the old one is superseded
    (service.ledger.cancellation), and those no leader ever touched are deleted (nothing was called
    for them, and a client's re-plans cannot grow the table); `insert_plan` adds the new one.

    The dispatcher's claim and these statements exclude each other (row locks on PostgreSQL, one
    writer on SQLite)."""
    if clear_confirmation:
        values = {**values, "confirmation": None}
    if replan:
        values = {**values, "plan": _A.c.plan + 1}
    plan = connection.execute(update(_A).where(_A.c.id == appointment_id).values(values).returning(_A.c.plan))
    if not replan:
        return None
    current = plan.scalar_one()
    superseded = supersede(connection, appointment_id, REPLANNED, now)
    pruned = set(connection.execute(_PRUNE_SUPERSEDED, {"of_appointment": appointment_id}).scalars())
    return Replanned(current, pruned, superseded.cancelled - pruned, superseded.owed)


def insert_plan(connection: Connection, reminders: list[dict[str, Any]]) -> None:
    """A plan's (`pending`) reminders, in one executemany."""
    _insert_reminders(connection, reminders)
