"""Customers who call back (issue 25, docs/decisions/0252): the fakes ring the service's number,
the call goes through the first-answer gate of the reminder the caller's number selects, and only
an attested caller (STIR/SHAKEN A) hears or answers anything. Both providers, in process with the
rigs; on SQLite and PostgreSQL (the gate lives in the database)."""

from __future__ import annotations

import re
from datetime import timedelta

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import insert, select

from reminders_fakes.controls import CalleeScript
from service.db import Appointment, CallAttempt, Database
from service.db.models import new_id
from service.ledger import calls
from service.providers.callers import NEUTRAL_MESSAGE
from service.reminders import MessageTemplates, NoAnswerPolicy
from service.telephony.provider import Stamp
from tests.support.providers import PHONE, PROVIDERS, make_rig
from tests.support.waiting import eventually
from tests.test_call_protocol import book, placed, row

pytestmark = pytest.mark.anyio

STRANGER = "+14155552672"


async def _appointment(db: Database, appointment_id: str):
    async with db.session() as session:
        return (await session.execute(select(Appointment.status, Appointment.confirmation)
                                      .where(Appointment.id == appointment_id))).one()


async def _status_is(db: Database, reminder_id: str, status: str) -> bool:
    return (await row(db, reminder_id)).status == status


def _incoming(provider: str, result: str) -> float:
    return REGISTRY.get_sample_value("reminders_incoming_calls_total", {"provider": provider, "result": result}) or 0.0


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_customer_who_missed_the_call_rings_back_hears_it_once_and_confirms(db: Database,
                                                                                     provider: str) -> None:
    # machine detection on (the Telnyx rig: off by default): a call the customer placed is greeted at once
    rig = make_rig(db, provider, no_answer=NoAnswerPolicy(retries=1, delay=timedelta(minutes=30)),
                   machine_detection=True)
    rig.fake.callees[PHONE] = CalleeScript("no-answer", ring_ms=10)
    try:
        appointment_id, reminder_id = await book(db)
        await placed(rig, reminder_id)
        await eventually(lambda: _status_is(db, reminder_id, "pending"))  # the no-answer retry, 30 min later
        before = _incoming(provider, "identified")
        call = rig.ring(PHONE, attestation="A", digits="1")
        await eventually(rig.over(rig.call_id(call)))
        heard = rig.heard(call)
        assert len(heard) == 2 and "Ann Example" in heard[0] and "Press 1" in heard[0], heard  # the message, once
        assert "confirmed" in heard[1].lower(), heard
        assert (await _appointment(db, appointment_id)).confirmation == "confirmed"
        reminder = await row(db, reminder_id)
        # the retry will never call: skipped, answered on the customer's own call
        assert (reminder.status, reminder.skip_reason, reminder.outcome) == ("skipped", "answered by call-back",
                                                                            "answered")
        assert reminder.bound_call_id == rig.call_id(call)
        assert len(rig.calls_to(PHONE)) == 1  # the missed call only
        assert _incoming(provider, "identified") == before + 1
    finally:
        await rig.aclose()


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_reminders_ringing_call_is_ended_and_one_answered_later_hangs_up_silently(db: Database,
                                                                                            provider: str) -> None:
    rig = make_rig(db, provider)
    rig.fake.callees[PHONE] = CalleeScript("answer", ring_ms=5_000)
    try:
        _, reminder_id = await book(db)
        _, ringing = await placed(rig, reminder_id)
        call = rig.ring(PHONE, attestation="A")  # presses nothing: the question twice, then goodbye
        await eventually(rig.over(rig.call_id(call), ringing))
        assert rig.hung_up_silently(rig.call(ringing))  # ended while it rang
        assert "Ann Example" in rig.heard(call)[0]
        # a call of the reminder that the ledger never learned of (a create in doubt), answered now
        rig.fake.callees[PHONE] = CalleeScript("answer", ring_ms=10)
        attempt_id = new_id()
        async with db.session() as session:
            await session.execute(insert(CallAttempt).values(id=attempt_id, reminder_id=reminder_id, fencing_token=1,
                                                             state="creating"))
            await session.commit()
        late = await rig.place(reminder_id, attempt_id, record=False)
        await eventually(rig.over(late))
        assert rig.hung_up_silently(rig.call(late))
        assert (await row(db, reminder_id)).bound_call_id == rig.call_id(call)
    finally:
        await rig.aclose()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("attestation", ["A", "B", "C", None])
async def test_only_an_attested_caller_hears_the_reminder_or_declines(db: Database, provider: str,
                                                                     attestation: str | None) -> None:
    rig = make_rig(db, provider)
    try:
        appointment_id, reminder_id = await book(db)
        before = _incoming(provider, "unattested")
        call = rig.ring(PHONE, attestation=attestation, digits="2")
        await eventually(rig.over(rig.call_id(call)))
        appointment, reminder = await _appointment(db, appointment_id), await row(db, reminder_id)
        if attestation == "A":
            assert "Ann Example" in rig.heard(call)[0]
            assert (appointment.status, appointment.confirmation) == ("cancelled", "declined")
            return
        assert rig.heard(call) == [NEUTRAL_MESSAGE]  # nothing of the appointment, no question
        assert (appointment.status, appointment.confirmation) == ("scheduled", None)
        assert (reminder.status, reminder.bound_call_id, reminder.outcome) == ("pending", None, None)
        assert _incoming(provider, "unattested") == before + 1
    finally:
        await rig.aclose()


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_stranger_or_a_withheld_number_hears_only_the_neutral_message(db: Database, provider: str) -> None:
    rig = make_rig(db, provider)
    try:
        appointment_id, reminder_id = await book(db)
        unknown, withheld = _incoming(provider, "unknown"), _incoming(provider, "withheld")
        calls = [rig.ring(STRANGER, attestation="A", digits="9"), rig.ring("anonymous", attestation=None, digits="2")]
        for call in calls:
            await eventually(rig.over(rig.call_id(call)))
            assert rig.heard(call) == [NEUTRAL_MESSAGE]
        assert (await _appointment(db, appointment_id)).status == "scheduled"
        assert (await row(db, reminder_id)).status == "pending"
        assert (_incoming(provider, "unknown"), _incoming(provider, "withheld")) == (unknown + 1, withheld + 1)
    finally:
        await rig.aclose()


async def test_a_repeated_voice_request_of_a_call_back_answers_the_same(db: Database) -> None:
    """Twilio asks the number's voice URL again (a retry): the call is bound once, and answered the
    same words with the same stamp."""
    rig = make_rig(db, "twilio")
    try:
        _, reminder_id = await book(db)
        form = {"CallSid": "CA" + "7" * 32, "From": PHONE, "To": "+15550000000", "Direction": "inbound",
                "StirVerstat": "TN-Validation-Passed-A", "CallStatus": "ringing"}
        path, form, headers = rig.signed_post("incoming", {}, form)
        async with rig.client() as client:
            first, again = [(await client.post(path, data=form, headers=headers)).text for _ in range(2)]
        assert first == again and "<Gather" in first and f"r={reminder_id}" in first
        async with db.session() as session:
            attempts = (await session.execute(select(CallAttempt.state).where(CallAttempt.reminder_id == reminder_id)
                                              )).scalars().all()
        assert attempts == ["incoming"]
        # its digits are the bound call's, told apart as the call-back's (the events' data.source)
        (attempt_id,) = re.findall(r"a=([0-9a-f-]{36})", first)[:1]
        pressed = await calls.keypad(db, Stamp(reminder_id, attempt_id), form["CallSid"], "1",
                                     fallback=lambda r: MessageTemplates.parse(None).render("en", r.customer_name,
                                                                                            r.starts_at, r.timezone))
        assert (pressed.bound, pressed.answer, pressed.source) == (True, "confirmed", "call-back")
        # unsigned: refused like every Twilio webhook
        async with rig.client() as client:
            assert (await client.post(path, data=form, headers={"X-Twilio-Signature": "bm8="})).status_code == 403
    finally:
        await rig.aclose()


async def test_a_reminder_being_dispatched_is_skipped_and_its_create_refused(db: Database) -> None:
    from service.ledger import AttemptStore, ReminderStore

    rig = make_rig(db, "twilio")
    try:
        _, reminder_id = await book(db)
        store = ReminderStore(db)
        await store.raise_fence(1, "leader")
        assert reminder_id in {c.reminder_id for c in await store.claim(1, "leader", limit=10,
                                                                        stale_after=timedelta(minutes=2))}
        call = rig.ring(PHONE, attestation="A", digits="1")
        await eventually(rig.over(rig.call_id(call)))
        reminder = await row(db, reminder_id)
        assert (reminder.status, reminder.skip_reason) == ("skipped", "answered by call-back")
        assert await AttemptStore(db).begin(1, reminder_id) is None  # the leader's create never goes out
        assert rig.calls_to(PHONE) == []
    finally:
        await rig.aclose()


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_fakes_ring_the_service_through_a_control_route(provider: str) -> None:
    from reminders_fakes.telnyx import FakeTelnyx
    from reminders_fakes.twilio import FakeTwilio

    fake = FakeTwilio() if provider == "twilio" else FakeTelnyx()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(fake.app), base_url="http://fake") as client:
            bad = await client.post("/_fake/incoming", json={"from": PHONE, "to": "nope", "url": "http://x/y"})
            assert bad.status_code == 422
            bad = await client.post("/_fake/incoming", json={"from": PHONE, "to": "+15550000000",
                                                             "url": "http://127.0.0.1:9/none", "attestation": "Z"})
            assert bad.status_code == 422
            good = await client.post("/_fake/incoming", json={"from": PHONE, "to": "+15550000000", "digits": "1",
                                                              "url": "http://127.0.0.1:9/none", "attestation": "B"})
            assert good.status_code == 201
    finally:
        await fake.aclose()
