"""What the leader's per-call ledger work costs the database (issue 26): each of `AttemptStore`'s
view, begin, settle and abandon is ONE statement, sent on PostgreSQL without BEGIN/COMMIT (a
statement is atomic on its own); a claim that finds nothing reads the fence (and the clock) once
and rolls back once. Counted with SQLAlchemy's cursor events on both pools, and on PostgreSQL with
asyncpg's own transaction calls (BEGIN, COMMIT and ROLLBACK are not cursor statements there). And
what the one statements must still do: settle's rules, begin's fence, a missing reminder's view.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import NoResultFound

from service.db import CallAttempt, Database, Reminder
from service.db.models import new_id
from service.ledger import AttemptStore, ReminderStore, StaleTerm
from service.reminders.attempts import AttemptState
from tests.support.wire import Wire, claimed_reminder, one_statement

pytestmark = pytest.mark.anyio


async def test_view_begin_settle_and_abandon_are_one_statement_each(db: Database, wire: Wire) -> None:
    store = AttemptStore(db)
    reminder_id = await claimed_reminder(db, 5)
    wire.clear()

    bound, attempts, now = await store.view(reminder_id)
    one_statement(db, wire, "SELECT")
    assert (bound, attempts) == (None, []) and abs(now - datetime.now(UTC)) < timedelta(seconds=5)

    first = await store.begin(5, reminder_id)
    one_statement(db, wire, "INSERT INTO call_attempts")
    assert first is not None
    await store.settle(first, AttemptState.IN_DOUBT, error="timeout")
    one_statement(db, wire, "UPDATE call_attempts SET")
    assert await store.abandon([first]) == 1
    one_statement(db, wire, "UPDATE call_attempts SET")

    second = await store.begin(5, reminder_id)
    one_statement(db, wire, "INSERT INTO call_attempts")
    await store.settle(second, AttemptState.CREATED, call_id="CA1")
    one_statement(db, wire, "UPDATE call_attempts SET")

    assert await store.begin(4, reminder_id) is None  # an older term: refused, in the same one statement
    one_statement(db, wire, "INSERT INTO call_attempts")

    bound, attempts, _ = await store.view(reminder_id)
    one_statement(db, wire, "SELECT")
    assert [(a.id, a.state, a.provider_call_id) for a in attempts] == [
        (first, "not_created", None), (second, "created", "CA1")]
    assert attempts[0].created_at <= attempts[1].created_at


async def test_an_empty_claim_reads_the_fence_and_the_clock_once(db: Database, wire: Wire) -> None:
    store = ReminderStore(db)
    await store.raise_fence(3, "test")
    wire.clear()
    asked = datetime.now(UTC)
    assert await store.claim(3, "test", limit=10, stale_after=timedelta(minutes=2)) == []
    assert abs(store.clock_offset) < datetime.now(UTC) - asked + timedelta(seconds=1)
    if not db.is_sqlite:  # one transaction: the fence FOR SHARE with the clock, the candidates; ROLLBACK
        assert len(wire.statements) == 2 and wire.statements[0].startswith("SELECT leader_fence.token"), wire.statements
        assert wire.transactions == ["start", "rollback"], wire.transactions
    wire.clear()
    assert await store.current_fence() == 3
    one_statement(db, wire, "SELECT leader_fence.token")
    await store.raise_fence(4, "successor")
    with pytest.raises(StaleTerm):
        await store.claim(3, "test", limit=10, stale_after=timedelta(minutes=2))


async def test_the_attempt_times_are_the_database_clock(db: Database) -> None:
    store = AttemptStore(db)
    reminder_id = await claimed_reminder(db, 2)
    attempt_id = await store.begin(2, reminder_id)
    _, (view,), now = await store.view(reminder_id)
    async with db.session() as session:
        row = (await session.execute(select(CallAttempt.__table__).where(CallAttempt.id == attempt_id))).one()
    assert (row.fencing_token, row.state, row.keypad_rounds) == (2, "creating", 0)
    assert view.created_at == row.created_at <= now and row.updated_at >= row.created_at


async def test_view_of_a_missing_reminder_raises(db: Database) -> None:
    with pytest.raises(NoResultFound):
        await AttemptStore(db).view(new_id())


async def test_settle_keeps_its_rules(db: Database) -> None:
    """CREATED always holds; another state replaces only creating or in_doubt; a call id is set
    only where none is, whether or not the state changes."""
    store = AttemptStore(db)
    reminder_id = await claimed_reminder(db, 6)

    async def row(attempt_id: str):
        async with db.session() as session:
            return (await session.execute(select(CallAttempt.__table__).where(CallAttempt.id == attempt_id))).one()

    created = await store.begin(6, reminder_id)
    await store.settle(created, AttemptState.CREATED)
    before = await row(created)
    await store.settle(created, AttemptState.NOT_CREATED, error="late")  # no state change: nothing written
    assert await row(created) == before
    await store.settle(created, AttemptState.IN_DOUBT, call_id="CA-late", error="late")  # the call id only
    after = await row(created)
    assert (after.state, after.error, after.provider_call_id) == ("created", None, "CA-late")
    await store.settle(created, AttemptState.CREATED, call_id="CA-other", error=None)  # the first call id stays
    assert (await row(created)).provider_call_id == "CA-late"

    doubtful = await store.begin(6, reminder_id)
    await store.settle(doubtful, AttemptState.IN_DOUBT, error="timeout")
    await store.settle(doubtful, AttemptState.NOT_CREATED, error="refused")
    refused = await row(doubtful)
    assert (refused.state, refused.error, refused.provider_call_id) == ("not_created", "refused", None)
    await store.settle(doubtful, AttemptState.CREATED, call_id="CA2")  # the provider's word holds
    settled = await row(doubtful)
    assert (settled.state, settled.error, settled.provider_call_id) == ("created", None, "CA2")


async def test_begin_refuses_what_a_claim_took_while_it_waited_for_the_row(postgres_url: str) -> None:
    """PostgreSQL: begin's one statement waits for the reminder's row locked by a claim of the next
    term, then re-checks its conditions on the row that claim wrote: no attempt (the fence itself is
    still this term's when the statement starts, so only the re-check on the locked row refuses)."""
    db = Database(postgres_url)
    await db.upgrade()
    other = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        reminder_id = await claimed_reminder(db, 8)
        await other.execute("BEGIN")
        await other.execute("UPDATE reminders SET fence_token = 9 WHERE id = $1", reminder_id)
        beginning = asyncio.ensure_future(AttemptStore(db).begin(8, reminder_id))
        await asyncio.sleep(0.3)
        assert not beginning.done()  # it waits for the row
        await other.execute("COMMIT")
        assert await asyncio.wait_for(beginning, timeout=10) is None
        async with db.session() as session:
            assert (await session.execute(select(CallAttempt.id).where(CallAttempt.reminder_id == reminder_id))
                    ).all() == []
            await session.execute(update(Reminder).where(Reminder.id == reminder_id).values(fence_token=8))
            await session.commit()
        assert await AttemptStore(db).begin(8, reminder_id) is not None
    finally:
        await other.close()
        await db.dispose()
