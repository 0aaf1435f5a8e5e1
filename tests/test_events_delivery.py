"""Delivery of the events to EVENTS_URL (service.dispatch.events; docs/decisions/0251), to a real
HTTP receiver that verifies every request with the `standardwebhooks` library
(harness/events_receiver.py): at least once, in order per appointment, through a receiver that
hangs, fails and is down; 410 stops it until resumed; given up after EVENTS_MAX_AGE; a try in
flight when its leader's term ends is sent again by the next leader, same id.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from harness.events_receiver import Receiver
from harness.ports import free_port
from service.backlog import refresh_backlog
from service.db import Database, Event
from service.dispatch.events import EventRelay, EventsConfig
from service.ledger import outbox
from service.ledger.events import EventSource, EventType, emit
from service.ledger.fence import raise_fence
from tests.support.waiting import poll_until

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(b"delivery-test-secret-0123456789").decode()


class Term:
    """A leader term under the test's control."""

    def __init__(self, token: int) -> None:
        self.fencing_token = token
        self.ended = asyncio.Event()

    def valid(self) -> bool:
        return not self.ended.is_set()


def config(receiver: Receiver, **overrides: Any) -> EventsConfig:
    values: dict[str, Any] = {"url": receiver.url, "secret": SECRET, "timeout": 0.5, "poll_interval": 0.02,
                              "retry_base": 0.02, "retry_max": 0.1}
    return EventsConfig(**{**values, **overrides})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver(SECRET, free_port())
    await receiver.start()
    yield receiver
    await receiver.stop()


@asynccontextmanager
async def leading(db: Database, events: EventsConfig, token: int = 1,
                  relay: EventRelay | None = None) -> AsyncIterator[Term]:
    """The relay (`relay`, or one of `events`) running under a term of `token` (its fence raised),
    until the block ends."""
    await raise_fence(db, token, f"leader-{token}")
    term = Term(token)
    ended = asyncio.ensure_future(term.ended.wait())
    task = asyncio.create_task((relay or EventRelay(db, events)).run(term, ended))
    try:
        yield term
    finally:
        term.ended.set()
        await asyncio.wait_for(task, 10)


async def emit_for(db: Database, appointment_id: str | None) -> str:
    def write(connection: Any) -> str:
        emit(connection, EventType.APPOINTMENT_CANCELLED, EventSource.API, appointment_id, datetime.now(UTC))
        return connection.execute(select(Event.id).order_by(Event.seq.desc()).limit(1)).scalar_one()

    return await db.write(write)


async def rows(db: Database) -> dict[str, Any]:
    """Every event's row by id."""
    return {row.id: row for row in await db.read(lambda c: c.execute(select(Event.__table__)).all())}


def deliveries(result: str) -> float:
    return REGISTRY.get_sample_value("reminders_events_deliveries_total", {"result": result}) or 0.0


async def test_everything_arrives_in_order_per_appointment_through_hangs_failures_and_downtime(
        db: Database, receiver: Receiver) -> None:
    delivered_before = deliveries("delivered")
    receiver.hang = 2.0  # longer than a try may take: every try times out
    order: dict[str | None, list[str]] = {}
    async with leading(db, config(receiver)):
        for round_ in range(3):
            for appointment in ("a", "b", "c", None):
                order.setdefault(appointment, []).append(await emit_for(db, appointment))
            if round_ == 0:
                await poll_until(lambda: _errors(db, "timeout"), 10, "a try that timed out")
                receiver.hang, receiver.status = 0.0, 500
                await poll_until(lambda: _errors(db, "HTTP 500"), 10, "a try answered 500")
                await receiver.stop()  # down: connections refused
                await poll_until(lambda: _errors(db, "network"), 10, "a try refused")
                await receiver.start()
                receiver.status = 200
        everything = {event_id for ids in order.values() for event_id in ids}
        await poll_until(lambda: _all_delivered(db, everything), 15, "every event delivered")
        # counted once the delivery resumes after its mark is committed: a step behind the row
        await poll_until(lambda: deliveries("delivered") - delivered_before == len(everything), 10, "all counted")
    assert receiver.refused == 0  # every request verified
    assert everything <= set(receiver.ids())
    first_arrival: dict[str, int] = {}
    for position, event_id in enumerate(receiver.arrivals):
        first_arrival.setdefault(event_id, position)
    for appointment, ids in order.items():
        if appointment is not None:  # in order per appointment; an event without one has no order
            assert sorted(ids, key=first_arrival.__getitem__) == ids, appointment
    assert deliveries("delivered") - delivered_before == len(everything)
    assert {d.event["id"] for d in receiver.deliveries} == {d.id for d in receiver.deliveries}  # webhook-id = id


async def _errors(db: Database, kind: str) -> bool:
    """Some event's last try failed with `kind` (timeout, network, HTTP 500)."""
    return any((row.last_error or "").startswith(kind) for row in (await rows(db)).values())


async def _all_delivered(db: Database, ids: set[str]) -> bool:
    stored = await rows(db)
    return all(stored[event_id].delivery == "delivered" for event_id in ids)


async def test_410_stops_delivery_until_resumed(db: Database, receiver: Receiver) -> None:
    receiver.status = 410
    gone_before = deliveries("gone")
    endpoint = outbox.endpoint_key(receiver.url)
    first = await emit_for(db, "a")
    # the numbering at the service's pace: the 410 stops delivery at once, not at the next numbering
    # (which reads the endpoint's mark); until then the head went again and again
    async with leading(db, config(receiver, poll_interval=0.5)) as term:
        await poll_until(lambda: _gone(db, endpoint), 10, "the endpoint marked gone")
        later = [await emit_for(db, "b"), await emit_for(db, None)]
        for _ in range(2):  # two relay rounds (each numbers what waits, then would deliver): nothing sent
            await emit_for(db, "c")
            await poll_until(lambda: _numbered(db), 10, "a relay round")
        assert receiver.arrivals == [first] and deliveries("gone") - gone_before == 1
        backlog = await outbox.backlog(db, endpoint)
        assert backlog.gone and backlog.depth == 5 and backlog.oldest_seconds > 0
        await refresh_backlog(db, events_url=receiver.url)  # every replica's gauges
        assert [REGISTRY.get_sample_value(name) for name in (
            "reminders_events_endpoint_gone", "reminders_events_outbox_depth")] == [1.0, 5.0]
        assert not (await outbox.backlog(db, outbox.endpoint_key(receiver.url + "/other"))).gone  # another URL
        receiver.status = 200
        assert "delivery resumes" in await _cli("events-resume", db.url)
        await poll_until(lambda: {first, *later} <= set(receiver.ids()), 10, "delivery resumed")
        assert term.valid()
    assert not await _gone(db, endpoint)


async def _cli(command: str, database_url: str) -> str:
    """`reminders <command>` on `database_url`; what it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", command, env={**os.environ, "DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def _gone(db: Database, endpoint: str) -> bool:
    return (await outbox.backlog(db, endpoint)).gone


async def _numbered(db: Database) -> bool:
    waiting, _ = await outbox.OutboxStore(db).unnumbered()
    return not waiting


async def test_given_up_after_max_age_and_the_next_one_goes(db: Database, receiver: Receiver) -> None:
    given_up_before = deliveries("given_up")
    receiver.status = 500
    stale = await emit_for(db, "a")
    async with db.session() as session:  # older than EVENTS_MAX_AGE before its first try
        await session.execute(update(Event).where(Event.id == stale).values(
            created_at=datetime.now(UTC) - timedelta(hours=2)))
        await session.commit()
    tried = await emit_for(db, "a")
    async with leading(db, config(receiver, max_age=timedelta(seconds=1))):
        await poll_until(lambda: _delivery_of(db, tried, "given_up"), 10, "the event given up")
        assert receiver.ids(500) and set(receiver.ids(500)) == {tried}  # the stale one was never tried
        receiver.status = 200
        following = await emit_for(db, "a")
        await poll_until(lambda: following in receiver.ids(), 10, "the appointment's next event")
    stored = await rows(db)
    assert (stored[stale].delivery, stored[stale].attempts) == ("given_up", 0)
    assert stored[stale].last_error == "EVENTS_MAX_AGE passed before a try"
    assert stored[tried].attempts >= 2 and "HTTP 500" in stored[tried].last_error
    assert deliveries("given_up") - given_up_before == 2


async def test_a_retry_picked_up_after_max_age_keeps_its_last_error(db: Database, receiver: Receiver) -> None:
    """A retry due within EVENTS_MAX_AGE but picked up after it (a busy leader, a new one) is given
    up untried, and what the operator reads is still why its last try failed."""
    retried = await emit_for(db, "a")
    async with db.session() as session:  # tried once, retry due, and EVENTS_MAX_AGE over since
        await session.execute(update(Event).where(Event.id == retried).values(
            created_at=datetime.now(UTC) - timedelta(hours=2), attempts=1, last_error="HTTP 503",
            next_try_at=datetime.now(UTC) - timedelta(minutes=1)))
        await session.commit()
    following = await emit_for(db, "a")
    async with leading(db, config(receiver, max_age=timedelta(hours=1))):
        await poll_until(lambda: following in receiver.ids(), 10, "the appointment's next event")
    stored = await rows(db)
    assert retried not in receiver.ids()
    assert (stored[retried].delivery, stored[retried].attempts, stored[retried].last_error) == (
        "given_up", 1, "HTTP 503")


async def _delivery_of(db: Database, event_id: str, state: str) -> bool:
    return (await rows(db))[event_id].delivery == state


async def test_a_try_in_flight_when_the_term_ends_is_sent_again_by_the_next_leader(
        db: Database, receiver: Receiver) -> None:
    receiver.hang = 5.0
    event_id = await emit_for(db, "a")
    events = config(receiver, timeout=10.0)
    async with leading(db, events, token=1):
        await poll_until(lambda: receiver.arrivals, 10, "the first try under way")
    # the term is over mid-try: nothing was recorded, the event is pending still
    assert (await rows(db))[event_id].delivery == "pending"
    receiver.hang = 0.0
    async with leading(db, replace(events, timeout=2.0), token=2):
        await poll_until(lambda: _delivery_of(db, event_id, "delivered"), 10, "the next leader's try")
    assert receiver.arrivals == [event_id, event_id]  # at least once: the same webhook-id again
    assert (await rows(db))[event_id].attempts == 1  # the abandoned try recorded nothing


async def test_deliveries_that_end_together_are_recorded_in_one_statement(db: Database, receiver: Receiver) -> None:
    """At a provider's pace a mark per event was a statement per event (and a look for the next
    heads per event): the 2xx answers that come within the linger share one."""
    ids = {await emit_for(db, f"appointment-{n}") for n in range(6)}  # one head each: sent side by side
    events = config(receiver, mark_linger=0.5)
    relay = EventRelay(db, events)
    writes: list[int] = []
    record = relay.store.delivered

    async def counted(token: int, event_ids: Any) -> set[str]:
        writes.append(len(event_ids))
        return await record(token, event_ids)

    relay.store.delivered = counted  # type: ignore[method-assign]
    async with leading(db, events, relay=relay):
        await poll_until(lambda: _all_delivered(db, ids), 10, "every event delivered")
    assert sum(writes) == len(ids) and len(writes) < len(ids), writes
    assert set(receiver.ids()) == ids


def test_a_mark_linger_out_of_bounds_is_refused() -> None:
    with pytest.raises(ValueError, match="mark_linger"):
        EventsConfig(mark_linger=-0.1)
