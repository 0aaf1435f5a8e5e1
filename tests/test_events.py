"""Events for the booking system, written with the change they report (docs/decisions/0251): the
types and bodies each write emits, nothing left by a rollback, the feed's order and cursors (a
transaction that commits late is not skipped), the settings. Delivery: tests/test_events_delivery.py.
That every reminder the service finishes has its one `reminder.finished` is checked after every
test that takes `database_url` (tests/conftest.py, tests/support/events.py).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from service import appointments
from service.app import create_app
from service.components import check
from service.config import Settings
from service.db import Database, Event
from service.db.models import CallAttempt, Reminder, new_id
from service.errors import SettingError
from service.ledger import calls, cancellation, consent
from service.ledger.events import EventSource, EventType, emit
from service.ledger.fence import raise_fence
from service.ledger.outbox import OutboxStore
from service.reminders import ALWAYS, PlanningConfig, ReminderOffset
from service.telephony.provider import Stamp
from tests.support.appclient import PHONE, make_settings
from tests.support.outcomes import TEMPLATES

pytestmark = pytest.mark.anyio

TOKEN = 7
OTHER_PHONE = "+4930901820"
PLANNING = PlanningConfig(call_window=ALWAYS, offsets=(ReminderOffset(before=timedelta(hours=1)),),
                          templates=TEMPLATES)


async def events(db: Database) -> list[dict[str, Any]]:
    """Every event's body, in the order they were inserted."""
    rows = await db.read(lambda c: c.execute(select(Event.body).order_by(Event.seq)).scalars().all())
    return [json.loads(body) for body in rows]


def of_type(bodies: list[dict[str, Any]], type_: EventType) -> list[dict[str, Any]]:
    return [body for body in bodies if body["type"] == type_.value]


async def book(db: Database, phone: str = PHONE, *, hours: float = 3) -> tuple[str, list[str]]:
    """An appointment `hours` ahead with one pending reminder an hour before it."""
    view = await appointments.create(db, appointments.NewAppointment(
        customer_name="Ann Example", phone=phone, starts_at=datetime.now(UTC) + timedelta(hours=hours)), PLANNING)
    return view["id"], [r["id"] for r in view["reminders"]]


def assert_shape(body: dict[str, Any], type_: EventType, appointment_id: str | None, source: EventSource) -> None:
    assert set(body) == {"id", "type", "timestamp", "data"}
    assert body["type"] == type_.value and body["timestamp"].endswith("Z")
    assert body["data"]["appointment_id"] == appointment_id and body["data"]["source"] == source.value


# -- what each write emits -----------------------------------------------------------------------------


async def test_cancel_emits_its_events_once(db: Database) -> None:
    appointment_id, (reminder_id,) = await book(db)
    await appointments.cancel(db, appointment_id)
    await appointments.cancel(db, appointment_id)  # harmless twice: no second event
    bodies = await events(db)
    assert [b["type"] for b in bodies] == [EventType.APPOINTMENT_CANCELLED, EventType.REMINDER_FINISHED]
    cancelled, finished = bodies
    assert_shape(cancelled, EventType.APPOINTMENT_CANCELLED, appointment_id, EventSource.API)
    assert cancelled["data"]["status"] == "cancelled"
    assert_shape(finished, EventType.REMINDER_FINISHED, appointment_id, EventSource.API)
    assert finished["data"] | {"source": None} == {
        "appointment_id": appointment_id, "source": None, "reminder_id": reminder_id, "status": "cancelled",
        "outcome": None, "reason": cancellation.CANCELLED_BY_API}
    assert len({b["id"] for b in bodies}) == 2


async def test_an_event_rolls_back_with_its_change(db: Database) -> None:
    appointment_id, _ = await book(db)

    def cancel_then_fail(connection: Any) -> None:
        cancellation.cancel_appointment(connection, appointment_id, cancellation.CANCELLED_BY_API,
                                        datetime.now(UTC), source=EventSource.API)
        assert connection.execute(select(Event.type)).scalars().all()  # written, in this transaction
        raise RuntimeError("the transaction fails after its writes")

    with pytest.raises(RuntimeError):
        await db.write(cancel_then_fail)
    assert await events(db) == []
    assert (await appointments.read(db, appointment_id))["status"] == "scheduled"


async def test_opt_out_events_one_per_appointment_ahead_or_one_without(db: Database) -> None:
    ahead, (reminder_id,) = await book(db)
    cancelled, _ = await book(db)
    await appointments.cancel(db, cancelled)
    before = len(await events(db))
    listing = await consent.add(db, PHONE)
    await consent.add(db, PHONE)  # listed before: nothing new
    await consent.add(db, OTHER_PHONE)  # no appointment at all
    bodies = (await events(db))[before:]
    opted = of_type(bodies, EventType.PHONE_OPTED_OUT)
    assert [b["data"]["appointment_id"] for b in opted] == [ahead, None]
    assert_shape(opted[0], EventType.PHONE_OPTED_OUT, ahead, EventSource.API)
    assert opted[0]["data"]["phone"] == "+1415*****71"
    (finished,) = of_type(bodies, EventType.REMINDER_FINISHED)
    assert listing.skipped == {reminder_id}
    assert (finished["data"]["reminder_id"], finished["data"]["status"], finished["data"]["reason"]) == (
        reminder_id, "skipped", cancellation.OPTED_OUT)
    raw = json.dumps(await events(db))
    assert PHONE not in raw and OTHER_PHONE not in raw and PHONE[1:] not in raw


async def test_a_replan_prunes_silently_and_finishes_what_a_leader_touched(db: Database) -> None:
    appointment_id, (untouched,) = await book(db)
    moved = {"starts_at": datetime.now(UTC) + timedelta(hours=4)}
    view = await appointments.change(db, appointment_id, moved, PLANNING)
    assert untouched not in {r["id"] for r in view["reminders"]}  # pruned: never claimed
    assert await events(db) == []
    (claimed,) = [r["id"] for r in view["reminders"]]
    async with db.session() as session:  # a leader's claim of it (fence token, claimed_at)
        await session.execute(update(Reminder).where(Reminder.id == claimed).values(
            status="dispatching", fence_token=TOKEN, claimed_at=datetime.now(UTC)))
        await session.commit()
    await appointments.change(db, appointment_id, {"starts_at": datetime.now(UTC) + timedelta(hours=5)}, PLANNING)
    (finished,) = await events(db)
    assert (finished["data"]["reminder_id"], finished["data"]["status"], finished["data"]["reason"]) == (
        claimed, "cancelled", cancellation.REPLANNED)


async def _bound_call(db: Database, phone: str = PHONE) -> tuple[str, Stamp]:
    """A booked appointment whose reminder is `sent` with a created attempt, its call answered."""
    appointment_id, (reminder_id,) = await book(db, phone)
    attempt_id = new_id()
    async with db.session() as session:
        await session.execute(update(Reminder).where(Reminder.id == reminder_id).values(status="sent", attempts=1))
        session.add(CallAttempt(id=attempt_id, reminder_id=reminder_id, fencing_token=1, state="created"))
        await session.commit()
    stamp = Stamp(reminder_id, attempt_id)
    answered = await calls.answer(db, stamp, "CA-1", fallback=lambda row: None)  # type: ignore[arg-type,return-value]
    assert answered.speak
    return appointment_id, stamp


@pytest.mark.parametrize(("digits", "expected"), [
    ("1", EventType.APPOINTMENT_CONFIRMED), ("2", EventType.APPOINTMENT_DECLINED), ("9", EventType.PHONE_OPTED_OUT)])
async def test_keypad_answers_emit_their_event(db: Database, digits: str, expected: EventType) -> None:
    appointment_id, stamp = await _bound_call(db)
    other, (later,) = await book(db, hours=5)  # another appointment of the number, still pending
    (answered,) = await events(db)  # the bound call's answer finished its reminder
    assert (answered["data"]["reminder_id"], answered["data"]["status"], answered["data"]["outcome"]) == (
        stamp.reminder_id, "sent", "answered")
    assert answered["data"]["source"] == EventSource.SYSTEM
    for _ in range(2):  # the round repeated (a replay): nothing more
        await calls.keypad(db, stamp, "CA-1", digits, fallback=lambda row: None)  # type: ignore[arg-type,return-value]
    bodies = (await events(db))[1:]
    event = of_type(bodies, expected)[0]
    assert_shape(event, expected, appointment_id, EventSource.KEYPAD)
    if expected is EventType.APPOINTMENT_DECLINED:
        assert event["data"]["status"] == "cancelled" and event["data"]["confirmation"] == "declined"
        assert not of_type(bodies, EventType.APPOINTMENT_CANCELLED)  # the decline says it: no second event
    if expected is EventType.PHONE_OPTED_OUT:  # one per appointment ahead; the other's reminder skipped
        assert [b["data"]["appointment_id"] for b in of_type(bodies, expected)] == [appointment_id, other]
        (skipped,) = of_type(bodies, EventType.REMINDER_FINISHED)
        assert (skipped["data"]["reminder_id"], skipped["data"]["status"]) == (later, "skipped")
    else:
        assert len(of_type(bodies, expected)) == 1 and not of_type(bodies, EventType.REMINDER_FINISHED)


# -- the feed ---------------------------------------------------------------------------------------------


async def _emit(db: Database, appointment_id: str | None = None) -> str:
    """One event, committed; its id."""

    def write(connection: Any) -> str:
        emit(connection, EventType.APPOINTMENT_CANCELLED, EventSource.API, appointment_id, datetime.now(UTC),
             status="cancelled")
        return connection.execute(select(Event.id).order_by(Event.seq.desc()).limit(1)).scalar_one()

    return await db.write(write)


def _api(db: Database, **settings: object) -> httpx.AsyncClient:
    """The app's routes on `db`, without its lifespan (no election, no dispatcher)."""
    app = create_app(make_settings(db.url, "127.0.0.1:2379", **settings))
    app.state.db = db
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def _page(client: httpx.AsyncClient, **params: object) -> tuple[list[str], str]:
    response = await client.get("/events", params=params)
    assert response.status_code == 200, response.text
    page = response.json()
    return [event["id"] for event in page["events"]], page["next_cursor"]


async def test_the_feed_pages_through_numbered_events_in_order(db: Database) -> None:
    await raise_fence(db, TOKEN, "test")
    store = OutboxStore(db)
    ids = [await _emit(db, f"appointment-{i % 3}") for i in range(7)]
    async with _api(db) as client:
        assert await _page(client) == ([], base64.urlsafe_b64encode(b"p0").decode().rstrip("="))  # unnumbered
        assert await store.number(TOKEN) == 7
        first, cursor = await _page(client, limit=3)
        second, cursor = await _page(client, after=cursor, limit=3)
        third, cursor = await _page(client, after=cursor, limit=3)
        assert first + second + third == ids and len(third) == 1
        late = await _emit(db)
        assert await _page(client, after=cursor) == ([], cursor)  # not numbered yet: not shown
        await store.number(TOKEN)
        assert (await _page(client, after=cursor))[0] == [late]
        bodies = (await client.get("/events", params={"limit": 500})).json()["events"]
        assert [b["id"] for b in bodies] == [*ids, late] and bodies[0]["data"]["source"] == "api"


async def test_feed_cursor_errors(db: Database) -> None:
    await raise_fence(db, TOKEN, "test")
    store = OutboxStore(db)
    for _ in range(3):
        await _emit(db)
    await store.number(TOKEN)
    async with _api(db) as client:
        for params, field in [({"after": "not!base64"}, "after"), ({"after": "cA"}, "after"),
                              ({"after": base64.urlsafe_b64encode(b"x9").decode()}, "after"),
                              ({"after": base64.urlsafe_b64encode(b"p99").decode()}, "after"),  # never given
                              ({"limit": 0}, "limit"), ({"limit": 501}, "limit")]:
            response = await client.get("/events", params=params)
            assert response.status_code == 422, (params, response.text)
            assert response.json()["detail"][0]["loc"] == ["query", field], response.text
        _, cursor = await _page(client, limit=1)
        # the first two are older than the retention: deleted, and a cursor before them is too old
        async with db.session() as session:
            await session.execute(update(Event).where(Event.position <= 2).values(
                created_at=datetime.now(UTC) - timedelta(days=8)))
            await session.commit()
        assert await store.prune(TOKEN, timedelta(days=7)) == 2
        gone = await client.get("/events", params={"after": cursor})
        assert gone.status_code == 410 and "EVENTS_RETENTION" in gone.json()["detail"]
        remaining, _ = await _page(client)
        assert len(remaining) == 1
    async with _api(db, api_token="booking:secret") as client:
        assert (await client.get("/events")).status_code == 401
        assert (await client.get("/events", headers={"Authorization": "Bearer secret"})).status_code == 200


async def test_a_transaction_that_commits_late_is_not_skipped(postgres_url: str) -> None:
    """PostgreSQL: an event inserted by a transaction still open while later ones commit and are
    numbered gets a position after theirs, so a reader past them still gets it."""
    db = Database(postgres_url)
    await db.upgrade()
    try:
        await raise_fence(db, TOKEN, "test")
        store = OutboxStore(db)
        async with db.engine.connect() as late:  # statement_timeout: the engine's
            await late.begin()
            await late.run_sync(lambda c: emit(c, EventType.APPOINTMENT_CANCELLED, EventSource.API, "a-late",
                                               datetime.now(UTC)))
            early = await _emit(db, "a-early")
            await store.number(TOKEN)
            async with _api(db) as client:
                seen, cursor = await _page(client)
                assert seen == [early]
                await late.commit()
                assert await _page(client, after=cursor) == ([], cursor)
                await store.number(TOKEN)
                (after,), _ = await _page(client, after=cursor)
        assert after != early
        assert (await events(db))[0]["data"]["appointment_id"] == "a-late"  # inserted first, shown second
    finally:
        await db.dispose()


# -- settings --------------------------------------------------------------------------------------------


SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


@pytest.mark.parametrize(("values", "variable"), [
    ({"events_url": "https://booking.example.com/hooks"}, "EVENTS_SECRET"),
    ({"events_url": "http://booking.example.com/hooks", "events_secret": SECRET}, "EVENTS_URL"),
])
def test_events_settings_that_do_not_go_together(values: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingError) as error:
        check(Settings(**values))
    assert error.value.variable == variable
    check(Settings(**{**values, "events_url": "http://127.0.0.1:8099/hooks", "events_secret": SECRET}))
    check(Settings(**{**values, "events_url": "http://booking.example.com/hooks", "events_secret": SECRET,
                      "allow_insecure_transport": True}))


@pytest.mark.parametrize(("variable", "value"), [
    ("EVENTS_SECRET", "s3cret"), ("EVENTS_SECRET", "whsec_c2hvcnQ="), ("EVENTS_URL", "booking.example.com"),
    ("EVENTS_MAX_AGE", "0"), ("EVENTS_RETENTION", "1h"), ("EVENTS_TIMEOUT", "0"),
])
def test_bad_events_settings_name_their_variable(variable: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.config import setting_error_line

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as error:
        Settings()
    line = setting_error_line(error.value)
    assert variable in line and "\n" not in line, line


async def test_settings_reach_the_relay() -> None:
    from service.components import dispatch_config

    config = dispatch_config(Settings(events_url="https://booking.example.com/hooks", events_secret=SECRET,
                                      events_max_age="2h", events_retention="3d", events_timeout=4))
    assert (config.events.url, config.events.max_age, config.events.retention, config.events.timeout) == (
        "https://booking.example.com/hooks", timedelta(hours=2), timedelta(days=3), 4)
    assert dispatch_config(Settings()).events.url is None

