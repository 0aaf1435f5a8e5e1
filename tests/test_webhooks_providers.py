"""The webhook routes of both real providers (Twilio, Telnyx) on SQLite and PostgreSQL, driven by
the provider's fake through a proxy that strips PUBLIC_URL's path prefix: the bound call speaks
once, the first answer wins and the others hang up without a word. What only one provider does
(signatures, TwiML, Telnyx's commands and sweep): tests/test_twilio_webhooks.py,
tests/test_telnyx_webhooks.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.db import Database
from tests.support.providers import PROVIDERS, Rig, rig_on
from tests.support.rows import attempt_row, reminder_row
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio

PROMPT = "Press 1 to confirm, press 2 to cancel. To receive no more reminder calls, press 9."


@pytest.fixture(params=PROVIDERS)
async def rig(request: pytest.FixtureRequest, db: Database) -> AsyncIterator[Rig]:
    async with rig_on(db, request.param) as rig:
        yield rig


async def test_the_answered_call_hears_the_message_once_and_binds_the_reminder(rig: Rig) -> None:
    reminder_id, (attempt_id,) = await rig.seed()
    call_id = await rig.place(reminder_id, attempt_id, record=False)  # only the webhooks name the call
    await eventually(rig.over(call_id))
    call = rig.call(call_id)
    # nobody pressed a key: the message with the question, the question once more, goodbye; ended by us
    assert call.heard[0].startswith("Hello Ann Example") and call.heard[0].endswith(PROMPT)
    assert call.heard[1:] == [PROMPT, "Thank you. Goodbye."]
    if rig.name == "telnyx":  # speech is commands, sent as the events come
        assert call.commands == ["gather_using_speak", "gather_using_speak", "speak", "hangup"]
        assert call.events == ["call.initiated", "call.answered", "call.gather.ended", "call.gather.ended",
                               "call.speak.started", "call.speak.ended", "call.hangup"]
    row = await reminder_row(rig.db, reminder_id)
    assert (row.bound_call_id, row.bound_attempt_id, row.outcome) == (call_id, attempt_id, "answered")
    assert row.answered_at is not None

    async def completed() -> bool:  # the fake ends the call, then tells it
        return (await attempt_row(rig.db, attempt_id)).call_status == "completed"

    await eventually(completed)
    attempt = await attempt_row(rig.db, attempt_id)
    assert attempt.provider_call_id == call_id and attempt.last_sequence is not None


async def test_first_answer_wins_the_others_hang_up_silently(rig: Rig) -> None:
    reminder_id, attempt_ids = await rig.seed(attempts=3)
    call_ids = await asyncio.gather(*(rig.place(reminder_id, attempt_id) for attempt_id in attempt_ids))
    await eventually(rig.over(*call_ids))

    heard = {call_id: rig.call(call_id).heard for call_id in call_ids}
    speakers = [call_id for call_id, words in heard.items() if words]
    assert len(speakers) == 1, heard
    assert (await reminder_row(rig.db, reminder_id)).bound_call_id == speakers[0]
    for call_id in set(call_ids) - set(speakers):
        assert rig.hung_up_silently(rig.call(call_id)), call_id


async def test_each_reminder_is_heard_once_when_several_share_a_number(rig: Rig) -> None:
    seeded = [await rig.seed(phone="+14155550100", attempts=2) for _ in range(3)]
    placed = {reminder_id: [await rig.place(reminder_id, a, "+14155550100") for a in attempts]
              for reminder_id, attempts in seeded}
    await eventually(rig.over(*[call_id for pair in placed.values() for call_id in pair]))
    for reminder_id, pair in placed.items():
        assert sum(bool(rig.call(call_id).heard) for call_id in pair) == 1
        assert (await reminder_row(rig.db, reminder_id)).bound_call_id in pair
