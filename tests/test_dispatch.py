"""The dispatcher against a real database (SQLite and PostgreSQL) and the fake provider."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select

from reminders_fakes import create_fake_provider
from service.config import CallWindow
from service.db import Appointment, Database, Reminder
from service.db.models import new_id
from service.dispatch.dispatcher import DispatchConfig, Dispatcher, OutcomeRecorder, message_for
from service.ledger import Outcome, ReminderStore, StaleTerm
from service.providers.generic import GenericProvider
from service.providers.generic.client import CallOutcome, CallRequest, HttpTelephonyClient, OutcomeKind
from service.reminders import idempotency_key
from tests.support.waiting import eventually, poll_until

pytestmark = pytest.mark.anyio

ALWAYS = CallWindow.parse("00:00-24:00")


class FakeTerm:
    """A term under test control: the elector's Term offers the same three things."""

    def __init__(self, token: int) -> None:
        self.fencing_token = token
        self.ended = asyncio.Event()

    def valid(self) -> bool:
        return not self.ended.is_set()


@pytest.fixture
def provider():
    return create_fake_provider()


@pytest.fixture
async def client(provider):
    telephony = HttpTelephonyClient("http://provider", transport=httpx.ASGITransport(app=provider))
    yield telephony
    await telephony.aclose()


async def provider_state(provider) -> tuple[list[dict], list[dict]]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=provider), base_url="http://provider") as http:
        calls = (await http.get("/v1/calls")).json()["calls"]
        requests = (await http.get("/v1/requests")).json()["requests"]
    return calls, requests


async def seed(
    db: Database, count: int, *, due_in: timedelta = timedelta(0), starts_in: timedelta = timedelta(hours=2),
    timezone: str = "UTC",
) -> list[str]:
    now = datetime.now(UTC)
    ids = []
    async with db.session() as session:
        for index in range(count):
            appointment = Appointment(
                id=new_id(), customer_name=f"Customer {index}", phone="+14155552671", starts_at=now + starts_in,
                timezone=timezone, status="scheduled",
            )
            reminder_id = new_id()
            appointment.reminders = [
                Reminder(id=reminder_id, due_at=now + due_in, next_attempt_at=now + due_in, status="pending",
                         attempts=0, idempotency_key=idempotency_key(reminder_id))
            ]
            session.add(appointment)
            ids.append(reminder_id)
        await session.commit()
    return ids


async def reminders(db: Database) -> list[Reminder]:
    async with db.session() as session:
        return list((await session.execute(select(Reminder))).scalars())


def config(**overrides: object) -> DispatchConfig:
    values: dict[str, object] = {
        "instance": "replica-a", "caller_id": "+15550000000", "call_window": ALWAYS,
        "misfire_grace": timedelta(minutes=30), "concurrency": 8, "retry_base_delay": 0.01, "scan_interval": 0.05,
    }
    values.update(overrides)
    return DispatchConfig(**values)


async def lead_until(dispatcher: Dispatcher, term: FakeTerm, done: Callable[[], Awaitable[bool]]) -> None:
    task = asyncio.create_task(dispatcher.lead(term))
    try:
        await eventually(done)
    finally:
        term.ended.set()
        await asyncio.wait_for(task, 10)


async def all_final(db: Database) -> bool:
    return all(r.status not in ("pending", "dispatching") for r in await reminders(db))


async def test_each_due_reminder_is_called_once(db, client, provider) -> None:
    ids = await seed(db, 30)
    await lead_until(Dispatcher(db, GenericProvider(client), config()), FakeTerm(5), lambda: all_final(db))
    rows = await reminders(db)
    assert {r.status for r in rows} == {"sent"}
    assert all(r.fence_token == 5 and r.claimed_by == "replica-a" and r.attempts == 1 for r in rows)
    calls, requests = await provider_state(provider)
    assert sorted(c["idempotency_key"] for c in calls) == sorted(f"reminder-{i}" for i in ids)
    assert len(requests) == 30
    assert {r.provider_call_id for r in rows} == {c["id"] for c in calls}


async def test_future_reminders_wait(db, client, provider) -> None:
    await seed(db, 2, due_in=timedelta(hours=1))
    now_ids = await seed(db, 1)
    await lead_until(Dispatcher(db, GenericProvider(client), config()), FakeTerm(1), lambda: all_sent(db, now_ids))
    assert sorted(r.status for r in await reminders(db)) == ["pending", "pending", "sent"]


async def all_sent(db: Database, ids: list[str]) -> bool:
    return all(r.status == "sent" for r in await reminders(db) if r.id in ids)


async def test_older_token_is_fenced_out(db, client, provider) -> None:
    await seed(db, 3)
    store = ReminderStore(db)
    await store.raise_fence(10, "new-leader")
    with pytest.raises(StaleTerm):
        await store.raise_fence(9, "old-leader")
    with pytest.raises(StaleTerm):
        await Dispatcher(db, GenericProvider(client), config()).lead(FakeTerm(9))
    with pytest.raises(StaleTerm):
        await store.claim(9, "old-leader", limit=10, now=datetime.now(UTC), stale_after=timedelta(minutes=2))
    assert {r.status for r in await reminders(db)} == {"pending"}
    assert (await provider_state(provider))[1] == []
    assert await store.current_fence() == 10


async def test_deposed_leader_claims_nothing_once_the_fence_moved(db, client, provider) -> None:
    await seed(db, 3)
    store = ReminderStore(db)
    await store.raise_fence(3, "old")
    await store.raise_fence(4, "new")  # the successor started; the old leader's process goes on
    with pytest.raises(StaleTerm):
        await store.claim(3, "old", limit=10, now=datetime.now(UTC), stale_after=timedelta(minutes=2))
    assert {r.status for r in await reminders(db)} == {"pending"}


async def test_claimed_by_dead_leader_is_completed_with_the_same_key(db, client, provider) -> None:
    (reminder_id,) = await seed(db, 1)
    (other_id,) = await seed(db, 1)
    store = ReminderStore(db)
    await store.raise_fence(7, "dead-leader")
    claimed = await store.claim(7, "dead-leader", limit=10, now=datetime.now(UTC), stale_after=timedelta(minutes=2))
    assert {c.reminder_id for c in claimed} == {reminder_id, other_id}
    # The dead leader's call of one of them had reached the provider before it died.
    sent_before_dying = next(c for c in claimed if c.reminder_id == reminder_id)
    await client.place_call(
        CallRequest(
            to=sent_before_dying.phone, from_="+15550000000", message=message_for(sent_before_dying),
            appointment_id=sent_before_dying.appointment_id, reminder_id=reminder_id,
            idempotency_key=sent_before_dying.idempotency_key,
        )
    )
    await lead_until(Dispatcher(db, GenericProvider(client), config()), FakeTerm(8), lambda: all_final(db))
    rows = {r.id: r for r in await reminders(db)}
    assert rows[reminder_id].status == rows[other_id].status == "sent"
    assert rows[reminder_id].fence_token == 8
    calls, requests = await provider_state(provider)
    assert sorted(c["idempotency_key"] for c in calls) == sorted([f"reminder-{reminder_id}", f"reminder-{other_id}"])
    replays = [r for r in requests if r["replayed"]]
    assert [r["idempotency_key"] for r in replays] == [f"reminder-{reminder_id}"]


async def test_misfire_is_skipped_with_reason(db, client, provider) -> None:
    await seed(db, 1, due_in=timedelta(hours=-1))
    await seed(db, 1, due_in=timedelta(minutes=-5), starts_in=timedelta(minutes=-1))
    await lead_until(Dispatcher(db, GenericProvider(client), config()), FakeTerm(1), lambda: all_final(db))
    reasons = sorted(r.skip_reason for r in await reminders(db))
    assert {r.status for r in await reminders(db)} == {"skipped"}
    assert "started" in reasons[1] or "started" in reasons[0]
    assert any("misfire" in reason for reason in reasons)
    assert (await provider_state(provider))[1] == []


async def test_outside_call_window_waits_for_it(db, client, provider) -> None:
    now = datetime.now(UTC)
    # a one-hour window that opens 2 h from now, or (when that would wrap midnight) one that
    # closed 2 h ago and opens tomorrow: never both wrap, so the test runs at any time of day
    for start in (timedelta(hours=2), timedelta(hours=-3)):
        opens = (now + start).time().replace(second=0, microsecond=0)
        closes = (now + start + timedelta(hours=1)).time().replace(second=0, microsecond=0)
        if opens < closes:
            break
    window = CallWindow(opens, closes)
    (waits,) = await seed(db, 1, starts_in=timedelta(days=2))
    (skips,) = await seed(db, 1, starts_in=timedelta(minutes=30))

    async def decided() -> bool:
        rows = {r.id: r for r in await reminders(db)}
        return rows[skips].status == "skipped" and rows[waits].next_attempt_at > now + timedelta(hours=1)

    await lead_until(Dispatcher(db, GenericProvider(client), config(call_window=window)), FakeTerm(1), decided)
    rows = {r.id: r for r in await reminders(db)}
    assert rows[waits].status == "pending" and rows[waits].attempts == 0
    assert rows[waits].next_attempt_at.time().replace(second=0, microsecond=0) == opens
    assert "window" in rows[skips].skip_reason
    assert (await provider_state(provider))[1] == []


async def test_transient_failures_retry_with_backoff_then_fail(db, provider, client) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=provider), base_url="http://provider") as http:
        await http.post("/v1/control", json={"fail_rate": 1.0, "fail_status": 503})
    (reminder_id,) = await seed(db, 1)
    dispatcher = Dispatcher(db, GenericProvider(client), config(max_attempts=3))
    await lead_until(dispatcher, FakeTerm(1), lambda: all_final(db))
    (row,) = await reminders(db)
    assert row.status == "failed" and row.attempts == 3 and "503" in row.last_error
    _, requests = await provider_state(provider)
    assert [r["idempotency_key"] for r in requests] == [f"reminder-{reminder_id}"] * 3


async def test_transient_then_success(db, provider, client) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=provider), base_url="http://provider") as http:
        await http.post("/v1/control", json={"fail_rate": 1.0, "fail_status": 429})
        (reminder_id,) = await seed(db, 1)
        dispatcher = Dispatcher(db, GenericProvider(client), config(max_attempts=5))
        term = FakeTerm(1)
        task = asyncio.create_task(dispatcher.lead(term))

        async def retry_pending() -> bool:
            (row,) = await reminders(db)
            return row.attempts >= 1 and row.status == "pending"

        await eventually(retry_pending)
        (row,) = await reminders(db)
        planned = row.next_attempt_at.timestamp()
        (refused,) = (await http.get("/v1/requests")).json()["requests"]
        # 429 carried Retry-After: 1: the retry is planned at least 1 s after the refused request
        # arrived. Both stamps come from this process's clock and the dispatcher computes its time
        # after the answer, so a slow machine only widens the gap (no margin needed).
        assert refused["status"] == 429 and planned >= refused["received_at"] + 1.0
        await http.post("/v1/control", json={"fail_rate": 0.0})
        await eventually(lambda: all_final(db))
        term.ended.set()
        await task
        retried = (await http.get("/v1/requests")).json()["requests"][1]
    (row,) = await reminders(db)
    assert row.status == "sent" and row.attempts == 2
    assert retried["status"] == 201 and retried["received_at"] >= planned  # not sent before its time


def test_retry_delay_honours_retry_after_and_backs_off_within_its_bounds() -> None:
    """The value the dispatcher plans a retry with: never before Retry-After; else base * 2^(n-1)
    jittered to [half, whole], capped."""
    planned = config(retry_base_delay=0.01, retry_max_delay=8.0)
    assert planned.retry_delay(1, 1.0) == 1.0  # backoff (≤ 0.01 s) is below Retry-After
    for attempts, whole in ((1, 0.01), (4, 0.08), (20, 8.0)):
        for _ in range(50):
            assert whole / 2 <= planned.retry_delay(attempts, None) <= whole
    assert planned.retry_delay(20, 30.0) == 30.0  # Retry-After beats the cap


async def test_permanent_failure_fails_at_once(db, client, provider) -> None:
    telephony = HttpTelephonyClient("http://provider", token="wrong", transport=httpx.ASGITransport(
        app=create_fake_provider(token="right")))
    await seed(db, 1)
    await lead_until(Dispatcher(db, GenericProvider(telephony), config()), FakeTerm(1), lambda: all_final(db))
    (row,) = await reminders(db)
    assert row.status == "failed" and row.attempts == 1 and "401" in row.last_error
    await telephony.aclose()


async def test_an_ended_term_calls_nobody(db, client, provider) -> None:
    await seed(db, 5)
    term = FakeTerm(1)
    term.ended.set()
    await asyncio.wait_for(Dispatcher(db, GenericProvider(client), config()).lead(term), 10)
    assert (await provider_state(provider))[1] == []
    assert {r.status for r in await reminders(db)} == {"pending"}


async def test_cancelled_appointment_is_not_called(db, client, provider) -> None:
    await seed(db, 1)
    async with db.session() as session:
        (appointment,) = (await session.execute(select(Appointment))).scalars()
        appointment.status = "cancelled"
        await session.commit()
    await lead_until(Dispatcher(db, GenericProvider(client), config()), FakeTerm(1), lambda: all_final(db))
    assert [r.status for r in await reminders(db)] == ["cancelled"]
    assert (await provider_state(provider))[1] == []


async def test_a_term_lost_between_check_and_send_sends_nothing(db, client, provider) -> None:
    """As if the process froze right after its term check: the client's last-moment check refuses,
    the provider sees nothing, no attempt is spent, and the reminder stays `dispatching` for the
    next term to complete with the same key."""
    (reminder_id,) = await seed(db, 1)
    term = FakeTerm(3)

    class FreezesBeforeSending:
        async def place_call(self, request, *, may_send=None):
            term.ended.set()  # the lease ran out while "frozen"
            return await client.place_call(request, may_send=may_send)

        async def aclose(self) -> None:
            pass

    await asyncio.wait_for(Dispatcher(db, GenericProvider(FreezesBeforeSending()), config()).lead(term), 10)
    (row,) = await reminders(db)
    assert (row.status, row.attempts, row.fence_token) == ("dispatching", 0, 3)
    # No call. (Over ASGI the provider sees the headers before the refused body; over TCP not even
    # those leave: tests/test_chaos.py checks that against a real provider process.)
    calls, requests = await provider_state(provider)
    assert calls == [] and all(r["status"] is None for r in requests)
    await lead_until(Dispatcher(db, GenericProvider(client), config()), FakeTerm(4), lambda: all_final(db))
    calls, _ = await provider_state(provider)
    assert [c["idempotency_key"] for c in calls] == [f"reminder-{reminder_id}"]


class _StoreDownFor:
    """A ReminderStore stand-in whose outcome writes fail `failures` times, as while PostgreSQL is down."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.writes = 0

    async def finish_many(self, token: int, outcomes: list) -> dict[str, str]:
        self.writes += 1
        if self.writes <= self.failures:
            raise ConnectionError("database unavailable")
        return {}  # every one recorded


async def test_outcomes_wait_out_a_database_outage_only_while_the_term_is_valid() -> None:
    """Given up on, an outcome leaves its reminder `dispatching` until the 2-minute stale sweep; so
    while the term is valid the recorder keeps retrying past its retry budget (1 here)."""
    store = _StoreDownFor(failures=3)
    valid = OutcomeRecorder(store, 7, max_batch=10, max_delay=0, keep_trying=lambda: True, retries=1)
    assert await asyncio.wait_for(valid.record("r-1", Outcome.sent("c-1", datetime.now(UTC))), 30) is None
    assert store.writes == 4

    store = _StoreDownFor(failures=3)
    ended = OutcomeRecorder(store, 7, max_batch=10, max_delay=0, keep_trying=lambda: False, retries=1)
    why_not = await asyncio.wait_for(ended.record("r-2", Outcome.sent("c-2", datetime.now(UTC))), 30)
    assert why_not is not None and "a later claim completes it" in why_not
    assert store.writes == 1


class ClaimCounter:
    """Counts the dispatcher's claims (its `_claim_some`), each still made."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.count = 0
        self._claim = dispatcher._claim_some
        dispatcher._claim_some = self._counted  # type: ignore[method-assign]

    async def _counted(self, term, free):
        self.count += 1
        return await self._claim(term, free)


class _HeldClient:
    """Each call waits until the test lets it through, one at a time."""

    def __init__(self) -> None:
        self.waiting: asyncio.Queue[asyncio.Event] = asyncio.Queue()
        self.answered = 0

    async def place_call(self, request: CallRequest, *, may_send=None) -> CallOutcome:
        go = asyncio.Event()
        await self.waiting.put(go)
        await go.wait()
        self.answered += 1
        return CallOutcome(OutcomeKind.SENT, call_id=f"call-{self.answered}", status_code=201)

    async def aclose(self) -> None:
        pass


async def test_a_claim_that_found_less_than_it_asked_waits_for_the_scan_not_for_a_freed_slot(db) -> None:
    """Nothing else was due when a claim came back short: calls ending one by one must not each
    cost a claim (they did: a claim per freed slot, a claim per call at a provider's rate)."""
    scan = 1.0
    await seed(db, 6)
    client = _HeldClient()
    dispatcher = Dispatcher(db, GenericProvider(client), config(concurrency=8, scan_interval=scan))
    claims = ClaimCounter(dispatcher)
    term = FakeTerm(5)
    task = asyncio.create_task(dispatcher.lead(term))
    try:
        started = asyncio.get_running_loop().time()
        for through in range(1, 7):  # each call let through once the previous one's slot is free
            go = await asyncio.wait_for(client.waiting.get(), 10)
            go.set()
            await poll_until(lambda left=6 - through: len(dispatcher._slots) <= left, 10, "the call's slot freed")
        elapsed = asyncio.get_running_loop().time() - started
        # the first claim, then one per scan that passed (a slow machine only loosens the bound)
        assert claims.count <= 2 + int(elapsed / scan), (claims.count, elapsed)
        await eventually(lambda: all_final(db))
    finally:
        term.ended.set()
        await asyncio.wait_for(task, 10)
