"""Poison provider answers: values the database cannot store must not hold back other outcomes.

Issue 12: a 300-character provider id or a NUL in the provider's error text failed the whole
outcome batch on PostgreSQL, and the recorder retried that batch forever.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import respx
from sqlalchemy import select

from service.db import Database, Reminder
from service.dispatch.dispatcher import Dispatcher, OutcomeRecorder
from service.ledger import Outcome, ReminderStore
from service.providers.generic import GenericProvider
from service.providers.generic.client import CallOutcome, CallRequest, HttpTelephonyClient, OutcomeKind
from service.telephony.http import MAX_RESPONSE_BYTES
from tests.support.waiting import eventually
from tests.test_dispatch import ClaimCounter, FakeTerm, config, seed

pytestmark = pytest.mark.anyio

BASE = "http://provider.test"
LONG_ID = "call_" + "x" * 295  # 300 characters, over the String(128) column
NUL_BODY = ('{"error": "boom\\u0000\\u001b[31m' + "y" * 10_000 + '"}').encode()  # JSON escapes: real NUL, ESC


def request(key: str = "reminder-1") -> CallRequest:
    return CallRequest(to="+15551234567", from_="+15550000000", message="hi", appointment_id="a", reminder_id="r",
                       idempotency_key=key)


def mocked(router: respx.MockRouter) -> HttpTelephonyClient:
    return HttpTelephonyClient(BASE, transport=httpx.MockTransport(router.async_handler))


# --- at the client -----------------------------------------------------------------------------


async def test_an_unusable_call_id_is_refused_but_the_call_counts_as_sent() -> None:
    router = respx.MockRouter(assert_all_called=False)
    router.post(f"{BASE}/v1/calls").respond(201, json={"id": LONG_ID, "status": "queued"})
    async with mocked(router) as client:
        outcome = await client.place_call(request())
    assert outcome.kind is OutcomeKind.SENT
    assert outcome.call_id is None
    assert outcome.error and "call id refused" in outcome.error


@pytest.mark.parametrize("bad_id", ["call\x00x", "call id with spaces", "call\nnext", "", "é" * 10])
async def test_call_ids_must_be_printable(bad_id: str) -> None:
    router = respx.MockRouter(assert_all_called=False)
    router.post(f"{BASE}/v1/calls").respond(201, json={"id": bad_id})
    async with mocked(router) as client:
        outcome = await client.place_call(request())
    assert outcome.call_id is None


async def test_provider_error_text_loses_control_characters_and_is_capped() -> None:
    router = respx.MockRouter(assert_all_called=False)
    router.post(f"{BASE}/v1/calls").respond(500, content=NUL_BODY, headers={"Content-Type": "application/json"})
    async with mocked(router) as client:
        outcome = await client.place_call(request())
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.error is not None and len(outcome.error) <= 160
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in outcome.error)


async def test_the_answer_is_read_up_to_64_kib_and_identity_is_asked_for() -> None:
    chunks_read = 0

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self):
            nonlocal chunks_read
            while True:
                chunks_read += 1
                yield b"x" * 4096

    seen: list[httpx.Request] = []

    async def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(502, stream=Endless())

    async with HttpTelephonyClient(BASE, transport=httpx.MockTransport(handler), timeout=5) as client:
        outcome = await client.place_call(request())
    assert outcome.kind is OutcomeKind.TRANSIENT and "not read" in (outcome.error or "")
    assert chunks_read <= MAX_RESPONSE_BYTES // 4096 + 1
    assert seen[0].headers["Accept-Encoding"] == "identity"


# --- at the recorder (PostgreSQL refuses what SQLite stores) ------------------------------------


@pytest.fixture
async def pg(postgres_url: str):
    database = Database(postgres_url)
    await database.upgrade()
    yield database
    await database.dispose()


async def claimed(db: Database, count: int, token: int) -> list[str]:
    ids = await seed(db, count)
    store = ReminderStore(db)
    await store.raise_fence(token, "replica-a")
    from datetime import UTC, datetime

    claims = await store.claim(token, "replica-a", limit=count, now=datetime.now(UTC), stale_after=timedelta(minutes=2))
    assert {c.reminder_id for c in claims} == set(ids)
    return ids


async def rows(db: Database, ids: list[str]) -> dict[str, Reminder]:
    async with db.session() as session:
        found = (await session.execute(select(Reminder).where(Reminder.id.in_(ids)))).scalars()
        return {r.id: r for r in found}


async def test_a_poison_outcome_is_isolated_and_the_batch_goes_on(pg: Database) -> None:
    token = 1_000_001
    ids = await claimed(pg, 6, token)
    recorder = OutcomeRecorder(ReminderStore(pg), token, max_batch=100, max_delay=0.05, keep_trying=lambda: True)
    now = datetime.now(UTC)
    outcomes = {rid: Outcome.sent(f"call-{i}", now, attempts=1) for i, rid in enumerate(ids)}
    outcomes[ids[1]] = Outcome.sent(LONG_ID, now, attempts=1)
    outcomes[ids[4]] = Outcome.failed("HTTP 500: boom\x00" + "y" * 10_000, attempts=1)
    results = await asyncio.wait_for(
        asyncio.gather(*(recorder.record(rid, outcome) for rid, outcome in outcomes.items())), 30
    )
    assert results == [None] * 6  # every one recorded
    stored = await rows(pg, ids)
    assert all(r.status == "sent" for rid, r in stored.items() if rid != ids[4])
    assert stored[ids[1]].provider_call_id is None and "call id refused" in stored[ids[1]].last_error
    assert stored[ids[4]].status == "failed" and "\x00" not in stored[ids[4]].last_error
    assert stored[ids[0]].provider_call_id == "call-0"


# --- the dispatcher's bound on tasks ------------------------------------------------------------


class InstantClient:
    def __init__(self) -> None:
        self.calls = 0

    async def place_call(self, request: CallRequest, *, may_send=None) -> CallOutcome:
        self.calls += 1
        return CallOutcome(OutcomeKind.SENT, call_id=f"call-{self.calls}", status_code=201)

    async def aclose(self) -> None:
        pass


async def test_tasks_in_flight_are_bounded_when_outcomes_cannot_be_written(database_url: str) -> None:
    """Slots free up when the provider answers; with every outcome write stuck, claims must stop
    at the bound on tasks, not go on calling everything that is due."""
    db = Database(database_url)
    await db.upgrade()
    try:
        await seed(db, 40)
        client = InstantClient()
        dispatcher = Dispatcher(db, GenericProvider(client), config(concurrency=4))  # tasks: twice that by default
        stuck = asyncio.Event()
        claims = ClaimCounter(dispatcher)

        async def never_written(token, outcomes):
            await stuck.wait()
            return {}

        dispatcher.store.finish_many = never_written  # type: ignore[method-assign]
        term = FakeTerm(5)
        task = asyncio.create_task(dispatcher.lead(term))
        try:
            async def at_bound() -> bool:
                return client.calls >= 8

            await eventually(at_bound)
            seen = claims.count

            async def scanned_again() -> bool:
                return claims.count >= seen + 5 or client.calls > 8

            await eventually(scanned_again)
            assert client.calls == 8
            assert len(dispatcher._in_flight) == 8
        finally:
            term.ended.set()
            stuck.set()
            await asyncio.wait_for(task, 20)
    finally:
        await db.dispose()


# --- end to end: the "Done when" ----------------------------------------------------------


def poison_provider(long_id_for: str, nul_500_for: str):
    """A provider that accepts every call, except: one reminder's call gets a 300-character id,
    another's a 500 whose 10 kB body carries a NUL."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def calls(request: Request) -> Response:
        reminder = (await request.json())["metadata"]["reminder_id"]
        if reminder == nul_500_for:
            return Response(NUL_BODY, status_code=500, media_type="application/json")
        call_id = LONG_ID if reminder == long_id_for else f"call-{reminder}"
        return JSONResponse({"id": call_id, "status": "queued"}, status_code=201)

    return Starlette(routes=[Route("/v1/calls", calls, methods=["POST"])])


@pytest.mark.slow
async def test_fifty_reminders_two_poison_answers(pg: Database) -> None:
    import time

    ids = await seed(pg, 50)
    long_id_for, nul_500_for = ids[7], ids[31]
    client = HttpTelephonyClient(
        "http://provider", transport=httpx.ASGITransport(app=poison_provider(long_id_for, nul_500_for))
    )
    dispatcher = Dispatcher(pg, GenericProvider(client), config(concurrency=8, max_attempts=3, retry_base_delay=0.01))
    term = FakeTerm(2_000_001)
    started = time.monotonic()
    task = asyncio.create_task(dispatcher.lead(term))

    async def all_recorded() -> bool:
        return all(r.status in ("sent", "failed") for r in (await rows(pg, ids)).values())

    try:
        await eventually(all_recorded, timeout=60)  # the bound: within a minute
    finally:
        term.ended.set()
        await asyncio.wait_for(task, 20)
        await client.aclose()
    print(f"50 reminders recorded in {time.monotonic() - started:.2f} s")
    stored = await rows(pg, ids)
    assert sum(r.status == "sent" for r in stored.values()) == 49
    assert stored[long_id_for].status == "sent" and stored[long_id_for].provider_call_id is None
    assert "call id refused" in stored[long_id_for].last_error
    assert stored[nul_500_for].status == "failed" and stored[nul_500_for].attempts == 3
    assert stored[nul_500_for].last_error.startswith("HTTP 500: boom") and "\x00" not in stored[nul_500_for].last_error
    assert all(r.provider_call_id == f"call-{rid}"
               for rid, r in stored.items() if rid not in (long_id_for, nul_500_for))
