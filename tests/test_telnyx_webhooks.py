"""Telnyx mode in one process, on SQLite and PostgreSQL: the events route driven by the
Telnyx-shaped fake through a proxy that strips PUBLIC_URL's path prefix (Ed25519 signature first,
the greeting one command per call, recorded before it is sent), the leader's call sweep, Dials
over the rate, and the checks of Telnyx's settings. What Twilio does
alike: tests/test_webhooks_providers.py, tests/test_dispatch_providers.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from reminders_fakes.telnyx import TEST_PUBLIC_KEY, TEST_SIGNING_SEED, CalleeScript, sign
from service.db import CallAttempt, Database, Reminder
from service.dispatch.dispatcher import Dispatcher, fallback_wording
from service.dispatch.sweep import CallSweep
from service.ledger import SweepTimes
from service.providers.telnyx.rest import TelnyxProvider
from service.reminders import MessageTemplates
from service.telephony.provider import Stamp
from tests.support.providers import PHONE, TelnyxRig, make_rig, provider_settings, rig_on
from tests.support.rows import reminder_row
from tests.support.waiting import eventually
from tests.test_dispatch import FakeTerm, config, lead_until, seed

pytestmark = pytest.mark.anyio


@pytest.fixture
async def rig(db: Database) -> AsyncIterator[TelnyxRig]:
    async with rig_on(db, "telnyx") as rig:
        yield rig


async def attempt_rows(db: Database) -> dict:
    async with db.session() as session:
        return {row.id: row for row in await session.execute(select(CallAttempt.__table__))}


async def _status(db: Database, attempt_id: str, status: str) -> bool:
    return (await attempt_rows(db))[attempt_id].call_status == status


async def test_a_redelivered_answer_is_not_spoken_twice(db: Database, rig: TelnyxRig) -> None:
    reminder_id, (attempt_id,) = await rig.seed(PHONE)
    rig.fake.callees[PHONE] = CalleeScript("answer", digits="1")
    rig.fake.controls.speak_ms = 300.0  # still speaking when the answer comes again
    call_id = await rig.place(reminder_id, attempt_id, record=False)
    call = rig.fake.calls[call_id]
    await eventually(lambda: _async(bool(call.heard)))
    answered = {"record_type": "event", "event_type": "call.answered", "id": "again",
                "occurred_at": datetime.now(UTC).isoformat(), "payload": {
                    "call_control_id": call_id, "client_state": Stamp(reminder_id, attempt_id).encode()}}
    assert await rig.fake._post_event(call.webhook_url, answered)
    await eventually(rig.over(call_id))
    # the greeting was recorded as commanded before it was sent: a redelivery sends nothing again
    assert call.commands.count("gather_using_speak") == 1
    assert len(call.heard) == 2 and call.heard[1].startswith("Thank you, your appointment is confirmed")


async def _async(value: bool) -> bool:
    return value


def _greeting_lost_once(rig: TelnyxRig) -> dict[str, int]:
    """The first greeting command never reaches Telnyx and its answer is unknown (a timeout); the
    returned {"left": n} counts the losses still to come."""
    real_greet = rig.provider.greet
    losses = {"left": 1}

    async def greet_lost_once(*args: object, **kwargs: object) -> bool | None:
        if losses["left"]:
            losses["left"] -= 1
            return None
        return await real_greet(*args, **kwargs)  # type: ignore[arg-type]

    rig.provider.greet = greet_lost_once  # type: ignore[method-assign]
    return losses


async def test_forged_stale_and_unsigned_events_are_refused_and_change_nothing(db: Database, rig: TelnyxRig) -> None:
    reminder_id, (attempt_id,) = await rig.seed(PHONE)
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


def _sweep(db: Database, rig: TelnyxRig, **times: timedelta) -> CallSweep:
    return CallSweep(db, rig.provider, fallback=fallback_wording(MessageTemplates.parse(None)),
                     times=SweepTimes(**times))


async def test_the_sweep_sends_an_unconfirmed_greeting_again_as_the_same_command(db: Database) -> None:
    rig = make_rig(db, "telnyx")
    losses = _greeting_lost_once(rig)
    try:
        reminder_id, (attempt_id,) = await rig.seed(PHONE)
        call_id = await rig.place(reminder_id, attempt_id, record=False)
        await eventually(lambda: _async(losses["left"] == 0))  # bound, its greeting commanded, fate unknown
        assert rig.fake.calls[call_id].heard == []
        await _sweep(db, rig).once(token=1)  # same id, same words: Telnyx would ignore a repeat
        await eventually(lambda: _async(len(rig.fake.calls[call_id].heard) == 1))
        assert (await attempt_rows(db))[attempt_id].greeting_result == "accepted"
        await _sweep(db, rig).once(token=1)  # accepted now: nothing owed
        await eventually(rig.over(call_id))
        greetings = [c for c in rig.fake.calls[call_id].command_log if str(c.get("command_id")).startswith("greet-")]
        assert [(c["action"], c["result"]) for c in greetings] == [("gather_using_speak", "executed")]
        assert rig.fake.calls[call_id].heard[0].startswith("Hello")  # the message and question, once
    finally:
        await rig.aclose()


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


def test_telnyx_checks_its_key_and_connection_id() -> None:
    with pytest.raises(ValueError, match="TELNYX_PUBLIC_KEY"):
        provider_settings("telnyx", telnyx_public_key="c2hvcnQ=")
    with pytest.raises(ValueError, match="TELNYX_CONNECTION_ID"):
        provider_settings("telnyx", telnyx_connection_id="../x")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8092", "http://127.3.4.5:8092/replica-1", "http://[::1]:8092",
                                 "http://localhost:8092"])
def test_the_fakes_key_is_accepted_with_a_loopback_api_url(url: str) -> None:
    settings = provider_settings("telnyx", telnyx_public_key=TEST_PUBLIC_KEY, telnyx_api_url=url)
    assert settings.telnyx_public_key == TEST_PUBLIC_KEY


@pytest.mark.parametrize("url", ["https://api.telnyx.com", "http://10.0.0.5:8092", "http://fake-provider:8092",
                                 "https://localhost.example.com"])
def test_the_fakes_key_is_refused_beyond_loopback(url: str) -> None:
    """Its private half is in the repository: anyone could sign events for such a deployment.
    ALLOW_INSECURE_TRANSPORT does not waive it; whitespace around the key does not hide it."""
    for key in (TEST_PUBLIC_KEY, f"  {TEST_PUBLIC_KEY}\n"):
        with pytest.raises(ValueError, match=r"TELNYX_PUBLIC_KEY: the fake Telnyx provider's test key.*TELNYX_API_URL"):
            provider_settings("telnyx", telnyx_public_key=key, telnyx_api_url=url, allow_insecure_transport="true")
    assert provider_settings("telnyx", telnyx_api_url=url, allow_insecure_transport="true")  # the account's key: fine
    with pytest.raises(ValueError, match="TELNYX_PUBLIC_KEY: the fake"):
        provider_settings("telnyx", telnyx_public_key=TEST_PUBLIC_KEY)  # the default TELNYX_API_URL is Telnyx's


async def test_a_bound_call_that_ends_before_any_greeting_is_released_and_called_again(db: Database) -> None:
    rig = make_rig(db, "telnyx")
    rig.fake.controls.patience_ms = 100.0  # the callee hangs up in the silence
    # with machine detection, `call.answered` binds and its result greets: that result is lost
    rig.provider.machine_detection = True
    rig.fake.controls.event_loss_rate, rig.fake.controls.event_loss_types = 1.0, ["call.machine.detection.ended"]
    try:
        (reminder_id,) = await seed(db, 1)
        term = FakeTerm(1)
        times = SweepTimes(greet_after=timedelta(seconds=30), release_after=timedelta(milliseconds=200))
        dispatcher = Dispatcher(db, rig.provider, config(sweep_times=times, sweep_interval=0.1))
        task = asyncio.create_task(dispatcher.lead(term))
        try:
            async def heard_and_answered() -> bool:
                if len(rig.fake.calls) >= 2:  # a later call's detection result comes through
                    rig.fake.controls.event_loss_rate = 0.0
                row = (await _rows(db))[0]
                return row.outcome == "answered" and any(c.heard for c in rig.fake.calls.values())

            await eventually(heard_and_answered)
        finally:
            term.ended.set()
            await asyncio.wait_for(task, 10)
        await eventually(rig.over(*rig.fake.calls))
        # the poll may see the second call only after the sweep released it too (the loss still on):
        # every call but the last ended unheard and released, the last one spoke
        *unheard, second = sorted(rig.fake.calls.values(), key=lambda c: c.created)
        first = unheard[0]
        assert all(c.heard == [] and c.status == "completed" for c in unheard)  # bound, hung up in silence
        assert second.heard[0].startswith("Hello")  # the new call spoke
        row = (await _rows(db))[0]
        assert row.status == "sent" and row.bound_call_id == second.call_id
        released = (await attempt_rows(db))[Stamp.decode(first.client_state).attempt_id]  # type: ignore[union-attr]
        assert released.error.startswith("released")
    finally:
        await rig.aclose()


async def test_a_late_answer_of_an_ended_call_binds_nothing(db: Database, rig: TelnyxRig) -> None:
    rig.fake.controls.patience_ms = 50.0
    reminder_id, (attempt_id,) = await rig.seed(PHONE)
    rig.app.state.provider = _Mute(rig.provider)  # the service never speaks: the callee hangs up
    call_id = await rig.place(reminder_id, attempt_id, record=False)
    await eventually(rig.over(call_id))
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
    """The provider with a greeting that Telnyx never receives."""

    def __init__(self, inner: TelnyxProvider) -> None:
        self.inner = inner

    async def greet(self, *args: object, **kwargs: object) -> bool:
        return True

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_events_apply_by_state_then_occurred_at_never_back(db: Database, rig: TelnyxRig) -> None:
    from service.ledger import calls
    from service.providers.telnyx.events import hangup_status

    reminder_id, (attempt_id,) = await rig.seed(PHONE)
    stamp = Stamp(reminder_id, attempt_id)

    async def apply(status: str | None, order: int) -> str:
        await calls.record_event(db, stamp, "v3:call", status, order)
        return (await attempt_rows(db))[attempt_id].call_status

    assert await apply("in-progress", 200) == "in-progress"
    assert await apply("initiated", 300) == "in-progress"  # a later-stamped earlier state: never back
    assert await apply(calls.SPOKEN, 400) == calls.SPOKEN
    assert await apply(calls.SPEAKING, 350) == calls.SPOKEN  # out of order: ignored
    assert await apply(None, 999) == calls.SPOKEN  # digits, machine detection: no state
    assert await apply(hangup_status({"hangup_cause": "normal_clearing"}), 500) == "completed"
    assert await apply("in-progress", 900) == "completed"
    assert (await attempt_rows(db))[attempt_id].last_sequence == 500
    # every hang-up cause Telnyx documents, and one it does not
    causes = {"timeout": "no-answer", "no_answer": "no-answer", "call_rejected": "no-answer", "user_busy": "busy",
              "not_found": "failed", "originator_cancel": "canceled", "normal_clearing": "completed",
              "time_limit": "completed", "unspecified": "completed", "x": "completed"}
    assert {cause: hangup_status({"hangup_cause": cause}) for cause in causes} == causes


async def test_an_event_that_meets_a_database_blip_is_acknowledged_and_applied_after(
        db: Database, rig: TelnyxRig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Telnyx does not deliver again an event answered non-2xx (its failover URL gets it, if one is
    set): the final event of a call that met a database restart would be lost, its outcome left to a
    check 15 minutes later. It is acknowledged and applied once the database answers."""
    from service.providers.telnyx import webhooks

    real, failed = webhooks.calls.record_event, []

    async def record_event(db_, stamp, call_id, status, *args, **kwargs):
        if status == "completed" and not failed:
            failed.append(status)
            raise ConnectionRefusedError("the database is restarting")
        return await real(db_, stamp, call_id, status, *args, **kwargs)

    monkeypatch.setattr(webhooks.calls, "record_event", record_event)
    reminder_id, (attempt_id,) = await rig.seed(PHONE)
    rig.fake.callees[PHONE] = CalleeScript("answer", digits="1")
    call_id = await rig.place(reminder_id, attempt_id, record=False)
    await eventually(lambda: _status(db, attempt_id, "completed"))
    assert failed == ["completed"]

    def hangups() -> list[str]:
        return [d["result"] for d in rig.fake.calls[call_id].deliveries if d.get("type") == "call.hangup"]

    # the fake logs the delivery once our answer is back, which can follow the commit seen here
    await eventually(hangups)
    assert hangups() == ["acknowledged"]  # once, answered 2xx
