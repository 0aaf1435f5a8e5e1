"""A successor's fence raise is not held up by a predecessor frozen inside a claim (PostgreSQL).

A leader frozen (SIGSTOP, a stuck VM) between the messages of a statement holds the fence row
FOR SHARE in a session the server sees as active, which no idle-in-transaction timeout ends: the
successor's raise would wait for as long as the freeze lasts. Found by the Twilio-mode chaos run
(leader-sigstop: two successors in a row failed their fence raise on statement_timeout).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from service.db import Database
from service.ledger import ReminderStore

pytestmark = pytest.mark.anyio


async def test_a_frozen_claim_holding_the_fence_is_ended_by_the_successor(postgres_url: str) -> None:
    db = Database(postgres_url)
    await db.upgrade()
    store = ReminderStore(db)
    await store.raise_fence(1, "old-leader")
    frozen = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await frozen.execute("BEGIN")
        await frozen.fetchval("SELECT token FROM leader_fence WHERE id = 1 FOR SHARE")
        # Active, not idle in transaction: as a client frozen in the middle of its next statement.
        holding = asyncio.ensure_future(frozen.fetchval("SELECT pg_sleep(120)"))
        await _until_running(postgres_url, frozen.get_server_pid())
        assert not holding.done()
        await asyncio.wait_for(store.raise_fence(2, "successor"), timeout=30)
        assert await store.current_fence() == 2
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await asyncio.wait_for(holding, timeout=10)  # its session was ended
    finally:
        frozen.terminate()
        await db.dispose()


async def _until_running(postgres_url: str, pid: int, timeout: float = 10.0) -> None:
    """Wait (deadline-bounded poll) until backend `pid` is active inside its pg_sleep."""
    watcher = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        deadline = time.monotonic() + timeout
        query = "SELECT state = 'active' AND query LIKE 'SELECT pg_sleep%' FROM pg_stat_activity WHERE pid = $1"
        while not await watcher.fetchval(query, pid):
            assert time.monotonic() < deadline, "the frozen session never started its statement"
            await asyncio.sleep(0.01)  # poll interval
    finally:
        await watcher.close()
