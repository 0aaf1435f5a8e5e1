"""Attempts for providers without idempotency: the reconciliation rule, the fenced record, and one
claimed reminder end to end against the Twilio-shaped fake (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from service.db import CallAttempt, Database, Reminder
from service.dispatch.stamped import StampedCalls, StampedConfig
from service.ledger import AttemptStore, Claim, Outcome, ReminderStore
from service.reminders.attempts import RECHECK, AttemptView, Step, reconcile
from service.telephony.provider import CallSpec, CreateKind, CreateResult, LiveCall
from tests.support.providers import FROM, TwilioRig, make_rig, rig_on
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
GRACE = timedelta(seconds=30)


def attempt(state: str = "creating", *, at: datetime = T0, call_id: str | None = None,
            event_at: datetime | None = None) -> AttemptView:
    return AttemptView(id=f"att-{state}-{at.second}", state=state, created_at=at, provider_call_id=call_id,
                       last_event_at=event_at)


def live(created_at: datetime | None) -> datetime | None:
    """A live call to the number, as the rule sees it: when it was created (None for unknown)."""
    return created_at


# --- the rule ---------------------------------------------------------------------------------


def test_a_bound_or_evidenced_call_means_sent() -> None:
    assert reconcile([attempt()], bound_call_id="CAb", now=T0, grace=GRACE).step is Step.SENT
    for evidenced in (attempt("created", call_id="CAx"), attempt("in_doubt", call_id="CAx"),
                      attempt("creating", event_at=T0)):
        decision = reconcile([attempt("not_created"), evidenced], bound_call_id=None, now=T0 + GRACE * 9, grace=GRACE)
        assert decision.step is Step.SENT and decision.abandon == ()


def test_no_unresolved_attempt_means_a_new_one() -> None:
    assert reconcile([], bound_call_id=None, now=T0, grace=GRACE).step is Step.NEW
    assert reconcile([attempt("not_created")], bound_call_id=None, now=T0, grace=GRACE).step is Step.NEW


def test_an_attempt_in_doubt_waits_out_its_grace_then_asks_for_live_calls() -> None:
    young = reconcile([attempt("in_doubt")], bound_call_id=None, now=T0 + timedelta(seconds=1), grace=GRACE)
    assert young.step is Step.WAIT and young.wait_until == T0 + timedelta(seconds=1) + RECHECK
    assert young.wait_until <= T0 + GRACE
    old = reconcile([attempt("creating")], bound_call_id=None, now=T0 + GRACE, grace=GRACE)
    assert old.step is Step.LIST


def test_a_live_call_since_the_attempt_blocks_a_new_one_even_queued_without_a_date() -> None:
    now = T0 + GRACE * 3
    for call in (live(T0 + timedelta(seconds=5)), live(None), live(T0 - timedelta(seconds=30))):
        decision = reconcile([attempt("in_doubt")], bound_call_id=None, now=now, grace=GRACE, live_created=[call])
        assert decision.step is Step.WAIT and decision.wait_until == now + RECHECK


def test_no_live_call_after_the_grace_abandons_and_creates_anew() -> None:
    unresolved = [attempt("creating"), attempt("in_doubt", at=T0 + timedelta(seconds=3))]
    ancient = live(T0 - timedelta(hours=1))  # a call to the same number long before: not this attempt's
    decision = reconcile(unresolved, bound_call_id=None, now=T0 + GRACE * 3, grace=GRACE, live_created=[ancient])
    assert decision.step is Step.NEW and set(decision.abandon) == {a.id for a in unresolved}


# --- the database and the fake -------------------------------------------------------------------


@pytest.fixture
async def rig(db: Database) -> AsyncIterator[TwilioRig]:
    async with rig_on(db, "twilio", calls_per_second=0, ring_ms=30) as rig:
        yield rig


async def age_attempts(db: Database, reminder_id: str, by: timedelta) -> None:
    """The reminder's attempts made `by` earlier: time passing on the database's clock, which the
    reconciliation reads."""
    async with db.session() as session:
        rows = await session.execute(select(CallAttempt.id, CallAttempt.created_at)
                                     .where(CallAttempt.reminder_id == reminder_id))
        for attempt_id, created_at in rows.all():
            await session.execute(update(CallAttempt).where(CallAttempt.id == attempt_id)
                                  .values(created_at=created_at - by))
        await session.commit()


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def claimed(rig: TwilioRig, token: int, clock: Clock, phone: str = "+14155552671") -> Claim:
    """A reminder claimed `dispatching` under `token`, as the dispatcher would have it."""
    store = ReminderStore(rig.db)
    await store.raise_fence(token, "test")
    reminder_id, _ = await rig.seed(phone=phone, attempts=0, status="pending")
    (claim,) = [c for c in await store.claim(token, "test", limit=10, now=clock(), stale_after=timedelta(minutes=2))
                if c.reminder_id == reminder_id]
    return claim


def stamped(rig: TwilioRig, provider=None) -> StampedCalls:
    return StampedCalls(rig.db, provider or rig.provider, StampedConfig(
        caller_id=FROM, reconcile_grace=GRACE, max_attempts=5, retry_delay=lambda n, after: after or 1.0))


def finisher(rig: TwilioRig, token: int, log: list[dict]) -> Callable[..., Awaitable[None]]:
    async def finish(claim: Claim, outcome: Outcome) -> None:
        log.append(outcome.columns())
        assert await ReminderStore(rig.db).finish_many(token, [(claim.reminder_id, outcome)]) == {}

    return finish


async def attempts_of(db: Database, reminder_id: str) -> list:
    async with db.session() as session:
        return list(await session.execute(select(CallAttempt.__table__).where(CallAttempt.reminder_id == reminder_id)
                                          .order_by(CallAttempt.created_at)))


async def reminder(db: Database, reminder_id: str):
    async with db.session() as session:
        return (await session.execute(select(Reminder.__table__).where(Reminder.id == reminder_id))).one()


async def reclaim(rig: TwilioRig, token: int, claim: Claim, clock: Clock) -> Claim:
    """The reminder claimed again. Polled: the claim skips locked rows (SKIP LOCKED), and the call's
    last webhook may still hold the reminder's row for a moment after the fake reports it done."""

    async def claimed_again() -> Claim | None:
        claims = await ReminderStore(rig.db).claim(token, "test", limit=10, now=clock(),
                                                   stale_after=timedelta(minutes=2))
        return next((c for c in claims if c.reminder_id == claim.reminder_id), None)

    again = await eventually(claimed_again, timeout=10)
    assert isinstance(again, Claim)
    return again


async def test_created_attempt_marks_sent_and_the_call_speaks_once(rig: TwilioRig) -> None:
    clock, log = Clock(), []
    claim = await claimed(rig, 7, clock)
    result = await stamped(rig).handle(claim, token=7, may_send=lambda: True, now=clock, finish=finisher(rig, 7, log))
    assert result is not None and result.kind is CreateKind.CREATED
    (row,) = await attempts_of(rig.db, claim.reminder_id)
    assert (row.state, row.provider_call_id, row.fencing_token) == ("created", result.call_id, 7)
    assert log[-1]["status"] == "sent"
    await eventually(lambda: _done(rig))
    assert [c.heard != [] for c in rig.fake.calls.values()] == [True]
    assert (await reminder(rig.db, claim.reminder_id)).outcome == "answered"


async def _done(rig: TwilioRig) -> bool:
    return all(c.status in ("completed", "canceled") for c in rig.fake.calls.values())


async def test_a_5xx_after_the_call_was_created_is_reconciled_not_repeated(rig: TwilioRig) -> None:
    clock, log = Clock(), []
    rig.fake.controls.fail_after_create_rate = 1.0
    claim = await claimed(rig, 3, clock)
    calls = stamped(rig)
    result = await calls.handle(claim, token=3, may_send=lambda: True, now=clock, finish=finisher(rig, 3, log))
    assert result.kind is CreateKind.IN_DOUBT and log[-1]["status"] == "pending"
    await eventually(lambda: _done(rig))  # the call went ahead; its webhooks named the attempt
    clock.offset = GRACE * 2
    again = await reclaim(rig, 3, claim, clock)
    assert await calls.handle(again, token=3, may_send=lambda: True, now=clock, finish=finisher(rig, 3, log)) is None
    assert log[-1]["status"] == "sent" and len(rig.fake.calls) == 1
    assert sum(bool(c.heard) for c in rig.fake.calls.values()) == 1


class NoCallInDoubt:
    """A provider whose create times out before reaching the provider: in doubt, and no call exists."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.dedupes_creation = inner, "twilio", False
        self.creates = 0

    async def create_call(self, spec: CallSpec, *, may_send=None) -> CreateResult:
        self.creates += 1
        return CreateResult(CreateKind.IN_DOUBT, error="timeout: ReadTimeout")

    async def live_calls(self, to: str) -> list[LiveCall]:
        return await self.inner.live_calls(to)

    async def cancel(self, call_id: str) -> bool:
        return await self.inner.cancel(call_id)

    async def aclose(self) -> None:
        pass


async def test_an_attempt_in_doubt_without_a_call_is_replaced_only_after_the_grace(rig: TwilioRig) -> None:
    clock, log = Clock(), []
    claim = await claimed(rig, 4, clock)
    doubtful = NoCallInDoubt(rig.provider)
    await stamped(rig, doubtful).handle(claim, token=4, may_send=lambda: True, now=clock, finish=finisher(rig, 4, log))
    assert doubtful.creates == 1 and log[-1]["status"] == "pending"

    clock.offset = RECHECK  # looked at again, still within the grace: wait, do not create
    again = await reclaim(rig, 4, claim, clock)
    assert await stamped(rig).handle(again, token=4, may_send=lambda: True, now=clock,
                                     finish=finisher(rig, 4, log)) is None
    assert log[-1]["status"] == "pending" and rig.fake.calls == {}

    await age_attempts(rig.db, claim.reminder_id, GRACE * 2)  # past the grace, no event, no live call
    again = await reclaim(rig, 4, claim, clock)
    result = await stamped(rig).handle(again, token=4, may_send=lambda: True, now=clock, finish=finisher(rig, 4, log))
    assert result.kind is CreateKind.CREATED and log[-1]["status"] == "sent"
    states = [row.state for row in await attempts_of(rig.db, claim.reminder_id)]
    assert states == ["not_created", "created"]


async def test_a_live_call_to_the_number_holds_back_a_new_attempt(db: Database) -> None:
    rig = make_rig(db, "twilio", calls_per_second=0, ring_ms=60_000)  # the other call rings for a minute
    try:
        clock, log = Clock(), []
        claim = await claimed(rig, 5, clock)
        await rig.provider.create_call(CallSpec(to=claim.phone, from_=FROM, reminder_id="someone-else",
                                                appointment_id="-", attempt_id="unknown"))
        await stamped(rig, NoCallInDoubt(rig.provider)).handle(claim, token=5, may_send=lambda: True, now=clock,
                                                               finish=finisher(rig, 5, log))
        await age_attempts(rig.db, claim.reminder_id, GRACE * 2)
        again = await reclaim(rig, 5, claim, clock)
        assert await stamped(rig).handle(again, token=5, may_send=lambda: True, now=clock,
                                         finish=finisher(rig, 5, log)) is None
        assert log[-1]["status"] == "pending" and len(rig.fake.calls) == 1
    finally:
        await rig.aclose()


async def test_begin_is_fenced(rig: TwilioRig) -> None:
    clock = Clock()
    claim = await claimed(rig, 8, clock)
    store = AttemptStore(rig.db)
    assert await store.begin(7, claim.reminder_id) is None  # an older term
    await ReminderStore(rig.db).raise_fence(9, "successor")
    assert await store.begin(8, claim.reminder_id) is None  # deposed
    assert await attempts_of(rig.db, claim.reminder_id) == []
    result = await stamped(rig).handle(claim, token=8, may_send=lambda: True, now=clock,
                                       finish=finisher(rig, 8, []))
    assert result is None and rig.fake.calls == {}


async def test_a_refused_send_records_not_created_and_leaves_the_claim(rig: TwilioRig) -> None:
    clock, log = Clock(), []
    claim = await claimed(rig, 6, clock)
    allowed = iter([True, False])  # the term ends between the record and the first byte
    result = await stamped(rig).handle(claim, token=6, may_send=lambda: next(allowed, False), now=clock,
                                       finish=finisher(rig, 6, log))
    assert result.kind is CreateKind.NOT_SENT and log == [] and rig.fake.calls == {}
    (row,) = await attempts_of(rig.db, claim.reminder_id)
    assert row.state == "not_created"
    assert (await reminder(rig.db, claim.reminder_id)).status == "dispatching"
