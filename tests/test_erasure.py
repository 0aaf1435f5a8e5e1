"""Personal data that leaves (issue 24), on SQLite and PostgreSQL: `DELETE …?erase=true` erases an
appointment's name, number and notes from every table at once; PERSONAL_DATA_RETENTION has the
leader erase past appointments; API tokens carry names the change log records."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import MetaData, insert, select, update

from service.db import Appointment, CallAttempt, Database, Reminder
from service.db.models import new_id
from service.dispatch.dispatcher import Dispatcher
from service.ledger import consent
from service.reminders import idempotency_key
from tests.support.appclient import future, make_settings, running_app
from tests.support.outcomes import metric
from tests.test_dispatch import FakeTerm, client, config, lead_until, provider  # noqa: F401

pytestmark = pytest.mark.anyio

NAME, PHONE, NOTES = "Zoë Quixote-Erasable", "+14155552687", "allergic to penicillin, door code 4711"


async def _everything(db: Database) -> str:
    """Every row of every table, as text (JSON columns included)."""
    metadata = MetaData()
    async with db.engine.connect() as connection:
        await connection.run_sync(metadata.reflect)
        texts = []
        for table in metadata.sorted_tables:
            for row in (await connection.execute(select(table))).all():
                texts.append(repr(tuple(row)))
    return "\n".join(texts)


async def _leaves_no_trace(db: Database, appointment_id: str) -> None:
    everything = await _everything(db)
    phone_hash = (await consent.phone_hasher(db))(PHONE)
    for secret in (NAME, "Zoë", PHONE, PHONE[1:], "4155552687", NOTES, "penicillin", phone_hash):
        assert secret not in everything, secret
    assert appointment_id in everything  # the rows stay


@pytest.fixture
async def api(database_url: str, etcd_endpoint: str):
    async with running_app(make_settings(database_url, etcd_endpoint, api_token="booking:s3cret,plain-secret")) as c:
        c.headers["authorization"] = "Bearer s3cret"
        yield c


async def test_erase_on_request_leaves_no_personal_data_in_any_table(api, caplog) -> None:
    db: Database = api.app.state.db
    created = await api.post("/appointments", json={
        "customer_name": NAME, "phone": PHONE, "starts_at": future(days=3), "timezone": "Europe/Berlin",
        "notes": NOTES, "remind_at": [future(days=2), future(days=1)]})
    assert created.status_code == 201, created.text
    appointment = created.json()
    first = appointment["reminders"][0]["id"]
    async with db.session() as session:  # a call attempt whose provider error echoed the number
        await session.execute(update(Reminder).where(Reminder.id == first).values(
            last_error=f"HTTP 400 (21211): The 'To' number {PHONE} is not valid"))
        await session.execute(insert(CallAttempt).values(
            id=new_id(), reminder_id=first, fencing_token=1, state="not_created",
            error=f"The 'To' number {PHONE} is not valid"))
        await session.commit()
    assert NAME in await _everything(db)
    caplog.set_level(logging.INFO, logger="service.appointments")
    erased = await api.delete(f"/appointments/{appointment['id']}", params={"erase": "true"})
    assert erased.status_code == 200, erased.text
    view = erased.json()
    assert (view["customer_name"], view["phone"], view["notes"], view["status"]) == ("", "", None, "cancelled")
    assert view["erased_at"] is not None
    assert {r["status"] for r in view["reminders"]} == {"cancelled"}  # cancelled first
    await _leaves_no_trace(db, appointment["id"])
    assert any("cancelled and erased by booking" in r.getMessage() for r in caplog.records)
    # it stays readable, cannot be changed, and erasing again is harmless
    assert (await api.get(f"/appointments/{appointment['id']}")).json()["erased_at"] == view["erased_at"]
    assert (await api.patch(f"/appointments/{appointment['id']}", json={"notes": "x"})).status_code == 409
    assert (await api.delete(f"/appointments/{appointment['id']}", params={"erase": "true"})).status_code == 200


async def test_a_cancelled_appointment_can_be_erased_later(api) -> None:
    created = (await api.post("/appointments", json={
        "customer_name": NAME, "phone": PHONE, "starts_at": future(days=3), "notes": NOTES})).json()
    assert (await api.delete(f"/appointments/{created['id']}")).json()["customer_name"] == NAME
    assert (await api.delete(f"/appointments/{created['id']}?erase=true")).json()["customer_name"] == ""
    await _leaves_no_trace(api.app.state.db, created["id"])


async def test_every_change_is_logged_with_the_tokens_name(api, caplog) -> None:
    caplog.set_level(logging.INFO)
    created = (await api.post("/appointments", json={"customer_name": "Ann", "phone": PHONE,
                                                     "starts_at": future(days=3)})).json()
    await api.patch(f"/appointments/{created['id']}", json={"notes": "x"},
                    headers={"authorization": "Bearer plain-secret"})
    await api.put(f"/do-not-call/{PHONE}")
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"appointment {created['id']} created by booking" in m for m in messages)
    assert any(f"appointment {created['id']} changed by token-2" in m for m in messages)  # a bare secret
    assert any("do-not-call list by booking" in m for m in messages)
    assert (await api.get("/appointments", headers={"authorization": "Bearer booking"})).status_code == 401


async def _appointment(db: Database, *, starts_in: timedelta) -> str:
    now = datetime.now(UTC)
    appointment_id, reminder_id = new_id(), new_id()
    async with db.session() as session:
        await session.execute(insert(Appointment).values(
            id=appointment_id, customer_name=NAME, phone=PHONE, phone_hash=(await consent.phone_hasher(db))(PHONE),
            starts_at=now + starts_in, timezone="UTC", status="scheduled", notes=NOTES))
        await session.execute(insert(Reminder).values(
            id=reminder_id, appointment_id=appointment_id, due_at=now + starts_in - timedelta(hours=1),
            next_attempt_at=now + starts_in - timedelta(hours=1), status="sent", attempts=1,
            idempotency_key=idempotency_key(reminder_id), wording={"language": "en-US", "message": f"Hello {NAME}"}))
        await session.commit()
    return appointment_id


async def _row(db: Database, appointment_id: str) -> Any:
    async with db.session() as session:
        return (await session.execute(select(Appointment.__table__).where(Appointment.id == appointment_id))).one()


async def test_the_leader_erases_what_retention_no_longer_allows(db: Database, client) -> None:  # noqa: F811
    from service.providers.generic import GenericProvider

    past = await _appointment(db, starts_in=-timedelta(days=3))
    recent = await _appointment(db, starts_in=-timedelta(hours=12))
    before = metric("reminders_personal_data_erased_total", how="retention")

    async def erased() -> bool:
        return (await _row(db, past)).erased_at is not None

    dispatcher = Dispatcher(db, GenericProvider(client), config(retention=timedelta(days=1), retention_interval=0.05))
    await lead_until(dispatcher, FakeTerm(1), erased)
    row = await _row(db, past)
    assert (row.customer_name, row.phone, row.notes, row.phone_hash) == ("", "", None, None)
    assert (await _row(db, recent)).customer_name == NAME  # within the retention
    assert metric("reminders_personal_data_erased_total", how="retention") == before + 1
    async with db.session() as session:
        wording = (await session.execute(select(Reminder.wording, Reminder.status)
                                         .where(Reminder.appointment_id == past))).one()
    assert tuple(wording) == (None, "sent")  # the words gone, the outcome kept


def test_retention_keeps_what_the_caps_count() -> None:
    from service.config import Settings

    assert Settings(personal_data_retention="90d").personal_data_retention == timedelta(days=90)
    assert Settings(personal_data_retention="off").personal_data_retention is None
    with pytest.raises(ValueError, match="at least 1d"):
        Settings(personal_data_retention="12h")
    with pytest.raises(ValueError, match="at least 7d while MAX_CALLS_PER_NUMBER_PER_WEEK"):
        Settings(personal_data_retention="2d", max_calls_per_number_per_week=3)
