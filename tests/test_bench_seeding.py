"""The benchmarks' reminders are the ones production plans (bench/seeding.py).

The bench writes its planned rows with executemany rather than one create statement per
appointment (the API's path, several times slower for 10,000): these tests hold the rows it writes
to the rows `service.appointments.create` stores for the same appointment.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from bench import seeding
from service import appointments
from service.db import Appointment, Database, Reminder
from service.reminders import Wording

pytestmark = pytest.mark.anyio

# what differs between two creates of the same appointment: identities and clocks
_OWN = {"id", "appointment_id", "idempotency_key", "created_at", "updated_at"}


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[tuple[str, Database]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bench.db'}"
    db = Database(url)
    await db.upgrade()
    yield url, db
    await db.dispose()


async def _stored(db: Database, table: type) -> list[dict]:
    async with db.session() as session:
        rows = (await session.execute(select(table.__table__))).mappings().all()
    return [dict(row) for row in rows]


def _normal(row: dict) -> dict:
    """`row` without its own identities and clocks; times as UTC instants (SQLite returns them naive)."""
    return {key: (value.replace(tzinfo=value.tzinfo or UTC) if isinstance(value, datetime) else value)
            for key, value in row.items() if key not in _OWN}


async def test_the_bench_plans_the_rows_the_api_create_stores(sqlite: tuple[str, Database]) -> None:
    _, db = sqlite
    now = datetime.now(UTC).replace(microsecond=0)
    due = now + timedelta(hours=1)
    config = seeding.planning()
    from service.ledger.consent import phone_hasher

    planned_appointments, planned_reminders = seeding.planned(1, due, now, config,
                                                              (await phone_hasher(db))(seeding.PHONE))
    view = await appointments.create(db, appointments.NewAppointment(
        customer_name=planned_appointments[0]["customer_name"], phone=seeding.PHONE, starts_at=due + timedelta(hours=2),
        timezone=seeding.TIMEZONE, remind_at=[due]), config)
    assert not view["unplanned"]
    (stored_appointment,), (stored_reminder,) = await _stored(db, Appointment), await _stored(db, Reminder)
    assert _normal(planned_appointments[0]) == {key: value for key, value in _normal(stored_appointment).items()
                                                if key in planned_appointments[0]}
    assert _normal(planned_reminders[0]) == {key: value for key, value in _normal(stored_reminder).items()
                                             if key in planned_reminders[0]}
    assert planned_reminders[0]["idempotency_key"].endswith(planned_reminders[0]["id"])


async def test_seed_commits_due_reminders_with_their_words(sqlite: tuple[str, Database]) -> None:
    url, db = sqlite
    due = datetime.now(UTC) - timedelta(seconds=1)
    before = datetime.now().timestamp()
    committed = await seeding.seed(url, 5, due, batch=2)
    assert committed >= before
    reminders = await _stored(db, Reminder)
    assert len(reminders) == 5 and len(await _stored(db, Appointment)) == 5
    assert {r["status"] for r in reminders} == {"pending"}
    assert all(r["next_attempt_at"].replace(tzinfo=UTC) <= datetime.now(UTC) for r in reminders)
    messages = sorted(Wording.from_json(r["wording"]).message for r in reminders)
    assert all(message.startswith("Hello Customer ") for message in messages), messages
    assert len(set(messages)) == 5  # each worded for its own customer
