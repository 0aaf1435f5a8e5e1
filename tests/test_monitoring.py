"""Monitoring: the backlog gauges (service/backlog.py) count what they say, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

import service.metrics
from harness.ports import free_port
from service.backlog import STUCK_AFTER, refresh_backlog
from service.db import Appointment, Database, Reminder, ReminderStatus
from service.db.models import new_id


# --- the backlog gauges --------------------------------------------------------------------------


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


@pytest.fixture
async def db(database_url: str) -> Any:
    database = Database(database_url)
    await database.upgrade()
    yield database
    await database.dispose()


@pytest.mark.anyio
async def test_backlog_gauges_count_due_and_stuck_reminders(db: Database) -> None:
    now = datetime.now(UTC)
    long_ago = now - STUCK_AFTER - timedelta(minutes=1)
    rows = [  # (status, next_attempt_at, claimed_at)
        (ReminderStatus.PENDING, now - timedelta(minutes=1), None),  # due
        (ReminderStatus.PENDING, now - timedelta(hours=2), None),  # due, long overdue
        (ReminderStatus.PENDING, now + timedelta(hours=1), None),  # not yet
        (ReminderStatus.DISPATCHING, now - timedelta(hours=1), long_ago),  # stuck
        (ReminderStatus.DISPATCHING, now, now - timedelta(seconds=5)),  # a call in flight
        (ReminderStatus.SENT, now - timedelta(hours=1), long_ago),
    ]
    async with db.session() as session:
        appointment = Appointment(
            id=new_id(), customer_name="A", phone="+14155552671", starts_at=now + timedelta(hours=3),
            timezone="UTC", status="scheduled",
        )
        appointment.reminders = [
            Reminder(id=(rid := new_id()), due_at=due, next_attempt_at=due, status=status, attempts=0,
                     idempotency_key=f"reminder-{rid}", claimed_at=claimed, fence_token=1 if claimed else None)
            for status, due, claimed in rows
        ]
        session.add(appointment)
        await session.commit()

    await refresh_backlog(db)
    assert (_gauge("reminders_due"), _gauge("reminders_stuck_dispatching")) == (2, 1)


@pytest.mark.anyio
async def test_backlog_gauges_keep_their_value_when_the_database_does_not_answer(tmp_path: Path) -> None:
    service.metrics.REMINDERS_DUE.set(7)
    service.metrics.REMINDERS_STUCK_DISPATCHING.set(3)
    unreachable = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none")
    try:
        await refresh_backlog(unreachable, timeout=5)  # logs, does not raise
    finally:
        await unreachable.dispose()
    assert (_gauge("reminders_due"), _gauge("reminders_stuck_dispatching")) == (7, 3)
