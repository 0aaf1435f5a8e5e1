"""The Twilio webhook routes on SQLite and PostgreSQL, driven by the Twilio-shaped fake through a
proxy that strips PUBLIC_URL's path prefix: the signature first (for PUBLIC_URL, not the URL a
request arrives at), TwiML per call, queued calls cancelled by the binder, the voice request's
database budget. What Telnyx does alike: tests/test_webhooks_providers.py."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from service.db import CallAttempt, Database
from service.db.models import new_id
from tests.support.providers import TwilioRig, make_rig, rig_on
from tests.support.rows import reminder_row
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
async def rig(db: Database) -> AsyncIterator[TwilioRig]:
    async with rig_on(db, "twilio") as rig:
        yield rig


async def attempt_rows(db: Database, reminder_id: str) -> list:
    async with db.session() as session:
        return list(await session.execute(select(CallAttempt.__table__).where(CallAttempt.reminder_id == reminder_id)))


async def test_the_binder_cancels_the_reminders_queued_calls(db: Database) -> None:
    rig = make_rig(db, "twilio", calls_per_second=1.0, ring_ms=50)  # the second call waits in Twilio's queue
    try:
        reminder_id, (first, second) = await rig.seed(attempts=2)
        sid_1 = await rig.place(reminder_id, first)
        sid_2 = await rig.place(reminder_id, second)
        await eventually(rig.over(sid_1, sid_2))
        assert rig.fake.calls[sid_1].heard and rig.fake.calls[sid_2].status == "canceled"
        assert rig.fake.calls[sid_2].heard == [] and rig.fake.calls[sid_2].twiml == []
    finally:
        await rig.aclose()


async def test_bad_or_missing_signature_is_403_and_writes_nothing(rig: TwilioRig) -> None:
    reminder_id, (attempt_id,) = await rig.seed()
    query = {"r": reminder_id, "a": attempt_id}
    form = {"CallSid": "CA" + "f" * 32, "CallStatus": "in-progress", "To": "+14155552671", "SequenceNumber": "1"}
    path, _, headers = rig.signed_post("voice", query, form)
    # Signed for the URL the request arrives at, not PUBLIC_URL: what a replay past the ingress would carry.
    arrival = rig.signature.sign("http://replica" + path, form)
    async with rig.client() as client:
        for route in ("voice", "status", "gather"):
            route_path = path.replace("/voice", f"/{route}")
            for bad in ({}, {"X-Twilio-Signature": "forged"}, {"X-Twilio-Signature": arrival},
                        {"X-Twilio-Signature": headers["X-Twilio-Signature"] if route != "voice" else "x"}):
                response = await client.post(route_path, data=form, headers=bad)
                assert response.status_code == 403, (route, bad)
            tampered = await client.post(path, data={**form, "CallSid": "CA" + "e" * 32}, headers=headers)
            assert tampered.status_code == 403
    row = await reminder_row(rig.db, reminder_id)
    assert row.bound_call_id is None and row.outcome is None and row.answered_at is None
    (attempt,) = await attempt_rows(rig.db, reminder_id)
    assert attempt.provider_call_id is None and attempt.call_status is None and attempt.last_event_at is None


async def test_repeated_voice_request_of_the_bound_call_speaks_again_others_hang_up(rig: TwilioRig) -> None:
    reminder_id, (first, second) = await rig.seed(attempts=2)
    bound_sid, other_sid = "CA" + "1" * 32, "CA" + "2" * 32
    async with rig.client() as client:
        answers = []
        for sid, attempt_id in ((bound_sid, first), (bound_sid, first), (other_sid, second)):
            path, form, headers = rig.signed_post("voice", {"r": reminder_id, "a": attempt_id},
                                                  {"CallSid": sid, "CallStatus": "in-progress"})
            response = await client.post(path, data=form, headers=headers)
            assert response.status_code == 200 and response.headers["content-type"].startswith("application/xml")
            answers.append(response.text)
        # the bound call's id must match its attempt: another sid on that stamp is refused
        path, form, headers = rig.signed_post("voice", {"r": reminder_id, "a": first},
                                              {"CallSid": other_sid, "CallStatus": "in-progress"})
        answers.append((await client.post(path, data=form, headers=headers)).text)
    assert "<Say" in answers[0] and answers[0] == answers[1]
    assert answers[2].endswith("<Response><Hangup /></Response>") and "<Say" not in answers[2]
    assert "<Say" not in answers[3]
    assert (await reminder_row(rig.db, reminder_id)).bound_call_id == bound_sid


async def test_unknown_or_malformed_events_are_acknowledged_and_change_nothing(rig: TwilioRig) -> None:
    reminder_id, (attempt_id,) = await rig.seed()
    sid = "CA" + "3" * 32
    cases = [
        ("status", {"r": new_id(), "a": new_id()}, {"CallSid": sid, "CallStatus": "ringing"}),
        ("status", {"r": new_id(), "a": attempt_id}, {"CallSid": sid, "CallStatus": "ringing"}),  # stamp mismatch
        ("status", {}, {"CallSid": sid, "CallStatus": "ringing"}),
        ("status", {"r": reminder_id, "a": attempt_id}, {"CallStatus": "ringing"}),
        ("voice", {"r": new_id(), "a": new_id()}, {"CallSid": sid, "CallStatus": "in-progress"}),
        ("voice", {}, {"CallSid": sid}),
        ("gather", {"r": reminder_id, "a": attempt_id}, {"CallSid": sid, "Digits": "1"}),
    ]
    async with rig.client() as client:
        for route, query, form in cases:
            path, form, headers = rig.signed_post(route, query, form)
            response = await client.post(path, data=form, headers=headers)
            assert response.status_code in (200, 204), (route, query, response.status_code)
            if route != "status":
                assert "<Say" not in response.text
    row = await reminder_row(rig.db, reminder_id)
    assert row.bound_call_id is None and row.outcome is None
    (attempt,) = await attempt_rows(rig.db, reminder_id)
    assert attempt.provider_call_id is None and attempt.call_status is None


async def test_status_events_apply_in_sequence_order_not_arrival(rig: TwilioRig) -> None:
    reminder_id, (attempt_id,) = await rig.seed()
    sid = "CA" + "4" * 32
    async with rig.client() as client:
        for status, sequence in (("completed", "3"), ("ringing", "1"), ("completed", "3"), ("initiated", "0")):
            path, form, headers = rig.signed_post("status", {"r": reminder_id, "a": attempt_id},
                                                  {"CallSid": sid, "CallStatus": status, "SequenceNumber": sequence})
            assert (await client.post(path, data=form, headers=headers)).status_code == 204
    (attempt,) = await attempt_rows(rig.db, reminder_id)
    assert (attempt.provider_call_id, attempt.call_status, attempt.last_sequence) == (sid, "completed", 3)


class DownFor:
    """The database, failing its first `failures` transactions as during a restart or failover."""

    def __init__(self, db: Database, failures: int) -> None:
        self.db, self.failures, self.is_sqlite = db, failures, db.is_sqlite

    def _fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            from sqlalchemy.exc import OperationalError

            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database restarting"))

    def session(self):
        self._fail()
        return self.db.session()

    async def write(self, work, *args, **kwargs):
        self._fail()
        return await self.db.write(work, *args, **kwargs)


async def test_an_answer_during_a_short_database_outage_still_hears_the_message(rig: TwilioRig) -> None:
    reminder_id, (attempt_id,) = await rig.seed()
    rig.app.state.db = DownFor(rig.db, failures=3)
    path, form, headers = rig.signed_post("voice", {"r": reminder_id, "a": attempt_id},
                                          {"CallSid": "CA" + "5" * 32, "CallStatus": "in-progress"})
    async with rig.client() as client:
        response = await client.post(path, data=form, headers=headers)
    assert "<Say" in response.text and rig.app.state.db.failures == 0
    assert (await reminder_row(rig.db, reminder_id)).bound_call_id == "CA" + "5" * 32


def _redirect(twiml: str) -> dict[str, str]:
    """The query of a hold's <Redirect> (a second of silence first)."""
    from urllib.parse import parse_qsl, urlsplit

    match = re.fullmatch(r'.*<Response><Pause length="1" /><Redirect method="POST">([^<]+)</Redirect></Response>',
                         twiml)
    assert match, twiml
    url = html.unescape(match.group(1))
    assert url.startswith(rig_voice_url())
    return dict(parse_qsl(urlsplit(url).query))


def rig_voice_url() -> str:
    from service.providers.twilio.rest import WEBHOOK_PATHS
    from tests.support.providers import PUBLIC

    return PUBLIC + WEBHOOK_PATHS["voice"]


async def test_a_longer_outage_hands_over_to_the_fallback_which_holds_the_call_then_hangs_up_without_a_word(
        rig: TwilioRig) -> None:
    from service.providers.twilio.webhooks import VOICE_HOLDS

    reminder_id, (attempt_id,) = await rig.seed()
    rig.app.state.db = DownFor(rig.db, failures=10_000)
    rig.app.state.voice_database_budget = 0.3
    stamp = {"r": reminder_id, "a": attempt_id}
    call = {"CallSid": "CA" + "6" * 32, "CallStatus": "in-progress", "AnsweredBy": "human"}
    async with rig.client() as client:
        path, form, headers = rig.signed_post("voice", stamp, call)
        first = await client.post(path, data=form, headers=headers)
        assert first.status_code == 503  # Twilio asks the FallbackUrl: another replica
        path, form, headers = rig.signed_post("voice", stamp, {**call, "ErrorCode": "11200", "ErrorUrl": path})
        answer = await client.post(path, data=form, headers=headers)
        for held in range(1, VOICE_HOLDS + 1):  # silence, then the voice URL again (no AnsweredBy on a redirect)
            query = _redirect(answer.text)
            assert query == {**stamp, "hold": str(held), "ab": "human"}
            path, form, headers = rig.signed_post("voice", query, {"CallSid": call["CallSid"],
                                                                   "CallStatus": "in-progress"})
            answer = await client.post(path, data=form, headers=headers)
    assert answer.status_code == 200 and answer.text.endswith("<Response><Hangup /></Response>")
    assert (await reminder_row(rig.db, reminder_id)).bound_call_id is None


async def test_a_held_call_hears_its_message_once_the_database_is_back(rig: TwilioRig) -> None:
    reminder_id, (attempt_id,) = await rig.seed()
    down = DownFor(rig.db, failures=10_000)
    rig.app.state.db, rig.app.state.voice_database_budget = down, 0.3
    stamp, call = {"r": reminder_id, "a": attempt_id}, {"CallSid": "CA" + "8" * 32, "CallStatus": "in-progress"}
    async with rig.client() as client:
        path, form, headers = rig.signed_post("voice", stamp, {**call, "ErrorCode": "11200", "ErrorUrl": "x"})
        held = await client.post(path, data=form, headers=headers)
        down.failures = 0  # the database is back
        path, form, headers = rig.signed_post("voice", _redirect(held.text), call)
        answer = await client.post(path, data=form, headers=headers)
    assert "<Say" in answer.text and "<Gather" in answer.text
    assert (await reminder_row(rig.db, reminder_id)).bound_call_id == call["CallSid"]


class SlowFirst:
    """The database, whose first session opens only after `pause` seconds: a replica frozen
    (SIGSTOP) while it held the voice request, resumed past the webhook's retry budget."""

    def __init__(self, db: Database, pause: float) -> None:
        self.db, self.pause, self.is_sqlite = db, pause, db.is_sqlite

    def session(self):
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def opened():
            await self._paused()
            async with self.db.session() as session:
                yield session

        return opened()

    async def _paused(self) -> None:
        if self.pause:
            pause, self.pause = self.pause, 0.0
            await asyncio.sleep(pause)

    async def write(self, work, *args, **kwargs):
        await self._paused()
        return await self.db.write(work, *args, **kwargs)


async def test_a_voice_request_resumed_past_its_budget_still_tries_once(rig: TwilioRig) -> None:
    rig.app.state.voice_database_budget = 0.5
    reminder_id, (attempt_id,) = await rig.seed()
    rig.app.state.db = SlowFirst(rig.db, pause=1.0)  # past the budget before the first try is done
    path, form, headers = rig.signed_post("voice", {"r": reminder_id, "a": attempt_id},
                                          {"CallSid": "CA" + "7" * 32, "CallStatus": "in-progress"})
    async with rig.client() as client:
        response = await client.post(path, data=form, headers=headers)
    assert "<Say" in response.text


async def test_a_key_pressed_during_an_outage_is_held_and_counted_once_the_database_is_back(rig: TwilioRig) -> None:
    from service.db import Appointment

    reminder_id, (attempt_id,) = await rig.seed()
    stamp, sid = {"r": reminder_id, "a": attempt_id}, "CA" + "9" * 32
    async with rig.client() as client:
        path, form, headers = rig.signed_post("voice", stamp, {"CallSid": sid, "CallStatus": "in-progress"})
        assert "<Gather" in (await client.post(path, data=form, headers=headers)).text  # bound
        down = DownFor(rig.db, failures=10_000)
        rig.app.state.db, rig.app.state.voice_database_budget = down, 0.3
        path, form, headers = rig.signed_post("gather", {**stamp, "n": "1"}, {"CallSid": sid, "Digits": "1"})
        held = await client.post(path, data=form, headers=headers)
        match = re.search(r'<Redirect method="POST">([^<]+)</Redirect>', held.text)
        assert match and "<Pause" in held.text, held.text
        from urllib.parse import parse_qsl, urlsplit

        query = dict(parse_qsl(urlsplit(html.unescape(match.group(1))).query))
        assert query == {**stamp, "n": "1", "hold": "1", "d": "1"}
        down.failures = 0  # the database is back
        path, form, headers = rig.signed_post("gather", query, {"CallSid": sid})  # a redirect posts no Digits
        answer = await client.post(path, data=form, headers=headers)
    assert "confirmed" in answer.text
    async with rig.db.session() as session:
        row = (await session.execute(select(Appointment.confirmation).join(
            Appointment.reminders).where(Appointment.reminders.any(id=reminder_id)))).first()
    assert row is not None and row.confirmation == "confirmed"
