"""What a test sees go to the database: statements (their first three words) on both pools and, on
PostgreSQL, the transaction commands asyncpg sent (BEGIN, COMMIT and ROLLBACK are not cursor
statements there). `wire` is a fixture: import it into the test module."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from asyncpg.transaction import Transaction
from sqlalchemy import event

from service.db import Appointment, Database, Reminder
from service.db.models import new_id
from service.ledger import ReminderStore

__all__ = ["Wire", "claimed_reminder", "one_statement", "wire"]


@dataclass
class Wire:
    """What went to the database: statements (their first three words) and, on PostgreSQL, the
    transaction commands asyncpg sent."""

    statements: list[str] = field(default_factory=list)
    transactions: list[str] = field(default_factory=list)

    def clear(self) -> None:
        self.statements.clear()
        self.transactions.clear()


@pytest.fixture
def wire(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[Wire]:
    seen = Wire()

    def record(_conn, _cursor, statement: str, *_args: object) -> None:
        seen.statements.append(" ".join(statement.split()[:3]))

    engines = {db.engine.sync_engine, db._autocommit.sync_engine}
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    if not db.is_sqlite:
        for name in ("start", "commit", "rollback"):
            original = getattr(Transaction, name)

            async def spy(self, *args, _original=original, _name=name, **kwargs):
                seen.transactions.append(_name)
                return await _original(self, *args, **kwargs)

            monkeypatch.setattr(Transaction, name, spy)
    yield seen
    for engine in engines:
        event.remove(engine, "before_cursor_execute", record)


async def claimed_reminder(db: Database, token: int) -> str:
    """A reminder `dispatching` under `token`, claimed as the dispatcher claims it."""
    now = datetime.now(UTC)
    reminder_id = new_id()
    async with db.session() as session:
        appointment = Appointment(id=new_id(), customer_name="Ann Example", phone="+14155552671",
                                  starts_at=now + timedelta(hours=2), timezone="UTC", status="scheduled")
        appointment.reminders = [Reminder(id=reminder_id, due_at=now, next_attempt_at=now, status="pending",
                                          attempts=0, idempotency_key=f"reminder-{reminder_id}")]
        session.add(appointment)
        await session.commit()
    store = ReminderStore(db)
    await store.raise_fence(token, "test")
    claims = await store.claim(token, "test", limit=10, stale_after=timedelta(minutes=2))
    assert [claim.reminder_id for claim in claims] == [reminder_id]
    return reminder_id


def one_statement(db: Database, wire: Wire, first_words: str) -> None:
    assert len(wire.statements) == 1 and wire.statements[0].startswith(first_words), wire.statements
    if not db.is_sqlite:
        assert wire.transactions == [], wire.transactions  # no BEGIN, COMMIT or ROLLBACK
    wire.clear()
