"""Call outcomes and keypad confirmation in both real-provider modes (Twilio, Telnyx; machine
detection on), on SQLite and PostgreSQL: appointments booked through the service layer (wording
fixed at planning), called by the dispatcher, answered by the provider's fake as a scripted callee
per number says, webhooks through a prefix-stripping proxy (tests/support/providers.py). Twilio's
keypad webhooks driven one by one: tests/test_outcomes_twilio.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import pytest
from sqlalchemy import select

from reminders_fakes.controls import CalleeScript
from service.db import CallAttempt, Database
from service.dispatch.dispatcher import Dispatcher
from service.reminders import NoAnswerPolicy
from tests.support.outcomes import (
    PROMPT,
    RETRY_DELAY,
    TEMPLATES,
    appointment_row,
    book,
    metric,
    reminder_row,
    seeded_attempts,
)
from tests.support.providers import PROVIDERS, Rig, rig_on
from tests.support.waiting import eventually
from tests.test_dispatch import FakeTerm, config, lead_until

pytestmark = pytest.mark.anyio

CONFIRMED = "Thank you, your appointment is confirmed. Goodbye."
# each fake's own pace: Twilio's calls leave a queue at its rate, Telnyx takes time to speak
FAKE = {"twilio": {"calls_per_second": 20}, "telnyx": {"speak_ms": 20}}


@pytest.fixture(params=PROVIDERS)
async def rig(request: pytest.FixtureRequest, db: Database) -> AsyncIterator[Rig]:
    async with rig_on(db, request.param, ring_ms=20, machine_detection=True, templates=TEMPLATES,
                      no_answer=NoAnswerPolicy(retries=1, delay=RETRY_DELAY), **FAKE[request.param]) as rig:
        yield rig


async def run(db: Database, rig: Rig, done: Callable[[], Awaitable[bool]]) -> None:
    await lead_until(Dispatcher(db, rig.provider, config(reconcile_grace=timedelta(seconds=5))), FakeTerm(1), done)


async def test_press_1_confirms_the_appointment(db: Database, rig: Rig) -> None:
    phone = "+14155550101"
    rig.fake.callees[phone] = CalleeScript("answer", digits="1")
    appointment_id, (reminder_id,) = await book(db, phone)
    confirmed_before = metric("reminders_confirmations_total", answer="confirmed")
    answered_before = metric("reminders_call_outcomes_total", outcome="answered")
    await run(db, rig, rig.phone_over(phone))
    (call,) = rig.calls_to(phone)
    assert call.heard[0].startswith("Hello Ann Example, this is a reminder") and call.heard[0].endswith(PROMPT)
    assert call.heard[1:] == [CONFIRMED] and call.digits == ["1"]
    if rig.name == "telnyx":  # speech is commands: the message with the question, the last words, the hangup
        assert call.commands == ["gather_using_speak", "speak", "hangup"]
    assert (await appointment_row(db, appointment_id)).confirmation == "confirmed"
    reminder = await reminder_row(db, reminder_id)
    assert (reminder.status, reminder.outcome, reminder.bound_call_id) == ("sent", "answered", rig.call_id(call))
    assert metric("reminders_confirmations_total", answer="confirmed") == confirmed_before + 1
    assert metric("reminders_call_outcomes_total", outcome="answered") == answered_before + 1


async def test_press_2_declines_and_cancels_the_appointment_and_its_pending_reminders(db: Database, rig: Rig) -> None:
    phone = "+14155550102"
    rig.fake.callees[phone] = CalleeScript("answer", digits="2")
    appointment_id, (first, later) = await book(db, phone, later=True)
    await run(db, rig, rig.phone_over(phone))
    (call,) = rig.calls_to(phone)
    assert call.heard[1:] == ["Your appointment has been cancelled. Thank you, goodbye."]
    appointment = await appointment_row(db, appointment_id)
    assert (appointment.status, appointment.confirmation) == ("cancelled", "declined")
    assert (await reminder_row(db, first)).outcome == "answered"
    pending = await reminder_row(db, later)
    assert (pending.status, pending.skip_reason) == ("cancelled", "declined by customer")


async def test_another_key_or_none_repeats_the_question_once_then_goodbye(db: Database, rig: Rig) -> None:
    late, silent = "+14155550103", "+14155550104"
    rig.fake.callees[late] = CalleeScript("answer", digits=["5", "1"])  # a wrong key, then 1
    rig.fake.callees[silent] = CalleeScript("answer", digits=["7"])  # a wrong key, then nothing
    late_id, _ = await book(db, late)
    silent_id, _ = await book(db, silent)

    async def both() -> bool:
        return await rig.phone_over(late)() and await rig.phone_over(silent)()

    await run(db, rig, both)
    (late_call,), (silent_call,) = rig.calls_to(late), rig.calls_to(silent)
    assert late_call.heard[1:] == [PROMPT, CONFIRMED]
    assert silent_call.heard[1:] == [PROMPT, "Thank you. Goodbye."]  # the question, not the message, again
    assert (await appointment_row(db, late_id)).confirmation == "confirmed"
    assert (await appointment_row(db, silent_id)).confirmation is None


async def test_the_words_are_the_appointments_language(db: Database, rig: Rig) -> None:
    phone = "+14155550108"
    rig.fake.callees[phone] = CalleeScript("answer", digits=["5", "1"])  # the question again, in German too
    appointment_id, _ = await book(db, phone, language="de-DE")
    await run(db, rig, rig.phone_over(phone))
    (call,) = rig.calls_to(phone)
    assert call.heard[0].startswith("Hallo Ann Example, Termin am ") and "Drücken Sie 1" in call.heard[0]
    assert call.heard[1].startswith("Drücken Sie 1")
    assert call.heard[2].startswith("Vielen Dank, Ihr Termin ist bestätigt")
    assert rig.languages(call) == {"de-DE"}
    assert (await appointment_row(db, appointment_id)).confirmation == "confirmed"


async def test_a_machine_gets_the_voicemail_without_the_question_and_no_retry(db: Database, rig: Rig) -> None:
    phone = "+14155550105"
    rig.fake.callees[phone] = CalleeScript("machine", digits="1")  # a machine "pressing" nothing useful
    appointment_id, (reminder_id,) = await book(db, phone)

    async def voicemail() -> bool:
        return (await reminder_row(db, reminder_id)).outcome == "voicemail" and await rig.phone_over(phone)()

    await run(db, rig, voicemail)
    (call,) = rig.calls_to(phone)
    assert rig.machine_answered(call)
    assert len(call.heard) == 1 and call.heard[0].startswith("Hello Ann Example") and PROMPT not in call.heard[0]
    assert not rig.asked_for_digits(call) and call.digits == []
    reminder = await reminder_row(db, reminder_id)
    assert (reminder.status, reminder.outcome, reminder.no_answer_retries) == ("sent", "voicemail", 0)
    assert (await appointment_row(db, appointment_id)).confirmation is None
    assert len([r for r in rig.fake.requests if r.get("to") == phone]) == 1


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
    first, second = rig.calls_to(phone)
    assert first.status == second.status == "no-answer" and not first.heard and not second.heard
    assert rig.created_at(second) >= rig.retry_not_before(first) + RETRY_DELAY
    async with db.session() as session:
        attempts = list(await session.execute(select(CallAttempt.__table__)
                                              .where(CallAttempt.reminder_id == reminder_id)))
    assert sorted(a.provider_call_id for a in attempts) == sorted([rig.call_id(first), rig.call_id(second)])
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
        return (await reminder_row(db, reminder_id)).outcome == "answered" and await rig.phone_over(phone, 2)()

    dispatcher = Dispatcher(db, rig.provider, config(reconcile_grace=timedelta(seconds=5)))
    task = asyncio.create_task(dispatcher.lead(term))
    try:
        await eventually(retry_planned)
        rig.fake.callees[phone] = CalleeScript("answer", digits="1")  # picks up the second time
        await eventually(answered)
    finally:
        term.ended.set()
        await asyncio.wait_for(task, 10)
    first, second = rig.calls_to(phone)
    assert first.status == "busy" and not first.heard and second.heard
    assert (await reminder_row(db, reminder_id)).bound_call_id == rig.call_id(second)


async def test_duplicated_and_out_of_order_call_states_retry_once(rig: Rig) -> None:
    """Twilio orders a call's events by SequenceNumber, Telnyx by `occurred_at` (its events carry
    no sequence number): a state never goes back, and a repeated one changes nothing twice."""
    appointment_id, _ = await book(rig.db, "+14155550111")
    reminder_id, (attempt,) = await seeded_attempts(rig, appointment_id, 1)
    call_id = "CA" + "4" * 32
    events = [("no-answer", 3), ("initiated", 0), ("no-answer", 3), ("in-progress", 1), ("no-answer", 3)]
    async with rig.client() as client:
        stored = [await rig.post_state(client, reminder_id, attempt, call_id, status, order)
                  for status, order in events]
    reminder = await reminder_row(rig.db, reminder_id)
    assert (reminder.status, reminder.outcome, reminder.no_answer_retries) == ("pending", "no_answer", 1)
    assert reminder.bound_call_id is None  # a late answer of a call already over binds nothing
    async with rig.db.session() as session:
        (row,) = list(await session.execute(select(CallAttempt.__table__).where(CallAttempt.id == attempt)))
    assert (row.call_status, row.last_sequence) == ("no-answer", stored[0])
