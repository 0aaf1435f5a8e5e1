"""The backlog as gauges: reminders due and not yet claimed, reminders stuck `dispatching`; with
EVENTS_URL set, the events not yet delivered, the age of the oldest, and whether the endpoint
answered 410.

Every replica refreshes them (`watch_backlog`, started by the app) with count queries on their
own indexes, so they keep reporting when no replica leads — exactly when they matter.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from service.db import Database, Reminder, ReminderStatus
from service.ledger import outbox
from service.metrics import (
    EVENTS_ENDPOINT_GONE,
    EVENTS_OLDEST_UNDELIVERED,
    EVENTS_OUTBOX_DEPTH,
    REMINDERS_DUE,
    REMINDERS_STUCK_DISPATCHING,
)

__all__ = ["BACKLOG_INTERVAL", "BACKLOG_TIMEOUT", "STUCK_AFTER", "count_backlog", "refresh_backlog", "watch_backlog"]

log = logging.getLogger(__name__)

# A claim this old has outlived every way the dispatcher completes one: the next term takes an
# older term's claims first, and a term re-claims its own after DispatchConfig.stale_claim_after
# (2 min). Only "no term completes it" (no leader, claims failing, a bug) leaves one this long.
STUCK_AFTER = timedelta(minutes=5)
# Seconds between refreshes (a common scrape interval), and the bound on one refresh.
BACKLOG_INTERVAL = 15.0
BACKLOG_TIMEOUT = 5.0


async def count_backlog(db: Database, now: datetime) -> tuple[int, int]:
    """(pending reminders due at `now`, reminders `dispatching` since before `now` − STUCK_AFTER)."""
    due = select(func.count()).where(Reminder.status == ReminderStatus.PENDING, Reminder.next_attempt_at <= now)
    stuck = select(func.count()).where(
        Reminder.status == ReminderStatus.DISPATCHING, Reminder.claimed_at < now - STUCK_AFTER
    )
    async with db.session() as session:
        return (await session.execute(due)).scalar_one(), (await session.execute(stuck)).scalar_one()


async def refresh_backlog(db: Database, *, timeout: float = BACKLOG_TIMEOUT, events_url: str | None = None) -> None:
    """Count once and set the gauges (the events' with `events_url`, EVENTS_URL); on failure they
    keep their last value (logged)."""
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that arrives as the
        # query completes, and the app's shutdown then waits for this loop forever.
        async with asyncio.timeout(timeout):
            due, stuck = await count_backlog(db, datetime.now(UTC))
            events = await outbox.backlog(db, outbox.endpoint_key(events_url)) if events_url else None
    except Exception as error:  # noqa: BLE001 - a DB outage must not end the loop
        log.warning("counting the reminder backlog failed: %s", type(error).__name__)
        return
    REMINDERS_DUE.set(due)
    REMINDERS_STUCK_DISPATCHING.set(stuck)
    if events is not None:
        EVENTS_OUTBOX_DEPTH.set(events.depth)
        EVENTS_OLDEST_UNDELIVERED.set(events.oldest_seconds)
        EVENTS_ENDPOINT_GONE.set(int(events.gone))


async def watch_backlog(db: Database, *, interval: float = BACKLOG_INTERVAL, events_url: str | None = None) -> None:
    """Refresh the gauges every `interval` seconds until cancelled."""
    while True:
        await refresh_backlog(db, events_url=events_url)
        await asyncio.sleep(interval)
