"""Due reminders for the benchmarks, planned the way production plans them.

`seed(url, count, due_at)` commits `count` appointments, each with the one reminder its explicit
`remind_at` (= `due_at`) plans, in ONE transaction. Each row is what `service.appointments.create`
stores: the due time from the domain's `plan_reminders` (fitted into the call window), the words of
the call fixed at planning (`MessageTemplates.render`, so the dispatcher says what it reads from
`wording`, as in production), the key rule (`idempotency_key`), exactly the columns of the ledger's
create (`service.ledger.plans.APPOINTMENT_INSERT_COLUMNS`, `REMINDER_INSERT_COLUMNS`). The planning
config is the replica's: the service's `Settings` with the harness's `CALL_WINDOW`.

The rows go in as two executemany INSERTs per 2,000 appointments, not one create statement per
appointment (`service.ledger.plans.insert_appointment`, what the API sends): that took 5 to 10 s for
10,000 on this machine against about 1.6 s, for every round of every dispatch run, and the rows it
would write are the same (tests/test_bench_seeding.py holds the two to the same rows).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

# CALL_WINDOW of every replica the harness starts (harness.cluster): the planning must match it
REPLICA_CALL_WINDOW = "00:00-24:00"
PHONE = "+14155552671"
TIMEZONE = "UTC"


@asynccontextmanager
async def database(url: str, pool_size: int = 1) -> AsyncIterator[Any]:
    """A service.db.Database for `url`, disposed on exit."""
    from service.db import Database

    db = Database(url, pool_size=pool_size)
    try:
        yield db
    finally:
        await db.dispose()


def planning() -> Any:
    """The PlanningConfig a replica of the harness computes from its settings."""
    from service.config import Settings

    return Settings(call_window=REPLICA_CALL_WINDOW).planning_config()


def planned(
    count: int, due_at: datetime, now: datetime, config: Any, phone_hash: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The appointment rows and reminder rows for `count` appointments two hours after `due_at`,
    each reminded at `due_at`, planned at `now` (before `due_at`: reminders planned earlier that
    have come due), as `service.appointments.create` builds them (`phone_hash`: the database's
    keyed hash of PHONE, `service.ledger.consent`)."""
    from service.db import AppointmentStatus
    from service.db.models import new_id
    from service.ledger.plans import APPOINTMENT_INSERT_COLUMNS, reminder_row
    from service.reminders import plan_reminders

    starts_at = due_at + timedelta(hours=2)
    zone, language = ZoneInfo(TIMEZONE), config.templates.default_language
    appointments: list[dict[str, Any]] = []
    reminders: list[dict[str, Any]] = []
    for index in range(count):
        appointment = {
            "id": new_id(), "customer_name": f"Customer {index}", "phone": PHONE, "phone_hash": phone_hash,
            "starts_at": starts_at,
            "timezone": TIMEZONE, "notes": None, "remind_at": [due_at.isoformat()],
            "status": AppointmentStatus.SCHEDULED, "language": language, "created_at": now, "updated_at": now,
        }
        plan = plan_reminders(starts_at=starts_at, zone=zone, window=config.call_window, now=now,
                              offsets=config.offsets, explicit=[due_at])
        if plan.unplanned:
            raise RuntimeError(f"the bench's reminder was not planned: {plan.unplanned}")
        # the words are fixed now, as the create fixes them
        wording = config.templates.render(language, appointment["customer_name"], starts_at, TIMEZONE).to_json()
        appointments.append({name: appointment[name] for name in APPOINTMENT_INSERT_COLUMNS})
        reminders.extend(reminder_row(appointment["id"], due, wording, now) for due in plan.due_times)
    return appointments, reminders


async def seed(url: str, count: int, due_at: datetime, *, batch: int = 2000) -> float:
    """Commit `count` appointments with one planned reminder each, due at `due_at`, in ONE
    transaction. Returns time.time() right after the commit (the moment they all became visible)."""
    from service.db import Appointment, Reminder
    from service.ledger.consent import phone_hasher

    async with database(url) as db:
        hashed = (await phone_hasher(db))(PHONE)
        appointments, reminders = planned(count, due_at, min(due_at, datetime.now(due_at.tzinfo)), planning(), hashed)
        async with db.engine.begin() as connection:
            for start in range(0, count, batch):
                await connection.execute(Appointment.__table__.insert(), appointments[start : start + batch])
            for start in range(0, len(reminders), batch):
                await connection.execute(Reminder.__table__.insert(), reminders[start : start + batch])
        return time.time()
