"""A pooled PostgreSQL connection that asyncpg's own bookkeeping has lost track of is discarded, not
handed out again: left in the pool, it failed every statement that got it (a chaos run's replica
lost its claims, its sweep and its readiness to one such connection)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.db import Database
from service.db.engine import _protocol_confused

pytestmark = pytest.mark.anyio


def _server_pid(connection) -> int:
    return connection.execute(text("SELECT pg_backend_pid()")).scalar_one()


async def test_a_connection_busy_under_the_pool_is_dropped_and_the_next_statement_gets_a_new_one(
        postgres_url: str) -> None:
    db = Database(postgres_url, pool_size=2)  # reads: a pool of 2 autocommit connections
    try:
        async with db._autocommit.connect() as connection:
            raw = (await connection.get_raw_connection()).driver_connection
            confused_pid = raw.get_server_pid()
            # Something else is mid-statement on the connection the pool thinks is free.
            busy = asyncio.ensure_future(raw.execute("SELECT pg_sleep(0.2)"))
            await asyncio.sleep(0)  # one turn of the loop: the statement is sent, its answer awaited
            with pytest.raises(DBAPIError, match="another operation"):
                await connection.execute(text("SELECT 1"))
            assert connection.invalidated
            await asyncio.gather(busy, return_exceptions=True)  # ended with its connection
        pids = {await db.read(_server_pid) for _ in range(4)}
        assert confused_pid not in pids
        assert db._autocommit.pool.checkedin() >= 1  # the others stayed: one connection dropped, not the pool
    finally:
        await db.dispose()


def test_only_asyncpg_s_own_confusion_drops_a_connection() -> None:
    assert _protocol_confused(asyncpg.exceptions.InternalClientError(
        "cannot switch to state 11; another operation (2) is in progress"))
    assert _protocol_confused(asyncpg.exceptions.InterfaceError(
        "cannot perform operation: another operation is in progress"))
    assert not _protocol_confused(asyncpg.exceptions.InterfaceError("the server expects 1 argument, 2 were passed"))
    assert not _protocol_confused(asyncpg.exceptions.SerializationError("could not serialize access"))
    assert not _protocol_confused(None)
