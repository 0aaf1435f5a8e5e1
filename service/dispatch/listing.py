"""The last look at the do-not-call list before a generic provider's create (a provider without
idempotency has it in `AttemptStore.begin`, in the transaction that records the attempt).

A claim reads the list, but a number listed after the claim and before its create (the create
waits for the rate limiter, or the listing raced the claim) must not be called either. One read
of the numbers listed lately serves every create waiting at that moment, and it begins after each
of them asked: a listing committed before a create's check is seen by it. Cost: one indexed read
per group of creates, not per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

__all__ = ["ListingGate"]

# A listing's time is its transaction's start (PostgreSQL's now()): it may commit this much later.
_COMMIT_MARGIN = timedelta(seconds=60)


class _Read:
    def __init__(self, since: datetime) -> None:
        self.since = since
        self.result: asyncio.Future[frozenset[str]] = asyncio.get_running_loop().create_future()


class ListingGate:
    """`listed(phone_hash, claimed_at)`: whether the number was listed since its reminder's claim."""

    def __init__(self, read: Callable[[datetime], Awaitable[frozenset[str]]]) -> None:
        self._read = read
        self._waiting: _Read | None = None  # the next read, not begun: new askers join it
        self._one_at_a_time = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def listed(self, phone_hash: str | None, claimed_at: datetime | None) -> bool:
        """Raises what the read raised (the database is down: the create must not go)."""
        if phone_hash is None or claimed_at is None:
            return False
        since = claimed_at - _COMMIT_MARGIN
        read = self._waiting
        if read is None:
            read = self._waiting = _Read(since)
            task = asyncio.create_task(self._run(read))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            read.since = min(read.since, since)
        return phone_hash in await asyncio.shield(read.result)

    async def _run(self, read: _Read) -> None:
        async with self._one_at_a_time:
            if self._waiting is read:
                self._waiting = None  # whoever asks from now on needs a read that begins later
            try:
                read.result.set_result(await self._read(read.since))
            except Exception as error:  # noqa: BLE001 - handed to every waiter
                read.result.set_exception(error)
                read.result.exception()  # retrieved: no warning when every waiter was cancelled
