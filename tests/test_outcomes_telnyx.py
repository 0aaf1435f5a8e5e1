"""Call outcomes and keypad confirmation in Telnyx mode, on SQLite and PostgreSQL: appointments
booked through the service layer, called by the dispatcher through the Telnyx-shaped fake (machine
detection on, a scripted callee per number), events through a prefix-stripping proxy."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from reminders_fakes.telnyx import TEST_SIGNING_SEED, CalleeScript, sign
from service.db import CallAttempt, Database
from service.dispatch.dispatcher import Dispatcher
from service.reminders import NoAnswerPolicy
from service.telephony.provider import Stamp
from tests.support.telnyx_rig import TelnyxRig, make_telnyx_rig
from tests.test_dispatch import FakeTerm, config, lead_until
from tests.test_outcomes_twilio import (
    PROMPT,
    RETRY_DELAY,
    TEMPLATES,
    appointment_row,
    book,
    reminder_row,
    seeded_attempts,
)

pytestmark = pytest.mark.anyio



@pytest.fixture
async def rig(db: Database) -> AsyncIterator[TelnyxRig]:
    rig = make_telnyx_rig(db, ring_ms=20, speak_ms=20, machine_detection=True,
                          no_answer=NoAnswerPolicy(retries=1, delay=RETRY_DELAY), templates=TEMPLATES)
    yield rig
    await rig.aclose()


def calls_to(rig: TelnyxRig, phone: str) -> list:
    return sorted((c for c in rig.fake.calls.values() if c.to == phone), key=lambda c: c.created)


def over(rig: TelnyxRig, phone: str, count: int = 1):
    async def check() -> bool:
        found = calls_to(rig, phone)
        return len(found) >= count and all(not c.alive for c in found)

    return check


async def run(db: Database, rig: TelnyxRig, done) -> None:
    await lead_until(Dispatcher(db, rig.provider, config(reconcile_grace=timedelta(seconds=5))), FakeTerm(1), done)


async def test_press_1_confirms_the_appointment(db: Database, rig: TelnyxRig) -> None:
    phone = "+14155550201"
    rig.fake.callees[phone] = CalleeScript("answer", digits="1")
    appointment_id, (reminder_id,) = await book(db, phone)
    await run(db, rig, over(rig, phone))
    (call,) = calls_to(rig, phone)
    assert call.heard[0].startswith("Hello Ann Example, this is a reminder") and call.heard[0].endswith(PROMPT)
    assert call.heard[1:] == ["Thank you, your appointment is confirmed. Goodbye."] and call.digits == ["1"]
    assert call.commands == ["gather_using_speak", "speak", "hangup"]
    assert (await appointment_row(db, appointment_id)).confirmation == "confirmed"
    reminder = await reminder_row(db, reminder_id)
    assert (reminder.status, reminder.outcome, reminder.bound_call_id) == ("sent", "answered", call.call_id)


async def test_press_2_declines_and_cancels_the_appointment(db: Database, rig: TelnyxRig) -> None:
    phone = "+14155550202"
    rig.fake.callees[phone] = CalleeScript("answer", digits="2")
    appointment_id, (_, later) = await book(db, phone, later=True)
    await run(db, rig, over(rig, phone))
    (call,) = calls_to(rig, phone)
    assert call.heard[1:] == ["Your appointment has been cancelled. Thank you, goodbye."]
    appointment = await appointment_row(db, appointment_id)
    assert (appointment.status, appointment.confirmation) == ("cancelled", "declined")
    pending = await reminder_row(db, later)
    assert (pending.status, pending.skip_reason) == ("cancelled", "declined by customer")


async def test_another_key_repeats_the_question_once_in_the_appointments_language(db: Database, rig: TelnyxRig) -> None:
    phone = "+14155550203"
    rig.fake.callees[phone] = CalleeScript("answer", digits=["9", "1"])
    appointment_id, _ = await book(db, phone, language="de-DE")
    await run(db, rig, over(rig, phone))
    (call,) = calls_to(rig, phone)
    assert call.heard[0].startswith("Hallo Ann Example, Termin am ") and "Drücken Sie 1" in call.heard[0]
    assert call.heard[1].startswith("Drücken Sie 1") and call.heard[2].startswith("Vielen Dank, Ihr Termin")
    assert set(call.languages) == {"de-DE"}
    assert (await appointment_row(db, appointment_id)).confirmation == "confirmed"


async def test_a_machine_gets_the_voicemail_without_the_question_and_no_retry(db: Database, rig: TelnyxRig) -> None:
    phone = "+14155550204"
    rig.fake.callees[phone] = CalleeScript("machine", digits="1")
    appointment_id, (reminder_id,) = await book(db, phone)

    async def voicemail() -> bool:
        return (await reminder_row(db, reminder_id)).outcome == "voicemail" and await over(rig, phone)()

    await run(db, rig, voicemail)
    (call,) = calls_to(rig, phone)
    assert "call.machine.detection.ended" in call.events
    assert len(call.heard) == 1 and call.heard[0].startswith("Hello Ann Example") and PROMPT not in call.heard[0]
    assert "gather_using_speak" not in call.commands and call.digits == []
    reminder = await reminder_row(db, reminder_id)
    assert (reminder.status, reminder.outcome, reminder.no_answer_retries) == ("sent", "voicemail", 0)
    assert (await appointment_row(db, appointment_id)).confirmation is None
    assert len([r for r in rig.fake.requests if r.get("to") == phone]) == 1


async def test_no_answer_calls_again_after_the_delay_then_records_no_answer(db: Database, rig: TelnyxRig) -> None:
    phone = "+14155550205"
    rig.fake.callees[phone] = CalleeScript("no-answer")
    _, (reminder_id,) = await book(db, phone)

    async def given_up() -> bool:
        async with db.session() as session:
            ended = (await session.execute(select(CallAttempt.call_status).where(
                CallAttempt.reminder_id == reminder_id))).scalars().all()
        return ended == ["no-answer", "no-answer"]

    await run(db, rig, given_up)
    row = await reminder_row(db, reminder_id)
    assert (row.status, row.outcome, row.no_answer_retries) == ("sent", "no_answer", 1)
    first, second = calls_to(rig, phone)
    assert not first.heard and not second.heard
    assert second.created >= first.created + RETRY_DELAY


async def test_duplicated_and_out_of_order_events_change_nothing_twice(db: Database, rig: TelnyxRig) -> None:
    """Telnyx events have no sequence number: applied by state, then `occurred_at`."""
    phone = "+14155550206"
    appointment_id, (reminder_id,) = await book(db, phone)
    reminder_id, (attempt,) = await seeded_attempts(rig, appointment_id, 1)
    state = Stamp(reminder_id, attempt).encode()
    start = datetime.now(UTC)

    def event(kind: str, seconds: float, **payload: object) -> dict:
        return {"data": {"record_type": "event", "event_type": kind, "id": f"{kind}-{seconds}",
                         "occurred_at": (start + timedelta(seconds=seconds)).isoformat(),
                         "payload": {"call_control_id": "v3:call", "client_state": state, **payload}}}

    hangup = event("call.hangup", 30, hangup_cause="timeout")
    events = [hangup, event("call.initiated", 0), hangup, event("call.answered", 10), hangup]
    async with rig.client() as client:
        for item in events:
            body = json.dumps(item).encode()
            now = str(int(datetime.now(UTC).timestamp()))
            headers = {"telnyx-timestamp": now, "telnyx-signature-ed25519": sign(TEST_SIGNING_SEED, now, body)}
            assert (await client.post("/telephony/telnyx/events", content=body, headers=headers)).status_code == 200
    reminder = await reminder_row(db, reminder_id)
    assert (reminder.status, reminder.outcome, reminder.no_answer_retries) == ("pending", "no_answer", 1)
    assert reminder.bound_call_id is None  # a late answer of a call already over binds nothing
    async with db.session() as session:
        (row,) = list(await session.execute(select(CallAttempt.__table__).where(CallAttempt.id == attempt)))
    assert row.call_status == "no-answer"
