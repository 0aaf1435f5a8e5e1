"""Telnyx mode in one process, on SQLite and PostgreSQL: the events route driven by the
Telnyx-shaped fake through a proxy that strips PUBLIC_URL's path prefix (signature first, speech
a command sent before the acknowledgement, first answer wins, others hung up silently), the
leader's speech sweep, and the dispatcher reconciling through the connection's active calls."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select

from reminders_fakes.telnyx import TEST_PUBLIC_KEY, TEST_SIGNING_SEED, CalleeScript, sign
from service.app import create_app
from service.components import check
from service.components import provider as provider_for
from service.config import Settings
from service.db import CallAttempt, Database, Reminder
from service.dispatch.dispatcher import Dispatcher, _wording
from service.dispatch.speech import SpeechSweep
from service.providers.telnyx.rest import TelnyxProvider
from service.telephony.provider import CallSpec, Stamp
from tests.support.telnyx_rig import FROM, TelnyxRig, make_telnyx_rig
from tests.support.twilio_rig import Rig
from tests.support.waiting import eventually
from tests.test_dispatch import FakeTerm, config, lead_until, seed

pytestmark = pytest.mark.anyio

PROMPT = "Press 1 to confirm, press 2 to cancel."

PHONE = "+14155552671"


@pytest.fixture
async def rig(db: Database) -> AsyncIterator[TelnyxRig]:
    rig = make_telnyx_rig(db)
    yield rig
    await rig.aclose()


async def seeded(rig: TelnyxRig, attempts: int = 1) -> tuple[str, list[str]]:
    """One appointment, one reminder `sent`, `attempts` attempts `creating` (the Twilio rig's seed)."""
    return await Rig.seed(rig, PHONE, attempts=attempts)  # type: ignore[arg-type]


async def place(rig: TelnyxRig, reminder_id: str, attempt_id: str) -> str:
    result = await rig.provider.create_call(CallSpec(to=PHONE, from_=FROM, reminder_id=reminder_id,
                                                     appointment_id="-", attempt_id=attempt_id))
    assert result.call_id, result
    return result.call_id


def over(rig: TelnyxRig, *call_ids: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return all(not rig.fake.calls[c].alive and rig.fake.calls[c].outbox.empty() for c in call_ids)

    return check


async def reminder_row(db: Database, reminder_id: str):
    async with db.session() as session:
        return (await session.execute(select(Reminder.__table__).where(Reminder.id == reminder_id))).one()


async def attempt_rows(db: Database) -> dict:
    async with db.session() as session:
        return {row.id: row for row in await session.execute(select(CallAttempt.__table__))}


async def test_the_bound_call_speaks_once_then_hangs_up(db: Database, rig: TelnyxRig) -> None:
    reminder_id, (attempt_id,) = await seeded(rig)
    call_id = await place(rig, reminder_id, attempt_id)
    await eventually(over(rig, call_id))
    call = rig.fake.calls[call_id]
    # the message with the keypad question; no key: the question once more, then goodbye; ended by us
    assert call.heard[0].startswith("Hello Ann Example") and call.heard[0].endswith(PROMPT)
    assert call.heard[1:] == [PROMPT, "Thank you. Goodbye."]
    assert call.commands == ["gather_using_speak", "gather_using_speak", "speak", "hangup"]
    assert call.events == ["call.initiated", "call.answered", "call.gather.ended", "call.gather.ended",
                           "call.speak.started", "call.speak.ended", "call.hangup"]
    row = await reminder_row(db, reminder_id)
    assert (row.outcome, row.bound_call_id, row.bound_attempt_id) == ("answered", call_id, attempt_id)
    attempt = (await attempt_rows(db))[attempt_id]
    await eventually(lambda: _status(db, attempt_id, "completed"))
    assert attempt.provider_call_id == call_id


async def _status(db: Database, attempt_id: str, status: str) -> bool:
    return (await attempt_rows(db))[attempt_id].call_status == status


async def test_only_the_first_answered_call_speaks(db: Database, rig: TelnyxRig) -> None:
    reminder_id, attempts = await seeded(rig, attempts=3)
    call_ids = await asyncio.gather(*(place(rig, reminder_id, a) for a in attempts))
    await eventually(over(rig, *call_ids))
    heard = [c for c in call_ids if rig.fake.calls[c].heard]
    assert len(heard) == 1
    row = await reminder_row(db, reminder_id)
    assert row.bound_call_id == heard[0]
    for other in set(call_ids) - set(heard):
        assert rig.fake.calls[other].heard == [] and "hangup" in rig.fake.calls[other].commands
        assert "speak" not in rig.fake.calls[other].commands


async def test_a_redelivered_answer_is_not_spoken_twice(db: Database, rig: TelnyxRig) -> None:
    reminder_id, (attempt_id,) = await seeded(rig)
    rig.fake.callees["+14155552671"] = CalleeScript("answer", digits="1")
    rig.fake.controls.speak_ms = 300.0  # still speaking when the answer comes again
    call_id = await place(rig, reminder_id, attempt_id)
    call = rig.fake.calls[call_id]
    await eventually(lambda: _async(bool(call.heard)))
    answered = {"record_type": "event", "event_type": "call.answered", "id": "again",
                "occurred_at": datetime.now(UTC).isoformat(), "payload": {
                    "call_control_id": call_id, "client_state": Stamp(reminder_id, attempt_id).encode()}}
    assert await rig.fake._post_event(call.webhook_url, answered)
    await eventually(over(rig, call_id))
    assert call.commands.count("gather_using_speak") == 2  # sent again, deduped by command_id
    assert len(call.heard) == 2 and call.heard[1].startswith("Thank you, your appointment is confirmed")


async def _async(value: bool) -> bool:
    return value


def _greeting_fails_once(rig: TelnyxRig) -> dict[str, int]:
    """The first greeting command (the message with the keypad question) is not accepted; the
    returned {"left": n} counts the refusals still to come."""
    real_gather = rig.provider.gather_using_speak
    refusals = {"left": 1}

    async def gather_failing_once(*args: object, **kwargs: object) -> bool:
        if refusals["left"]:
            refusals["left"] -= 1
            return False
        return await real_gather(*args, **kwargs)  # type: ignore[arg-type]

    rig.provider.gather_using_speak = gather_failing_once  # type: ignore[method-assign]
    return refusals


async def test_forged_stale_and_unsigned_events_are_refused_and_change_nothing(db: Database, rig: TelnyxRig) -> None:
    reminder_id, (attempt_id,) = await seeded(rig)
    body = json.dumps({"data": {"event_type": "call.answered", "id": "x", "occurred_at": datetime.now(UTC).isoformat(),
                                "payload": {"call_control_id": "v3:forged",
                                            "client_state": Stamp(reminder_id, attempt_id).encode()}}}).encode()
    now = str(int(time.time()))
    stale = str(int(time.time()) - 301)
    forged_seed = bytes(32)
    before = (await reminder_row(db, reminder_id), await attempt_rows(db))
    async with rig.client() as client:
        for headers in (
            {},  # unsigned
            {"telnyx-timestamp": now, "telnyx-signature-ed25519": sign(forged_seed, now, body)},  # another key
            {"telnyx-timestamp": stale, "telnyx-signature-ed25519": sign(TEST_SIGNING_SEED, stale, body)},  # replayed
            {"telnyx-timestamp": now, "telnyx-signature-ed25519": sign(TEST_SIGNING_SEED, now, body + b" ")},
        ):
            response = await client.post("/telephony/telnyx/events", content=body, headers=headers)
            assert response.status_code == 403
        signed = {"telnyx-timestamp": now, "telnyx-signature-ed25519": sign(TEST_SIGNING_SEED, now, b"[]")}
        assert (await client.post("/telephony/telnyx/events", content=b"[]", headers=signed)).status_code == 200
    assert (await reminder_row(db, reminder_id), await attempt_rows(db)) == before
    assert rig.fake.calls == {}


async def test_the_sweep_speaks_a_bound_call_that_never_spoke(db: Database) -> None:
    rig = make_telnyx_rig(db)
    rig.fake._webhook_tries = 1
    refusals = _greeting_fails_once(rig)
    try:
        reminder_id, (attempt_id,) = await seeded(rig)
        call_id = await place(rig, reminder_id, attempt_id)
        await eventually(lambda: _async(refusals["left"] == 0))  # bound, and its greeting refused
        sweep = SpeechSweep(db, rig.provider, wording=_wording, confirm_after=timedelta(seconds=5))
        assert await sweep.once(datetime.now(UTC)) == 0  # too early: the answer may still be speaking
        assert rig.fake.calls[call_id].heard == []
        assert await sweep.once(datetime.now(UTC) + timedelta(seconds=6)) == 1
        await eventually(over(rig, call_id))
        assert len(rig.fake.calls[call_id].heard) == 1
        assert await sweep.once(datetime.now(UTC) + timedelta(seconds=60)) == 0  # spoken: nothing owed
    finally:
        await rig.aclose()


async def test_dispatcher_each_reminder_heard_once_and_in_doubt_reconciled(db: Database, rig: TelnyxRig) -> None:
    rig.fake.controls.fail_after_create_rate = 1.0  # every Dial makes a call and answers 500
    ids = await seed(db, 4)
    rows_of = lambda: _rows(db)  # noqa: E731

    async def all_answered() -> bool:
        return all(r.status == "sent" and r.outcome == "answered" for r in await rows_of())

    await lead_until(Dispatcher(db, rig.provider, config(reconcile_grace=timedelta(seconds=1))), FakeTerm(1),
                     all_answered)
    await eventually(over(rig, *rig.fake.calls))
    heard = Counter(c.inspect()["stamp"]["r"] for c in rig.fake.calls.values() if c.heard)
    assert heard == Counter({reminder_id: 1 for reminder_id in ids})
    assert len(rig.fake.calls) == 4  # in doubt, reconciled by the calls' own events: no second Dial
    assert {a.state for a in (await attempt_rows(db)).values()} == {"in_doubt"}


async def _rows(db: Database) -> list:
    async with db.session() as session:
        return list(await session.execute(select(Reminder.__table__)))


async def test_rate_limited_dials_are_retried_after_the_window(db: Database, rig: TelnyxRig) -> None:
    rig.fake.controls.calls_per_second = 2.0
    ids = await seed(db, 5)

    async def all_answered() -> bool:
        return all(r.outcome == "answered" for r in await _rows(db))

    await lead_until(Dispatcher(db, rig.provider, config(max_attempts=20)), FakeTerm(1), all_answered)
    assert any(r["status"] == 429 for r in rig.fake.requests)
    assert len(rig.fake.calls) == len(ids)  # a 429 made no call


# An account's own key (the fake's is refused unless TELNYX_API_URL is loopback).
ACCOUNT_PUBLIC_KEY = base64.b64encode(
    Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
).decode()


def telnyx_settings(**overrides: str) -> Settings:
    values = {"telephony_provider": "telnyx", "public_url": "https://reminders.example.test/edge",
              "telnyx_api_key": "KEY", "telnyx_connection_id": "1494404757140276705",
              "telnyx_public_key": ACCOUNT_PUBLIC_KEY}
    values.update(overrides)
    settings = Settings(**values)
    check(settings)  # the provider's own checks, as `reminders serve` and create_app run them
    return settings


def test_telnyx_mode_needs_its_settings() -> None:
    assert isinstance(provider_for(telnyx_settings()), TelnyxProvider)
    with pytest.raises(ValueError, match="PUBLIC_URL, TELNYX_API_KEY, TELNYX_CONNECTION_ID, TELNYX_PUBLIC_KEY"):
        check(Settings(telephony_provider="telnyx"))
    with pytest.raises(ValueError, match="TELNYX_PUBLIC_KEY"):
        telnyx_settings(telnyx_public_key="c2hvcnQ=")
    with pytest.raises(ValueError, match="TELNYX_CONNECTION_ID"):
        telnyx_settings(telnyx_connection_id="../x")
    assert Settings().telephony_provider == "generic"


def test_no_key_over_plain_remote_http() -> None:
    with pytest.raises(ValueError, match="TELNYX_API_URL"):
        telnyx_settings(telnyx_api_url="http://telnyx.internal")
    assert telnyx_settings(telnyx_api_url="http://telnyx.internal", allow_insecure_transport="true")
    assert telnyx_settings(telnyx_api_url="http://127.0.0.1:8092")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8092", "http://127.3.4.5:8092/replica-1", "http://[::1]:8092",
                                 "http://localhost:8092"])
def test_the_fakes_key_is_accepted_with_a_loopback_api_url(url: str) -> None:
    assert telnyx_settings(telnyx_public_key=TEST_PUBLIC_KEY, telnyx_api_url=url).telnyx_public_key == TEST_PUBLIC_KEY


@pytest.mark.parametrize("url", ["https://api.telnyx.com", "http://10.0.0.5:8092", "http://fake-provider:8092",
                                 "https://localhost.example.com"])
def test_the_fakes_key_is_refused_beyond_loopback(url: str) -> None:
    """Its private half is in the repository: anyone could sign events for such a deployment.
    ALLOW_INSECURE_TRANSPORT does not waive it; whitespace around the key does not hide it."""
    for key in (TEST_PUBLIC_KEY, f"  {TEST_PUBLIC_KEY}\n"):
        with pytest.raises(ValueError, match=r"TELNYX_PUBLIC_KEY: the fake Telnyx provider's test key.*TELNYX_API_URL"):
            telnyx_settings(telnyx_public_key=key, telnyx_api_url=url, allow_insecure_transport="true")
    assert telnyx_settings(telnyx_api_url=url, allow_insecure_transport="true")  # the account's key: fine
    with pytest.raises(ValueError, match="TELNYX_PUBLIC_KEY: the fake"):
        telnyx_settings(telnyx_public_key=TEST_PUBLIC_KEY)  # the default TELNYX_API_URL is Telnyx's


async def test_the_app_serves_signed_events_only_in_telnyx_mode() -> None:
    for app, expected in ((create_app(Settings()), 404), (create_app(telnyx_settings()), 403)):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://replica") as client:
            response = await client.post("/telephony/telnyx/events", content=b"{}")
            assert response.status_code == expected


async def test_a_bound_call_that_ends_unheard_is_released_and_called_again(db: Database) -> None:
    rig = make_telnyx_rig(db)
    rig.fake._webhook_tries = 1
    rig.fake.controls.patience_ms = 100.0  # the callee hangs up in the silence
    _greeting_fails_once(rig)
    try:
        (reminder_id,) = await seed(db, 1)
        term = FakeTerm(1)
        dispatcher = Dispatcher(db, rig.provider, config(speech_confirm_after=timedelta(milliseconds=300),
                                                         speech_sweep_interval=0.1))
        task = asyncio.create_task(dispatcher.lead(term))
        try:
            async def heard_and_answered() -> bool:
                row = (await _rows(db))[0]
                return row.outcome == "answered" and any(c.heard for c in rig.fake.calls.values())

            await eventually(heard_and_answered)
        finally:
            term.ended.set()
            await asyncio.wait_for(task, 10)
        await eventually(over(rig, *rig.fake.calls))
        first, second = sorted(rig.fake.calls.values(), key=lambda c: c.created)
        assert first.heard == [] and first.status == "completed"  # bound, then the callee hung up in silence
        assert second.heard[0].startswith("Hello")  # the new call spoke
        row = (await _rows(db))[0]
        assert row.status == "sent" and row.bound_call_id == second.call_id
        released = (await attempt_rows(db))[Stamp.decode(first.client_state).attempt_id]  # type: ignore[union-attr]
        assert released.error.startswith("released")
    finally:
        await rig.aclose()


async def test_a_late_answer_of_an_ended_call_binds_nothing(db: Database, rig: TelnyxRig) -> None:
    rig.fake.controls.patience_ms = 50.0
    rig.fake._webhook_tries = 1
    reminder_id, (attempt_id,) = await seeded(rig)
    rig.app.state.provider = _Mute(rig.provider)  # the service never speaks: the callee hangs up
    call_id = await place(rig, reminder_id, attempt_id)
    await eventually(over(rig, call_id))
    await eventually(lambda: _status(db, attempt_id, "completed"))
    async with db.session() as session:  # as the sweep's release would leave it
        from sqlalchemy import update

        await session.execute(update(Reminder).where(Reminder.id == reminder_id)
                              .values(bound_call_id=None, bound_attempt_id=None))
        await session.commit()
    answered = {"record_type": "event", "event_type": "call.answered", "id": "late",
                "occurred_at": datetime.now(UTC).isoformat(), "payload": {
                    "call_control_id": call_id, "client_state": Stamp(reminder_id, attempt_id).encode()}}
    assert await rig.fake._post_event(rig.fake.calls[call_id].webhook_url, answered)
    assert (await reminder_row(db, reminder_id)).bound_call_id is None


class _Mute:
    """The provider with a speak command that Telnyx never receives."""

    def __init__(self, inner: TelnyxProvider) -> None:
        self.inner = inner

    async def speak(self, *args: object, **kwargs: object) -> bool:
        return True

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_events_apply_by_state_then_occurred_at_never_back(db: Database, rig: TelnyxRig) -> None:
    from service.ledger import calls
    from service.providers.telnyx.events import hangup_status

    reminder_id, (attempt_id,) = await seeded(rig)
    stamp, now = Stamp(reminder_id, attempt_id), datetime.now(UTC)

    async def apply(status: str | None, order: int) -> str:
        await calls.record_event(db, stamp, "v3:call", status, order, now)
        return (await attempt_rows(db))[attempt_id].call_status

    assert await apply("in-progress", 200) == "in-progress"
    assert await apply("initiated", 300) == "in-progress"  # a later-stamped earlier state: never back
    assert await apply(calls.SPOKEN, 400) == calls.SPOKEN
    assert await apply(calls.SPEAKING, 350) == calls.SPOKEN  # out of order: ignored
    assert await apply(None, 999) == calls.SPOKEN  # digits, machine detection: no state
    assert await apply(hangup_status({"hangup_cause": "normal_clearing"}), 500) == "completed"
    assert await apply("in-progress", 900) == "completed"
    assert (await attempt_rows(db))[attempt_id].last_sequence == 500
    assert [hangup_status({"hangup_cause": c}) for c in ("user_busy", "timeout", "originator_cancel", "x")] == [
        "busy", "no-answer", "canceled", "completed"]
