"""Calls people agreed to (issue 23), on SQLite and PostgreSQL: the keypad opt-out and the
do-not-call list, the caps per number, "confirmed" means done, the spacing of one appointment's
reminders. Real providers through their fakes (tests/support/providers.py), the generic provider
through its fake, the API as a client sees it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import insert, select

from reminders_fakes.controls import CalleeScript
from service import appointments
from service.config import Settings
from service.db import Appointment, CallAttempt, Database, Reminder
from service.db.models import DoNotCall, new_id
from service.dispatch.dispatcher import Dispatcher
from service.ledger import AttemptStore, ReminderStore, consent
from service.ledger.consent import ListingSource
from service.providers.generic import GenericProvider
from service.reminders import (
    ALWAYS,
    CallCaps,
    CallWindow,
    PlanningConfig,
    ReminderOffset,
    cap_hold,
    idempotency_key,
    plan_reminders,
)
from tests.support.appclient import make_settings, running_app
from tests.support.outcomes import TEMPLATES, book, metric
from tests.support.providers import PROVIDERS, Rig, rig_on
from tests.support.rows import appointment_row, reminder_row
from tests.test_dispatch import FakeTerm, client, config, lead_until, provider, provider_state  # noqa: F401

pytestmark = pytest.mark.anyio

OPTED_OUT_WORDS = "You will receive no more reminder calls from us. Goodbye."
PLANNING = PlanningConfig(call_window=ALWAYS, offsets=(), templates=TEMPLATES, spacing=timedelta(hours=1))


async def _book_ahead(db: Database, phone: str, *, remind_in: timedelta = timedelta(hours=1),
                      starts_in: timedelta = timedelta(hours=3)) -> tuple[str, str]:
    """An appointment whose one reminder is not due yet: (appointment id, reminder id)."""
    now = datetime.now(UTC)
    view = await appointments.create(db, appointments.NewAppointment(
        customer_name="Ann Example", phone=phone, starts_at=now + starts_in, timezone="UTC",
        remind_at=[now + remind_in]), PLANNING)
    return view["id"], view["reminders"][0]["id"]


# -- the keypad opt-out ------------------------------------------------------------------------------


@pytest.fixture(params=PROVIDERS)
async def rig(request: pytest.FixtureRequest, db: Database) -> AsyncIterator[Rig]:
    async with rig_on(db, request.param, ring_ms=20, templates=TEMPLATES,
                      **({"speak_ms": 20} if request.param == "telnyx" else {})) as rig:
        yield rig


async def test_pressing_the_opt_out_key_lists_the_number_and_skips_every_reminder_of_it(
    db: Database, rig: Rig,
) -> None:
    phone = "+14155550131"
    rig.fake.callees[phone] = CalleeScript("answer", digits="9")
    appointment_id, (called, later) = await book(db, phone, later=True)
    _, other = await _book_ahead(db, phone)  # another appointment of the same number
    _, stranger = await _book_ahead(db, "+14155550132")
    opt_outs = metric("reminders_opt_outs_total", source="keypad")
    await lead_until(Dispatcher(db, rig.provider, config()), FakeTerm(1), rig.phone_over(phone))
    (call,) = rig.calls_to(phone)
    assert call.digits == ["9"] and call.heard[-1] == OPTED_OUT_WORDS
    assert (await reminder_row(db, called)).outcome == "answered"
    for reminder_id in (later, other):
        row = await reminder_row(db, reminder_id)
        assert (row.status, row.skip_reason) == ("skipped", "opted out")
    assert (await reminder_row(db, stranger)).status == "pending"
    assert (await appointment_row(db, appointment_id)).status == "scheduled"  # the appointment itself stands
    listing = await consent.listed(db, phone)
    assert listing is not None and listing.source is ListingSource.KEYPAD
    assert metric("reminders_opt_outs_total", source="keypad") == opt_outs + 1
    # booked later: accepted, its reminders skipped; taken off the list: called again
    booked = await appointments.create(db, appointments.NewAppointment(
        customer_name="Ann", phone=phone, starts_at=datetime.now(UTC) + timedelta(days=2), timezone="UTC",
        remind_at=[datetime.now(UTC) + timedelta(days=1)]), PLANNING)
    assert [(r["status"], r["skip_reason"]) for r in booked["reminders"]] == [("skipped", "opted out")]
    assert await consent.unlist(db, phone) and await consent.listed(db, phone) is None
    _, again = await _book_ahead(db, phone)
    assert (await reminder_row(db, again)).status == "pending"


async def test_the_opt_out_key_is_the_one_the_wording_announced(db: Database, rig: Rig) -> None:
    """A reminder worded with OPT_OUT_DIGIT=7: 7 opts out, 9 is just a wrong key."""
    phone = "+14155550133"
    templates = TEMPLATES.__class__.parse(json.dumps({"en-US": {}}), opt_out_digit="7")
    now = datetime.now(UTC)
    await appointments.create(db, appointments.NewAppointment(
        customer_name="Ann", phone=phone, starts_at=now + timedelta(hours=2), timezone="UTC",
        remind_at=[now + timedelta(milliseconds=100)]), PlanningConfig(call_window=ALWAYS, offsets=(),
                                                                      templates=templates))
    rig.fake.callees[phone] = CalleeScript("answer", digits=["9", "7"])
    await lead_until(Dispatcher(db, rig.provider, config()), FakeTerm(1), rig.phone_over(phone))
    (call,) = rig.calls_to(phone)
    assert call.heard[0].endswith("To receive no more reminder calls, press 7.")
    assert call.heard[1:] == ["Press 1 to confirm, press 2 to cancel. To receive no more reminder calls, press 7.",
                              OPTED_OUT_WORDS]
    assert await consent.listed(db, phone) is not None


# -- no call to a listed number, even one being claimed as it is listed ------------------------------


async def _seed_due(db: Database, phone: str, *, starts_in: timedelta = timedelta(hours=2),
                    due_in: timedelta = timedelta(seconds=-1)) -> str:
    hasher = await consent.phone_hasher(db)
    now = datetime.now(UTC)
    appointment_id, reminder_id = new_id(), new_id()
    async with db.session() as session:
        await session.execute(insert(Appointment).values(
            id=appointment_id, customer_name="Ann", phone=phone, phone_hash=hasher(phone), starts_at=now + starts_in,
            timezone="UTC", status="scheduled"))
        await session.execute(insert(Reminder).values(
            id=reminder_id, appointment_id=appointment_id, due_at=now + due_in, next_attempt_at=now + due_in,
            status="pending", attempts=0, idempotency_key=idempotency_key(reminder_id)))
        await session.commit()
    return reminder_id


async def _list_without_skipping(db: Database, phone: str) -> None:
    """The listing as a racing transaction leaves it: on the list, the reminder not yet skipped."""
    phone_hash = (await consent.phone_hasher(db))(phone)
    async with db.session() as session:
        await session.execute(insert(DoNotCall).values(phone_hash=phone_hash, source="api",
                                                       listed_at=datetime.now(UTC)))
        await session.commit()


async def test_an_attempt_is_refused_for_a_number_listed_after_its_claim(db: Database) -> None:
    phone = "+14155550134"
    listed_by_api, raced = await _seed_due(db, phone), await _seed_due(db, "+14155550135")
    store = ReminderStore(db)
    await store.raise_fence(3, "leader")
    claimed = await store.claim(3, "leader", limit=10, stale_after=timedelta(minutes=2))
    assert {c.reminder_id for c in claimed} == {listed_by_api, raced}
    listing = await consent.add(db, phone)  # skips the claimed reminder in the listing's transaction
    assert listing.new and listing.skipped == {listed_by_api}
    assert await AttemptStore(db).begin(3, listed_by_api) is None
    await _list_without_skipping(db, "+14155550135")  # its skip missed the claim: `begin` still refuses
    assert await AttemptStore(db).begin(3, raced) is None
    assert (await reminder_row(db, listed_by_api)).skip_reason == "opted out"


async def test_the_generic_provider_never_calls_a_number_listed_between_claim_and_create(
    db: Database, client, provider,  # noqa: F811
) -> None:
    phone = "+14155550136"
    reminder_id = await _seed_due(db, phone)
    dispatcher = Dispatcher(db, GenericProvider(client), config())

    async def listed_while_waiting_for_the_rate_limiter() -> None:
        await _list_without_skipping(db, phone)

    dispatcher._limiter.acquire = listed_while_waiting_for_the_rate_limiter  # type: ignore[method-assign]

    async def done() -> bool:
        return (await reminder_row(db, reminder_id)).status == "skipped"

    await lead_until(dispatcher, FakeTerm(1), done)
    calls, _ = await provider_state(provider)
    assert calls == [] and (await reminder_row(db, reminder_id)).skip_reason == "opted out"


async def test_a_claim_skips_a_listed_number_whose_reminder_the_listing_missed(db: Database, client,  # noqa: F811
                                                                              provider) -> None:  # noqa: F811
    phone = "+14155550137"
    reminder_id = await _seed_due(db, phone)
    await _list_without_skipping(db, phone)  # e.g. booked while the number was being listed
    await lead_until(Dispatcher(db, GenericProvider(client), config()), FakeTerm(1),
                     lambda: _status_is(db, reminder_id, "skipped"))
    assert (await provider_state(provider))[0] == []


async def _status_is(db: Database, reminder_id: str, status: str) -> bool:
    return (await reminder_row(db, reminder_id)).status == status


# -- the API ----------------------------------------------------------------------------------------------


@pytest.fixture
async def api(database_url: str, etcd_endpoint: str):
    async with running_app(make_settings(database_url, etcd_endpoint)) as client_:
        yield client_


def _body(phone: str, **overrides: object) -> dict:
    starts = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    return {"customer_name": "Jörg", "phone": phone, "starts_at": starts.isoformat(), "timezone": "UTC",
            **overrides}


async def test_the_do_not_call_api(api) -> None:
    phone = "+14155550138"
    booked = (await api.post("/appointments", json=_body(phone))).json()
    assert [r["status"] for r in booked["reminders"]] == ["pending"]
    assert (await api.get("/do-not-call/%2B14155550138")).status_code == 404
    put = await api.put(f"/do-not-call/{phone}")
    assert put.status_code == 201 and put.json()["source"] == "api" and put.json()["skipped"] == 1
    again = await api.put("/do-not-call/%2B14155550138")
    assert again.status_code == 200 and again.json()["listed_at"] == put.json()["listed_at"]
    got = await api.get(f"/do-not-call/{phone}")
    assert got.status_code == 200 and got.json()["phone"] == phone
    reminder = (await api.get(f"/appointments/{booked['id']}")).json()["reminders"][0]
    assert (reminder["status"], reminder["skip_reason"]) == ("skipped", "opted out")
    created = (await api.post("/appointments", json=_body(phone))).json()
    assert [(r["status"], r["skip_reason"]) for r in created["reminders"]] == [("skipped", "opted out")]
    other = (await api.post("/appointments", json=_body("+14155550139"))).json()
    patched = (await api.patch(f"/appointments/{other['id']}", json={"phone": phone})).json()
    assert [r["status"] for r in patched["reminders"] if r["skip_reason"] != "re-planned"] == ["skipped"]
    assert (await api.delete(f"/do-not-call/{phone}")).status_code == 204
    assert (await api.delete(f"/do-not-call/{phone}")).status_code == 204  # idempotent
    assert (await api.get(f"/do-not-call/{phone}")).status_code == 404
    after = (await api.post("/appointments", json=_body(phone))).json()
    assert [r["status"] for r in after["reminders"]] == ["pending"]


@pytest.mark.parametrize("bad", ["14155550138", "+1415", "+99912345678", "%2B1415555013x"])
async def test_the_do_not_call_api_refuses_what_is_not_a_number(api, bad: str) -> None:
    for method in ("PUT", "GET", "DELETE"):
        response = await api.request(method, f"/do-not-call/{bad}")
        assert response.status_code == 422, (method, bad, response.text)
        assert response.json()["detail"][0]["loc"] == ["path", "phone"]


async def test_the_do_not_call_api_needs_the_token(database_url: str, etcd_endpoint: str) -> None:
    async with running_app(make_settings(database_url, etcd_endpoint, api_token="secret")) as api:
        assert (await api.put("/do-not-call/+14155550138")).status_code == 401
        allowed = await api.put("/do-not-call/+14155550138", headers={"authorization": "Bearer secret"})
        assert allowed.status_code == 201


# -- caps per number --------------------------------------------------------------------------------------


async def test_caps_one_call_and_the_others_wait_or_are_skipped(db: Database, client, provider) -> None:  # noqa: F811
    """1 a day, 3 a week: three appointments of one number due at once make one call; the one whose
    appointment is days away waits a day, the one starting in two hours is skipped."""
    phone = "+14155550140"
    first = await _seed_due(db, phone, due_in=timedelta(seconds=-3))
    soon = await _seed_due(db, phone, due_in=timedelta(seconds=-2))
    later = await _seed_due(db, phone, due_in=timedelta(seconds=-1), starts_in=timedelta(days=3))
    deferred = metric("reminders_capped_total", cap="day", action="deferred")

    async def settled() -> bool:
        rows = {r: await reminder_row(db, r) for r in (first, soon, later)}
        return (rows[first].status == "sent" and rows[soon].status == "skipped"
                and rows[later].next_attempt_at > datetime.now(UTC) + timedelta(hours=1))

    await lead_until(Dispatcher(db, GenericProvider(client), config(caps=CallCaps(per_day=1, per_week=3))),
                     FakeTerm(1), settled)
    calls, _ = await provider_state(provider)
    assert [c["to"] for c in calls] == [phone]
    sent, skipped, waiting = [await reminder_row(db, r) for r in (first, soon, later)]
    assert skipped.skip_reason.startswith("call cap: 1 call(s) per day")
    assert waiting.status == "pending" and waiting.last_error.startswith("call cap per day reached")
    assert waiting.next_attempt_at - sent.sent_at >= timedelta(hours=23, minutes=59)
    assert metric("reminders_capped_total", cap="day", action="deferred") > deferred


async def _attempt(db: Database, reminder_id: str, **values: object) -> None:
    async with db.session() as session:
        await session.execute(insert(CallAttempt).values(id=new_id(), reminder_id=reminder_id, fencing_token=1,
                                                         **values))
        await session.commit()


@pytest.mark.parametrize(("attempt", "counts"), [
    ({"state": "created", "call_status": "ringing", "rang_at": datetime.now(UTC)}, True),
    ({"state": "created", "call_status": "canceled", "rang_at": datetime.now(UTC)}, True),  # it rang first
    ({"state": "in_doubt"}, True),  # in doubt until resolved
    ({"state": "created", "call_status": "queued"}, True),  # on its way
    ({"state": "not_created"}, False),
    ({"state": "created", "call_status": "failed"}, False),  # ended without ringing
    ({"state": "created", "call_status": "busy"}, False),
])
async def test_what_counts_against_a_cap(db: Database, attempt: dict, counts: bool) -> None:
    """Another reminder's attempt to the number, as a real provider leaves it."""
    phone = "+14155550141"
    earlier = await _seed_due(db, phone, due_in=timedelta(hours=1))  # not due: only its attempt matters
    await _attempt(db, earlier, **attempt)
    due = await _seed_due(db, phone)
    store = ReminderStore(db)
    await store.raise_fence(1, "leader")
    (claim,) = await store.claim(1, "leader", limit=5, stale_after=timedelta(minutes=2), caps=CallCaps(per_day=1))
    assert claim.reminder_id == due and (claim.cap is not None) is counts


async def test_a_reminders_own_attempt_in_doubt_never_holds_its_reconciliation(db: Database) -> None:
    phone = "+14155550142"
    reminder_id = await _seed_due(db, phone)
    await _attempt(db, reminder_id, state="in_doubt")
    store = ReminderStore(db)
    await store.raise_fence(1, "leader")
    (claim,) = await store.claim(1, "leader", limit=5, stale_after=timedelta(minutes=2), caps=CallCaps(per_day=1))
    assert claim.cap is None
    # its own call that rang does count: a no-answer retry waits for the next day
    await _attempt(db, reminder_id, state="created", call_status="no-answer", rang_at=datetime.now(UTC))
    async with db.session() as session:  # back to pending, as a no-answer retry leaves it
        await session.execute(Reminder.__table__.update().where(Reminder.id == reminder_id)
                              .values(status="pending"))
        await session.commit()
    (retry,) = await store.claim(1, "leader", limit=5, stale_after=timedelta(minutes=2), caps=CallCaps(per_day=1))
    assert retry.cap is not None and retry.cap.skip_reason is not None  # the appointment is in 2 hours


async def test_claims_in_one_batch_count_each_other(db: Database) -> None:
    phone = "+14155550143"
    ids = [await _seed_due(db, phone, starts_in=timedelta(days=2), due_in=timedelta(seconds=-3 + i))
           for i in range(3)]
    store = ReminderStore(db)
    await store.raise_fence(1, "leader")
    claims = await store.claim(1, "leader", limit=5, stale_after=timedelta(minutes=2), caps=CallCaps(per_day=2))
    assert [c.reminder_id for c in claims] == ids
    assert [c.cap is None for c in claims] == [True, True, False]
    # held only by calls being placed right now: it looks again shortly, not a day later
    held = claims[2].cap
    assert held is not None and held.wait_until is not None
    assert held.wait_until - claims[2].claimed_at <= timedelta(seconds=5)


async def test_an_orphan_without_a_call_is_held_by_a_cap_with_a_provider_without_idempotency(db: Database) -> None:
    """Found by the caps chaos run (harness/chaos_providers.py `caps`): a leader claimed a reminder
    and died before recording either its hold or an attempt; its successor re-claimed it as an
    orphan, which a cap never held, and called a number that had had its day's calls. An orphan of
    a provider without idempotency is held like any other (its own attempts, if any, are reconciled
    first: the hold is asked only before a new call); with the generic provider's key it is not."""
    phone = "+14155550144"
    earlier = await _seed_due(db, phone, due_in=timedelta(hours=1))
    await _attempt(db, earlier, state="created", call_status="completed", rang_at=datetime.now(UTC))
    orphan = await _seed_due(db, phone)
    store = ReminderStore(db)
    await store.raise_fence(1, "dead leader")
    (claimed,) = await store.claim(1, "dead leader", limit=5, stale_after=timedelta(minutes=2),
                                   caps=CallCaps(per_day=1))
    assert claimed.cap is not None  # the dead leader's hold, never recorded
    await store.raise_fence(2, "successor")
    (generic,) = await store.claim(2, "successor", limit=5, stale_after=timedelta(minutes=2), caps=CallCaps(per_day=1))
    assert generic.reminder_id == orphan and generic.orphaned and generic.cap is None
    await store.raise_fence(3, "successor")
    (stamped,) = await store.claim(3, "successor", limit=5, stale_after=timedelta(minutes=2), caps=CallCaps(per_day=1),
                                   hold_orphans=True)
    assert stamped.orphaned and stamped.cap is not None and stamped.cap.skip_reason is not None


def test_the_cap_rule() -> None:
    now = datetime(2030, 1, 7, 12, 0, tzinfo=UTC)
    window, utc = CallWindow.parse("08:00-21:00"), ZoneInfo("UTC")
    caps = CallCaps(per_day=1, per_week=3)
    far = now + timedelta(days=5)
    assert cap_hold(CallCaps(), calls=[now] * 9, in_flight=9, now=now, starts_at=far, zone=utc, window=window) is None
    assert cap_hold(caps, calls=[now - timedelta(days=1, seconds=1)], in_flight=0, now=now, starts_at=far, zone=utc,
                    window=window) is None
    day = cap_hold(caps, calls=[now - timedelta(hours=2)], in_flight=0, now=now, starts_at=far, zone=utc,
                   window=window)
    assert day is not None and (day.cap, day.wait_until) == ("day", now + timedelta(hours=22))
    # three this week: the week's oldest call leaving the span decides, fitted into the call window
    week_calls = [now - timedelta(days=6, hours=20), now - timedelta(days=3), now - timedelta(days=2)]
    week = cap_hold(caps, calls=week_calls, in_flight=0, now=now, starts_at=far, zone=utc, window=window)
    assert week is not None and (week.cap, week.wait_until) == ("week", datetime(2030, 1, 7, 16, 0, tzinfo=UTC))
    at_night = [now - timedelta(days=6, hours=12), *week_calls[1:]]  # leaves the week at midnight
    night = cap_hold(caps, calls=at_night, in_flight=0, now=now, starts_at=far, zone=utc, window=window)
    assert night is not None and night.wait_until == datetime(2030, 1, 8, 8, 0, tzinfo=UTC)  # the window opens
    late = cap_hold(caps, calls=[now - timedelta(hours=2)], in_flight=0, now=now, starts_at=now + timedelta(hours=5),
                    zone=utc, window=window)
    assert late is not None and late.wait_until is None and late.skip_reason.startswith("call cap: 1 call(s) per day")


# -- confirmed means done ---------------------------------------------------------------------------------


@pytest.mark.parametrize("call_after_confirmation", [False, True])
async def test_a_confirmed_appointments_later_reminders_are_skipped(
    db: Database, rig: Rig, call_after_confirmation: bool,
) -> None:
    phone = "+14155550144"
    rig.fake.callees[phone] = CalleeScript("answer", digits="1")
    rig.app.state.settings = Settings(call_after_confirmation=call_after_confirmation)
    appointment_id, (_, later) = await book(db, phone, later=True)
    await lead_until(Dispatcher(db, rig.provider, config()), FakeTerm(1), rig.phone_over(phone))
    assert (await appointment_row(db, appointment_id)).confirmation == "confirmed"
    row = await reminder_row(db, later)
    expected = ("pending", None) if call_after_confirmation else ("skipped", "confirmed")
    assert (row.status, row.skip_reason) == expected


async def test_a_confirmed_appointment_is_not_called_by_a_reminder_planned_after(db: Database, client,  # noqa: F811
                                                                                provider) -> None:  # noqa: F811
    reminder_id = await _seed_due(db, "+14155550145")
    async with db.session() as session:  # confirmed while this reminder was being planned
        appointment_id = (await session.execute(select(Reminder.appointment_id)
                                                .where(Reminder.id == reminder_id))).scalar_one()
        await session.execute(Appointment.__table__.update().where(Appointment.id == appointment_id)
                              .values(confirmation="confirmed"))
        await session.commit()
    await lead_until(Dispatcher(db, GenericProvider(client), config()), FakeTerm(1),
                     lambda: _status_is(db, reminder_id, "skipped"))
    assert (await provider_state(provider))[0] == []
    assert (await reminder_row(db, reminder_id)).skip_reason == "confirmed"


# -- spacing ---------------------------------------------------------------------------------------------


async def test_explicit_times_closer_than_the_spacing_are_refused(api) -> None:
    starts = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    one = starts - timedelta(hours=5)
    close = await api.post("/appointments", json=_body("+14155550146", starts_at=starts.isoformat(), remind_at=[
        one.isoformat(), (one + timedelta(hours=2)).isoformat(), (one + timedelta(hours=2, minutes=59)).isoformat()]))
    assert close.status_code == 422 and close.json()["detail"][0]["loc"] == ["body", "remind_at", 2]
    apart = await api.post("/appointments", json=_body("+14155550146", starts_at=starts.isoformat(), remind_at=[
        one.isoformat(), (one + timedelta(hours=1)).isoformat()]))  # exactly the spacing: fine
    assert apart.status_code == 201 and len(apart.json()["reminders"]) == 2
    created = apart.json()
    patch = await api.patch(f"/appointments/{created['id']}", json={"remind_at": [
        one.isoformat(), (one + timedelta(minutes=10)).isoformat()]})
    assert patch.status_code == 422 and patch.json()["detail"][0]["loc"] == ["body", "remind_at", 1]


def test_offsets_closer_than_the_spacing_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="closer than MIN_REMINDER_SPACING"):
        Settings(reminder_offsets="24h,23h30m")
    with pytest.raises(ValueError, match="closer than MIN_REMINDER_SPACING"):
        Settings(reminder_offsets="-1d@18:00,-1d@18:30")
    assert Settings(reminder_offsets="24h,23h30m", min_reminder_spacing="30m").min_reminder_spacing == timedelta(
        minutes=30)


def test_a_time_the_call_window_moves_too_close_is_unplanned() -> None:
    """09:00 appointment, window 08:00-20:00: 13 h before (20:00) stays, 12 h 30 min before (20:30)
    fits to 20:00 too — within the spacing of the first — and is unplanned with the reason."""
    starts = datetime(2030, 1, 8, 9, 0, tzinfo=UTC)
    plan = plan_reminders(starts_at=starts, zone=ZoneInfo("UTC"), window=CallWindow.parse("08:00-20:00"),
                          now=starts - timedelta(days=2), spacing=timedelta(hours=1),
                          offsets=[ReminderOffset.parse("13h"), ReminderOffset.parse("12h30m")])
    assert plan.due_times == [datetime(2030, 1, 7, 20, 0, tzinfo=UTC)]
    (unplanned,) = plan.unplanned
    assert "MIN_REMINDER_SPACING" in unplanned.reason
