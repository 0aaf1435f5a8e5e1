"""The reminder lifecycle table, and the store refusing a transition the table does not hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from service.db import Appointment, Database, Reminder
from service.db.models import new_id
from service.dispatch.store import ReminderStore
from service.reminders import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    ReminderStatus,
    idempotency_key,
    require,
    sources_of,
)

S = ReminderStatus


def test_the_table_is_the_documented_lifecycle() -> None:
    assert TRANSITIONS[S.PENDING] == {S.DISPATCHING, S.CANCELLED}
    assert TRANSITIONS[S.DISPATCHING] == {S.SENT, S.FAILED, S.SKIPPED, S.CANCELLED, S.PENDING}
    assert TRANSITIONS[S.SENT] == {S.PENDING}  # a real provider's call nobody answered, retried
    assert TERMINAL == {S.SENT, S.FAILED, S.CANCELLED, S.SKIPPED}
    assert set(TRANSITIONS) == set(ReminderStatus)
    assert sources_of(S.DISPATCHING) == {S.PENDING}
    assert sources_of(S.CANCELLED) == {S.PENDING, S.DISPATCHING}
    assert sources_of(S.PENDING) == {S.DISPATCHING, S.SENT}


@pytest.mark.parametrize(
    ("source", "target"),
    [(S.SENT, S.DISPATCHING), (S.CANCELLED, S.PENDING), (S.PENDING, S.SENT), (S.DISPATCHING, S.DISPATCHING),
     (S.SKIPPED, S.DISPATCHING), (S.PENDING, "bogus"), (S.DISPATCHING, None)],
)
def test_a_transition_outside_the_table_is_refused(source, target) -> None:  # noqa: ANN001
    with pytest.raises(IllegalTransition):
        require(source, target)


def test_every_allowed_transition_passes() -> None:
    for source, targets in TRANSITIONS.items():
        for target in targets:
            require(source, target)


def test_the_key_is_the_reminder_alone() -> None:
    assert idempotency_key("abc") == "reminder-abc" == idempotency_key("abc")





async def _one_dispatching(db: Database, store: ReminderStore, token: int) -> str:
    now = datetime.now(UTC)
    reminder_id = new_id()
    async with db.session() as session:
        appointment = Appointment(
            id=new_id(), customer_name="Ada", phone="+14155552671", starts_at=now + timedelta(hours=2),
            timezone="UTC", status="scheduled",
        )
        appointment.reminders = [
            Reminder(id=reminder_id, due_at=now, next_attempt_at=now, status=S.PENDING, attempts=0,
                     idempotency_key=idempotency_key(reminder_id))
        ]
        session.add(appointment)
        await session.commit()
    await store.raise_fence(token, "leader")
    claims = await store.claim(token, "leader", limit=10, now=now + timedelta(seconds=1), stale_after=timedelta(minutes=2))
    assert [c.reminder_id for c in claims] == [reminder_id]
    return reminder_id


async def _status(db: Database, reminder_id: str) -> str:
    async with db.session() as session:
        return (await session.execute(select(Reminder.status).where(Reminder.id == reminder_id))).scalar_one()


@pytest.mark.anyio
@pytest.mark.parametrize("target", [S.DISPATCHING, "bogus", None])
async def test_the_store_refuses_an_outcome_outside_the_table(db: Database, target) -> None:  # noqa: ANN001
    store = ReminderStore(db)
    reminder_id = await _one_dispatching(db, store, token=5)
    values = {"last_error": "x"} if target is None else {"status": target}
    with pytest.raises(IllegalTransition):
        await store.finish_many(5, [(reminder_id, values)])
    assert await _status(db, reminder_id) == S.DISPATCHING  # nothing written


@pytest.mark.anyio
async def test_the_store_records_an_allowed_outcome(db: Database) -> None:
    store = ReminderStore(db)
    reminder_id = await _one_dispatching(db, store, token=6)
    assert await store.finish_many(6, [(reminder_id, {"status": S.SENT})]) == {reminder_id}
    assert await _status(db, reminder_id) == S.SENT
