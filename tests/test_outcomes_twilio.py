"""Call outcomes and keypad confirmation in Twilio mode, on SQLite and PostgreSQL: appointments
booked through the service layer (wording fixed at planning), called by the dispatcher, answered
by the Twilio-shaped fake's scripted callee per number, webhooks through a prefix-stripping proxy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from reminders_fakes.twilio import CalleeScript
from service import appointments
from service.db import Appointment, CallAttempt, Database, Reminder
from service.db.models import new_id
from service.dispatch.dispatcher import Dispatcher
from service.reminders import ALWAYS, MessageTemplates, NoAnswerPolicy, PlanningConfig
from tests.support.telnyx_rig import TelnyxRig
from tests.support.twilio_rig import Rig, make_rig
from tests.support.waiting import eventually
from tests.test_dispatch import FakeTerm, config, lead_until
from tests.test_twilio_webhooks import signed_post

pytestmark = pytest.mark.anyio

RETRY_DELAY = timedelta(seconds=1)
TEMPLATES = MessageTemplates.parse(json.dumps({"en-US": {}, "de-DE": "Hallo {name}, Termin am {date} um {time}."}))
PROMPT = "Press 1 to confirm, press 2 to cancel."



@pytest.fixture
async def rig(db: Database) -> AsyncIterator[Rig]:
    rig = make_rig(db, calls_per_second=20, ring_ms=20, no_answer=NoAnswerPolicy(retries=1, delay=RETRY_DELAY),
                   templates=TEMPLATES)
    yield rig
    await rig.aclose()


async def book(db: Database, phone: str, *, language: str = "en-US", later: bool = False) -> tuple[str, list[str]]:
    """An appointment in 2 hours with a reminder due now (and one due later, if asked)."""
    now = datetime.now(UTC)
    starts = now + timedelta(hours=2)
    remind_at = [now + timedelta(milliseconds=100)] + ([starts - timedelta(minutes=30)] if later else [])
    view = await appointments.create(
        db,
        appointments.NewAppointment(customer_name="Ann Example", phone=phone, starts_at=starts,
                                    timezone="Europe/Berlin", remind_at=remind_at, language=language),
        PlanningConfig(call_window=ALWAYS, offsets=(), templates=TEMPLATES),
    )
    return view["id"], [r["id"] for r in sorted(view["reminders"], key=lambda r: r["due_at"])]


async def appointment_row(db: Database, appointment_id: str):
    async with db.session() as session:
        return (await session.execute(select(Appointment.__table__).where(Appointment.id == appointment_id))).one()


async def reminder_row(db: Database, reminder_id: str):
    async with db.session() as session:
        return (await session.execute(select(Reminder.__table__).where(Reminder.id == reminder_id))).one()


def calls_to(rig: Rig, phone: str) -> list:
    return sorted((c for c in rig.fake.calls.values() if c.to == phone), key=lambda c: c.date_created)


def over(rig: Rig, phone: str, count: int = 1):
    async def check() -> bool:
        found = calls_to(rig, phone)
        return len(found) >= count and all(c.status in ("completed", "canceled", "busy", "no-answer") for c in found)

    return check


async def run(db: Database, rig: Rig, done) -> None:
    await lead_until(Dispatcher(db, rig.provider, config(reconcile_grace=timedelta(seconds=5))), FakeTerm(1), done)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_press_1_confirms_the_appointment(db: Database, rig: Rig) -> None:
    phone = "+14155550101"
    rig.fake.callees[phone] = CalleeScript("answer", digits="1")
    appointment_id, (reminder_id,) = await book(db, phone)
    confirmed_before = metric("reminders_confirmations_total", answer="confirmed")
    answered_before = metric("reminders_call_outcomes_total", outcome="answered")
    await run(db, rig, over(rig, phone))
    (call,) = calls_to(rig, phone)
    assert call.heard[0].startswith("Hello Ann Example, this is a reminder") and call.heard[0].endswith(PROMPT)
    assert call.heard[1:] == ["Thank you, your appointment is confirmed. Goodbye."] and call.digits == ["1"]
    assert (await appointment_row(db, appointment_id)).confirmation == "confirmed"
    reminder = await reminder_row(db, reminder_id)
    assert (reminder.status, reminder.outcome, reminder.bound_call_id) == ("sent", "answered", call.sid)
    assert metric("reminders_confirmations_total", answer="confirmed") == confirmed_before + 1
    assert metric("reminders_call_outcomes_total", outcome="answered") == answered_before + 1


async def test_press_2_declines_and_cancels_the_appointment_and_its_pending_reminders(db: Database, rig: Rig) -> None:
    phone = "+14155550102"
    rig.fake.callees[phone] = CalleeScript("answer", digits="2")
    appointment_id, (first, later) = await book(db, phone, later=True)
    await run(db, rig, over(rig, phone))
    (call,) = calls_to(rig, phone)
    assert call.heard[1:] == ["Your appointment has been cancelled. Thank you, goodbye."]
    appointment = await appointment_row(db, appointment_id)
    assert (appointment.status, appointment.confirmation) == ("cancelled", "declined")
    assert (await reminder_row(db, first)).outcome == "answered"
    pending = await reminder_row(db, later)
    assert (pending.status, pending.skip_reason) == ("cancelled", "declined by customer")


async def test_another_key_or_none_repeats_the_question_once_then_goodbye(db: Database, rig: Rig) -> None:
    late, silent = "+14155550103", "+14155550104"
    rig.fake.callees[late] = CalleeScript("answer", digits=["9", "1"])  # a wrong key, then 1
    rig.fake.callees[silent] = CalleeScript("answer", digits=["7"])  # a wrong key, then nothing
    late_id, _ = await book(db, late)
    silent_id, _ = await book(db, silent)

    async def both() -> bool:
        return await over(rig, late)() and await over(rig, silent)()

    await run(db, rig, both)
    (late_call,), (silent_call,) = calls_to(rig, late), calls_to(rig, silent)
    assert late_call.heard[1:] == [PROMPT, "Thank you, your appointment is confirmed. Goodbye."]
    assert silent_call.heard[1:] == [PROMPT, "Thank you. Goodbye."]  # the question, not the message, again
    assert (await appointment_row(db, late_id)).confirmation == "confirmed"
    assert (await appointment_row(db, silent_id)).confirmation is None


async def test_a_machine_gets_the_voicemail_without_the_question_and_no_retry(db: Database, rig: Rig) -> None:
    phone = "+14155550105"
    rig.fake.callees[phone] = CalleeScript("machine", digits="1")  # a machine "pressing" nothing useful
    appointment_id, (reminder_id,) = await book(db, phone)

    async def voicemail() -> bool:
        return (await reminder_row(db, reminder_id)).outcome == "voicemail" and await over(rig, phone)()

    await run(db, rig, voicemail)
    (call,) = calls_to(rig, phone)
    assert call.answered_by == "machine_start"
    assert len(call.heard) == 1 and call.heard[0].startswith("Hello Ann Example") and PROMPT not in call.heard[0]
    assert all("<Gather" not in twiml for twiml in call.twiml) and call.digits == []
    reminder = await reminder_row(db, reminder_id)
    assert (reminder.status, reminder.no_answer_retries) == ("sent", 0)
    assert (await appointment_row(db, appointment_id)).confirmation is None
    requests = [r for r in rig.fake.requests if r.get("to") == phone]
    assert len(requests) == 1


async def test_no_answer_calls_again_after_the_delay_then_records_no_answer(db: Database, rig: Rig) -> None:
    phone = "+14155550106"
    rig.fake.callees[phone] = CalleeScript("no-answer")
    _, (reminder_id,) = await book(db, phone)
    before = metric("reminders_call_outcomes_total", outcome="no_answer")

    async def given_up() -> bool:
        async with db.session() as session:
            ended = (await session.execute(select(CallAttempt.call_status).where(
                CallAttempt.reminder_id == reminder_id))).scalars().all()
        return ended == ["no-answer", "no-answer"]

    await run(db, rig, given_up)
    row = await reminder_row(db, reminder_id)
    assert (row.status, row.outcome, row.no_answer_retries) == ("sent", "no_answer", 1)
    first, second = calls_to(rig, phone)
    assert first.status == second.status == "no-answer" and not first.heard and not second.heard
    assert second.date_created >= first.end_time + RETRY_DELAY - timedelta(milliseconds=50)  # seconds-truncated clock
    async with db.session() as session:
        attempts = list(await session.execute(select(CallAttempt.__table__).where(CallAttempt.reminder_id == reminder_id)))
    assert sorted(a.provider_call_id for a in attempts) == sorted([first.sid, second.sid])
    assert metric("reminders_call_outcomes_total", outcome="no_answer") == before + 2  # one per call round


async def test_busy_then_answered_hears_the_message_once(db: Database, rig: Rig) -> None:
    phone = "+14155550107"
    rig.fake.callees[phone] = CalleeScript("busy")
    _, (reminder_id,) = await book(db, phone)
    term = FakeTerm(1)

    async def retry_planned() -> bool:
        row = await reminder_row(db, reminder_id)
        return row.status == "pending" and row.outcome == "busy"

    async def answered() -> bool:
        return (await reminder_row(db, reminder_id)).outcome == "answered" and await over(rig, phone, 2)()

    dispatcher = Dispatcher(db, rig.provider, config(reconcile_grace=timedelta(seconds=5)))
    task = asyncio.create_task(dispatcher.lead(term))
    try:
        await eventually(retry_planned)
        rig.fake.callees[phone] = CalleeScript("answer", digits="1")  # picks up the second time
        await eventually(answered)
    finally:
        term.ended.set()
        await asyncio.wait_for(task, 10)
    first, second = calls_to(rig, phone)
    assert first.status == "busy" and not first.heard and second.heard
    assert (await reminder_row(db, reminder_id)).bound_call_id == second.sid


async def test_the_words_are_the_appointments_language(db: Database, rig: Rig) -> None:
    phone = "+14155550108"
    rig.fake.callees[phone] = CalleeScript("answer", digits="1")
    await book(db, phone, language="de-DE")
    await run(db, rig, over(rig, phone))
    (call,) = calls_to(rig, phone)
    assert call.heard[0].startswith("Hallo Ann Example, Termin am ") and "Drücken Sie 1" in call.heard[0]
    assert call.heard[1].startswith("Vielen Dank, Ihr Termin ist bestätigt")
    assert '<Say language="de-DE">' in call.twiml[0]


# -- webhooks driven directly: digits from another call, duplicated and out-of-order events -------------


async def test_a_digit_from_a_call_that_is_not_the_bound_call_changes_nothing(rig: Rig) -> None:
    appointment_id, _ = await book(rig.db, "+14155550109")
    reminder_id, (bound_attempt, other_attempt) = await seeded_attempts(rig, appointment_id, 2)
    bound_sid, other_sid = "CA" + "1" * 32, "CA" + "2" * 32
    async with rig.client() as client:
        path, form, headers = signed_post(rig, "voice", {"r": reminder_id, "a": bound_attempt},
                                          {"CallSid": bound_sid, "CallStatus": "in-progress"})
        assert "<Gather" in (await client.post(path, data=form, headers=headers)).text
        for query, sid in (({"r": reminder_id, "a": other_attempt, "n": "1"}, other_sid),  # another call
                           ({"r": reminder_id, "a": other_attempt, "n": "1"}, bound_sid),  # the bound sid, wrong stamp
                           ({"r": reminder_id, "a": bound_attempt, "n": "1"}, other_sid)):  # the stamp, wrong sid
            path, form, headers = signed_post(rig, "gather", query, {"CallSid": sid, "Digits": "2"})
            response = await client.post(path, data=form, headers=headers)
            assert response.status_code == 200 and response.text.endswith("<Response><Hangup /></Response>")
    appointment = await appointment_row(rig.db, appointment_id)
    assert (appointment.status, appointment.confirmation) == ("scheduled", None)


async def test_a_repeated_keypad_request_is_recorded_once(rig: Rig) -> None:
    appointment_id, _ = await book(rig.db, "+14155550110")
    reminder_id, (attempt,) = await seeded_attempts(rig, appointment_id, 1)
    sid = "CA" + "3" * 32
    before = metric("reminders_confirmations_total", answer="confirmed")
    async with rig.client() as client:
        path, form, headers = signed_post(rig, "voice", {"r": reminder_id, "a": attempt},
                                          {"CallSid": sid, "CallStatus": "in-progress"})
        await client.post(path, data=form, headers=headers)
        answers = []
        for _ in range(2):
            path, form, headers = signed_post(rig, "gather", {"r": reminder_id, "a": attempt, "n": "1"},
                                              {"CallSid": sid, "Digits": "1"})
            answers.append((await client.post(path, data=form, headers=headers)).text)
    assert answers[0] == answers[1] and "your appointment is confirmed" in answers[0]
    assert metric("reminders_confirmations_total", answer="confirmed") == before + 1


async def test_duplicated_and_out_of_order_status_events_retry_once(rig: Rig) -> None:
    appointment_id, _ = await book(rig.db, "+14155550111")
    reminder_id, (attempt,) = await seeded_attempts(rig, appointment_id, 1)
    sid = "CA" + "4" * 32
    events = [("no-answer", "3"), ("initiated", "0"), ("no-answer", "3"), ("ringing", "1"), ("no-answer", "3")]
    async with rig.client() as client:
        for status, sequence in events:
            path, form, headers = signed_post(rig, "status", {"r": reminder_id, "a": attempt},
                                              {"CallSid": sid, "CallStatus": status, "SequenceNumber": sequence})
            assert (await client.post(path, data=form, headers=headers)).status_code == 204
    reminder = await reminder_row(rig.db, reminder_id)
    assert (reminder.status, reminder.outcome, reminder.no_answer_retries) == ("pending", "no_answer", 1)
    async with rig.db.session() as session:
        (row,) = list(await session.execute(select(CallAttempt.__table__).where(CallAttempt.id == attempt)))
    assert (row.call_status, row.last_sequence) == ("no-answer", 3)


async def test_no_retry_while_another_call_of_the_reminder_may_still_be_answered(rig: Rig) -> None:
    appointment_id, _ = await book(rig.db, "+14155550112")
    reminder_id, (first, second) = await seeded_attempts(rig, appointment_id, 2)
    async with rig.client() as client:
        for attempt, sid, status in ((second, "CA" + "6" * 32, "ringing"), (first, "CA" + "5" * 32, "busy")):
            path, form, headers = signed_post(rig, "status", {"r": reminder_id, "a": attempt},
                                              {"CallSid": sid, "CallStatus": status, "SequenceNumber": "2"})
            await client.post(path, data=form, headers=headers)
        row = await reminder_row(rig.db, reminder_id)
        assert (row.status, row.outcome, row.no_answer_retries) == ("sent", None, 0)
        path, form, headers = signed_post(rig, "status", {"r": reminder_id, "a": second},
                                          {"CallSid": "CA" + "6" * 32, "CallStatus": "no-answer", "SequenceNumber": "3"})
        await client.post(path, data=form, headers=headers)
    row = await reminder_row(rig.db, reminder_id)
    assert (row.status, row.outcome, row.no_answer_retries) == ("pending", "no_answer", 1)


async def seeded_attempts(rig: Rig | TelnyxRig, appointment_id: str, count: int) -> tuple[str, list[str]]:
    """The appointment's first reminder, made `sent` with `count` created attempts (as the dispatcher leaves it)."""
    attempt_ids = [new_id() for _ in range(count)]
    async with rig.db.session() as session:
        reminder_id = (await session.execute(
            select(Reminder.id).where(Reminder.appointment_id == appointment_id).order_by(Reminder.due_at))).scalar()
        await session.execute(update(Reminder).where(Reminder.id == reminder_id).values(status="sent", attempts=count))
        for attempt_id in attempt_ids:
            session.add(CallAttempt(id=attempt_id, reminder_id=reminder_id, fencing_token=1, state="created"))
        await session.commit()
    return reminder_id, attempt_ids
