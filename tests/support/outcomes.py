"""What the call-outcome tests share, in both real-provider modes: appointments booked through the
service layer (the wording fixed at planning), their rows, and the metrics they count."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY
from sqlalchemy import select, update

from service import appointments
from service.db import CallAttempt, Database, Reminder
from service.db.models import new_id
from service.reminders import ALWAYS, MessageTemplates, PlanningConfig
from tests.support.providers import Rig
from tests.support.rows import appointment_row, reminder_row

__all__ = ["PROMPT", "RETRY_DELAY", "TEMPLATES", "appointment_row", "book", "metric", "reminder_row",
           "seeded_attempts"]

RETRY_DELAY = timedelta(seconds=1)
TEMPLATES = MessageTemplates.parse(json.dumps({"en-US": {}, "de-DE": "Hallo {name}, Termin am {date} um {time}."}))
PROMPT = "Press 1 to confirm, press 2 to cancel. To receive no more reminder calls, press 9."


async def book(db: Database, phone: str, *, language: str = "en-US", later: bool = False) -> tuple[str, list[str]]:
    """An appointment in 2 hours with a reminder due now (and one due later, if asked). Returns
    (appointment id, reminder ids by due time).

    The first reminder is planned a minute ahead, then made due now (a test may write): planned
    100 ms ahead, it was refused as "already passed" whenever the create took longer (the first
    create of a process loads the templates' locale data)."""
    now = datetime.now(UTC)
    starts = now + timedelta(hours=2)
    remind_at = [now + timedelta(minutes=1)] + ([starts - timedelta(minutes=30)] if later else [])
    view = await appointments.create(
        db,
        appointments.NewAppointment(customer_name="Ann Example", phone=phone, starts_at=starts,
                                    timezone="Europe/Berlin", remind_at=remind_at, language=language),
        PlanningConfig(call_window=ALWAYS, offsets=(), templates=TEMPLATES),
    )
    ids = [r["id"] for r in sorted(view["reminders"], key=lambda r: r["due_at"])]
    due = datetime.now(UTC) + timedelta(milliseconds=100)
    async with db.session() as session:
        await session.execute(update(Reminder).where(Reminder.id == ids[0]).values(due_at=due, next_attempt_at=due))
        await session.commit()
    return view["id"], ids


async def seeded_attempts(rig: Rig, appointment_id: str, count: int) -> tuple[str, list[str]]:
    """The appointment's first reminder, made `sent` with `count` created attempts (as the dispatcher leaves it)."""
    attempt_ids = [new_id() for _ in range(count)]
    async with rig.db.session() as session:
        reminder_id = (await session.execute(
            select(Reminder.id).where(Reminder.appointment_id == appointment_id).order_by(Reminder.due_at))).scalar()
        await session.execute(update(Reminder).where(Reminder.id == reminder_id).values(status="sent", attempts=count))
        for attempt_id in attempt_ids:
            session.add(CallAttempt(id=attempt_id, reminder_id=reminder_id, fencing_token=1, state="created"))
        await session.commit()
    return reminder_id, attempt_ids


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
