"""Twilio's keypad and status webhooks driven one by one, on SQLite and PostgreSQL: digits only
from the bound call, a repeated keypad request, no retry while another call may still ring. What
both real providers do (outcomes, keypad, machines, retries): tests/test_outcomes_providers.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.db import Database
from service.reminders import NoAnswerPolicy
from tests.support.outcomes import (
    RETRY_DELAY,
    TEMPLATES,
    appointment_row,
    book,
    metric,
    reminder_row,
    seeded_attempts,
)
from tests.support.providers import TwilioRig, rig_on

pytestmark = pytest.mark.anyio


@pytest.fixture
async def rig(db: Database) -> AsyncIterator[TwilioRig]:
    async with rig_on(db, "twilio", calls_per_second=20, ring_ms=20, templates=TEMPLATES,
                      no_answer=NoAnswerPolicy(retries=1, delay=RETRY_DELAY)) as rig:
        yield rig


async def test_a_digit_from_a_call_that_is_not_the_bound_call_changes_nothing(rig: TwilioRig) -> None:
    appointment_id, _ = await book(rig.db, "+14155550109")
    reminder_id, (bound_attempt, other_attempt) = await seeded_attempts(rig, appointment_id, 2)
    bound_sid, other_sid = "CA" + "1" * 32, "CA" + "2" * 32
    async with rig.client() as client:
        path, form, headers = rig.signed_post("voice", {"r": reminder_id, "a": bound_attempt},
                                              {"CallSid": bound_sid, "CallStatus": "in-progress"})
        assert "<Gather" in (await client.post(path, data=form, headers=headers)).text
        for query, sid in (({"r": reminder_id, "a": other_attempt, "n": "1"}, other_sid),  # another call
                           ({"r": reminder_id, "a": other_attempt, "n": "1"}, bound_sid),  # the bound sid, wrong stamp
                           ({"r": reminder_id, "a": bound_attempt, "n": "1"}, other_sid)):  # the stamp, wrong sid
            path, form, headers = rig.signed_post("gather", query, {"CallSid": sid, "Digits": "2"})
            response = await client.post(path, data=form, headers=headers)
            assert response.status_code == 200 and response.text.endswith("<Response><Hangup /></Response>")
    appointment = await appointment_row(rig.db, appointment_id)
    assert (appointment.status, appointment.confirmation) == ("scheduled", None)


async def test_a_repeated_keypad_request_is_recorded_once(rig: TwilioRig) -> None:
    appointment_id, _ = await book(rig.db, "+14155550110")
    reminder_id, (attempt,) = await seeded_attempts(rig, appointment_id, 1)
    sid = "CA" + "3" * 32
    before = metric("reminders_confirmations_total", answer="confirmed")
    async with rig.client() as client:
        path, form, headers = rig.signed_post("voice", {"r": reminder_id, "a": attempt},
                                              {"CallSid": sid, "CallStatus": "in-progress"})
        await client.post(path, data=form, headers=headers)
        answers = []
        for _ in range(2):
            path, form, headers = rig.signed_post("gather", {"r": reminder_id, "a": attempt, "n": "1"},
                                                  {"CallSid": sid, "Digits": "1"})
            answers.append((await client.post(path, data=form, headers=headers)).text)
    assert answers[0] == answers[1] and "your appointment is confirmed" in answers[0]
    assert metric("reminders_confirmations_total", answer="confirmed") == before + 1


async def test_no_retry_while_another_call_of_the_reminder_may_still_be_answered(rig: TwilioRig) -> None:
    appointment_id, _ = await book(rig.db, "+14155550112")
    reminder_id, (first, second) = await seeded_attempts(rig, appointment_id, 2)
    async with rig.client() as client:
        for attempt, sid, status in ((second, "CA" + "6" * 32, "ringing"), (first, "CA" + "5" * 32, "busy")):
            path, form, headers = rig.signed_post("status", {"r": reminder_id, "a": attempt},
                                                  {"CallSid": sid, "CallStatus": status, "SequenceNumber": "2"})
            await client.post(path, data=form, headers=headers)
        row = await reminder_row(rig.db, reminder_id)
        assert (row.status, row.outcome, row.no_answer_retries) == ("sent", None, 0)
        ended = {"CallSid": "CA" + "6" * 32, "CallStatus": "no-answer", "SequenceNumber": "3"}
        path, form, headers = rig.signed_post("status", {"r": reminder_id, "a": second}, ended)
        await client.post(path, data=form, headers=headers)
    row = await reminder_row(rig.db, reminder_id)
    assert (row.status, row.outcome, row.no_answer_retries) == ("pending", "no_answer", 1)
