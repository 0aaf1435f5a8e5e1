"""An appointment's plan in the database: the create's statement (the appointment with its
reminders) and a change (the appointment's fields, and on a re-plan the old plan's reminders
superseded and the new plan's inserted).

Functions over a SQLAlchemy `Connection`, run by the appointments service inside its one
transaction (`Database.write`, or `write_one` for a create: docs/decisions/0161, 0162).
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, bindparam, case, delete, insert, literal, select, union_all, update
from sqlalchemy.engine import Connection

from service.db.models import Appointment, Reminder, new_id
from service.ledger import events
from service.ledger.cancellation import OPTED_OUT, REPLANNED, supersede
from service.ledger.consent import is_listed, number_listed
from service.ledger.events import EventSource
from service.reminders.calls import idempotency_key
from service.reminders.lifecycle import ReminderStatus

__all__ = [
    "APPOINTMENT_INSERT_COLUMNS", "REMINDER_INSERT_COLUMNS", "Replanned", "change_appointment", "hold_version",
    "insert_appointment", "insert_plan", "reminder_row",
]

_A, _R = Appointment.__table__, Reminder.__table__

APPOINTMENT_INSERT_COLUMNS = ("id", "customer_name", "phone", "phone_hash", "starts_at", "timezone", "notes",
                              "remind_at", "status", "language", "created_at", "updated_at")
REMINDER_INSERT_COLUMNS = ("id", "appointment_id", "due_at", "next_attempt_at", "status", "attempts",
                           "idempotency_key", "wording", "no_answer_retries", "plan", "skip_reason", "created_at",
                           "updated_at")
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
                 plan: int = 0, skip_reason: str | None = None) -> dict[str, Any]:
    """A new `pending` reminder of `appointment_id` due at `due`, as the create and a re-plan insert
    it (every REMINDER_INSERT_COLUMNS): its own id and idempotency key, the words fixed now;
    `skipped` from the start with `skip_reason` (its number opted out, its appointment is confirmed)."""
    reminder_id = new_id()
    return {"id": reminder_id, "appointment_id": appointment_id, "due_at": due, "next_attempt_at": due,
            "status": ReminderStatus.PENDING if skip_reason is None else ReminderStatus.SKIPPED, "attempts": 0,
            "idempotency_key": idempotency_key(reminder_id), "wording": wording, "no_answer_retries": 0, "plan": plan,
            "skip_reason": skip_reason, "created_at": now, "updated_at": now}


def _skipped_if_listed(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "status": ReminderStatus.SKIPPED, "skip_reason": OPTED_OUT}


@functools.lru_cache(maxsize=64)
def _create_statement(reminders: int) -> Insert:
    """PostgreSQL: an appointment and `reminders` reminders in ONE statement (the appointment's
    INSERT in a WITH), atomic on its own; a number on the do-not-call list gets its reminders
    `skipped` ("opted out") by the same statement, which returns their status. Parameters: the
    appointment's columns by name, reminder i's as `r<i>_<column>`."""
    listed = number_listed(bindparam("phone_hash", type_=_A.c.phone_hash.type))

    def column(i: int, name: str) -> Any:
        value = bindparam(f"r{i}_{name}", type_=_R.c[name].type)
        if name == "status":
            return case((listed, literal(ReminderStatus.SKIPPED.value)), else_=value)
        if name == "skip_reason":
            return case((listed, literal(OPTED_OUT)), else_=value)
        return value

    # rows as SELECTs of parameters, not a multi-row VALUES: SQLAlchemy caches the compiled form of
    # these, and compiling a multi-row VALUES on every request cost more than the round trips saved
    rows = [select(*(column(i, name) for name in REMINDER_INSERT_COLUMNS)) for i in range(reminders)]
    return (insert(_R).from_select(REMINDER_INSERT_COLUMNS, rows[0] if reminders == 1 else union_all(*rows))
            .add_cte(_INSERT_APPOINTMENT.cte("new_appointment")).returning(_R.c.status))


def _insert_reminders(connection: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:  # one executemany: one round trip for all of them
        connection.execute(_INSERT_REMINDERS, rows)


def insert_appointment(connection: Connection, appointment: dict[str, Any], reminders: list[dict[str, Any]]) -> bool:
    """The appointment and its (`pending`) reminders: one statement on PostgreSQL; SQLite has no
    INSERT inside WITH, so three there (`Database.write_one` runs them in one transaction). True
    when the number is on the do-not-call list: the reminders were stored `skipped` ("opted out")."""
    if not reminders:
        connection.execute(_INSERT_APPOINTMENT, appointment)
        return False
    if connection.dialect.name == "sqlite":
        listed = is_listed(connection, appointment["phone_hash"])
        connection.execute(_INSERT_APPOINTMENT, appointment)
        _insert_reminders(connection, [_skipped_if_listed(row) for row in reminders] if listed else reminders)
        return listed
    params = dict(appointment)
    for i, row in enumerate(reminders):
        params.update({f"r{i}_{name}": row[name] for name in REMINDER_INSERT_COLUMNS})
    status = connection.execute(_create_statement(len(reminders)), params).scalars().first()
    return status == ReminderStatus.SKIPPED


# If-Match: the appointment's row, if its version is one of those named, written with what it
# holds (no column changes, not even the version), which locks it to the end of the transaction.
_HOLD_VERSION = (
    update(_A)
    .where(_A.c.id == bindparam("of_appointment"), _A.c.version.in_(bindparam("versions", expanding=True)))
    .values(version=_A.c.version, updated_at=_A.c.updated_at)
)


def hold_version(connection: Connection, appointment_id: str, versions: Collection[int]) -> bool:
    """The conditional request's check, atomic with the writes after it: True when the appointment's
    version is one of `versions`, its row then locked until the transaction ends (a row lock on
    PostgreSQL, SQLite's one writer), changed in nothing; False when it is not (or there is no such
    appointment). The first statement of the transaction, so that what it reads next is current."""
    held = connection.execute(_HOLD_VERSION, {"of_appointment": appointment_id, "versions": sorted(versions)})
    return held.rowcount == 1


@dataclass(frozen=True)
class Replanned:
    plan: int  # the appointment's plan now: the new reminders' plan
    pruned: set[str]  # reminders of the old plan deleted: no leader ever touched them
    cancelled: set[str]  # reminders of the old plan superseded (`cancelled`, "re-planned")
    owed: list[datetime]  # when each superseded reminder was owed a call not yet made


def change_appointment(connection: Connection, appointment_id: str, values: dict[str, Any], now: datetime, *,
                       replan: bool, clear_confirmation: bool, source: EventSource) -> tuple[int, Replanned | None]:
    """Write `values` to the appointment (its row locked by the caller) in one UPDATE, its
    `confirmation` cleared when the customer's answer was for the old time; its new version. With `replan`, the
    appointment's next plan begins: every unfinished reminder of the old one is superseded
    (service.ledger.cancellation), and those no leader ever touched are deleted (nothing was called
    for them, and a client's re-plans cannot grow the table); `insert_plan` adds the new one. The
    superseded ones that stay emit `reminder.finished`; the deleted ones nothing.

    The dispatcher's claim and these statements exclude each other (row locks on PostgreSQL, one
    writer on SQLite)."""
    if clear_confirmation:
        values = {**values, "confirmation": None}
    if replan:
        values = {**values, "plan": _A.c.plan + 1}
    current, version = connection.execute(
        update(_A).where(_A.c.id == appointment_id).values(values).returning(_A.c.plan, _A.c.version)).one()
    if not replan:
        return version, None
    superseded = supersede(connection, appointment_id, REPLANNED, now)
    pruned = set(connection.execute(_PRUNE_SUPERSEDED, {"of_appointment": appointment_id}).scalars())
    events.insert(connection, events.finished_rows([row for row in superseded.rows if row.id not in pruned],
                                                   source, now))
    return version, Replanned(current, pruned, superseded.cancelled - pruned, superseded.owed)


def insert_plan(connection: Connection, phone_hash: str, reminders: list[dict[str, Any]]) -> bool:
    """A plan's (`pending`) reminders, in one executemany; `skipped` ("opted out") when the number
    (`phone_hash`) is on the do-not-call list, and then True."""
    listed = bool(reminders) and is_listed(connection, phone_hash)
    _insert_reminders(connection, [_skipped_if_listed(row) for row in reminders] if listed else reminders)
    return listed
