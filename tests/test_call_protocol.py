"""The holes late, lost and replayed provider events opened in the real-provider paths, one test
(or a few) per hole of issue 22, each replaying its interleaving with the honest fakes
(docs/decisions/0221-the-call-protocol.md). On SQLite and PostgreSQL: the protocol lives in the
database."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from reminders_fakes.controls import CalleeScript
from service import appointments
from service.components import check
from service.config import Settings
from service.db import Appointment, CallAttempt, Database, Reminder
from service.dispatch import dispatcher as dispatcher_module
from service.dispatch.dispatcher import Dispatcher, fallback_wording
from service.dispatch.stamped import StampedCalls, StampedConfig
from service.dispatch.sweep import CallSweep
from service.errors import SettingError
from service.ledger import AttemptStore, Outcome, ReminderStore, SweepTimes
from service.ledger import calls as calls_module
from service.ledger import claims as claims_module
from service.ledger.calls import ANSWERED_UNHEARD, UNHEARD_RECALLS
from service.ledger.sweep import DETECTION_DELIVERY
from service.providers.twilio.signature import TwilioSignature
from service.reminders import (
    ALWAYS,
    Answerer,
    CallCaps,
    MessageTemplates,
    NoAnswerPolicy,
    PlanningConfig,
    ReminderOffset,
)
from service.reminders.attempts import AttemptState, AttemptView
from service.telephony.provider import MACHINE_DETECTION_WITHIN, CallSpec, Stamp
from tests.support.providers import FROM, PHONE, PUBLIC, Rig, make_rig
from tests.support.waiting import eventually
from tests.test_dispatch import FakeTerm, config, lead_until

pytestmark = pytest.mark.anyio

PLANNING = PlanningConfig(call_window=ALWAYS, offsets=(ReminderOffset(before=timedelta(hours=1)),))
TEMPLATES = MessageTemplates.parse(None)


async def _true(value: bool) -> bool:
    return value


async def book(db: Database, *, due_in: timedelta = timedelta(seconds=-1), phone: str = PHONE) -> tuple[str, str]:
    """An appointment in two hours, through the service, with one reminder due at `due_in`; the
    reminder's due time is then set (a test may write) so that it is due now. (appointment, reminder)."""
    now = datetime.now(UTC)
    view = await appointments.create(db, appointments.NewAppointment(
        customer_name="Ann Example", phone=phone, starts_at=now + timedelta(hours=2),
        remind_at=[now + timedelta(minutes=5)]), PLANNING)
    (reminder,) = view["reminders"]
    async with db.session() as session:
        await session.execute(update(Reminder).where(Reminder.id == reminder["id"])
                              .values(due_at=now + due_in, next_attempt_at=now + due_in))
        await session.commit()
    return view["id"], reminder["id"]


async def placed(rig: Rig, reminder_id: str, *, token: int = 1, phone: str = PHONE) -> tuple[str, str]:
    """The reminder claimed under `token`, its attempt recorded and its call created at the fake,
    and `sent`, as the dispatcher leaves it. (attempt id, call id)."""
    store = ReminderStore(rig.db)
    await store.raise_fence(token, "leader")
    claims = await store.claim(token, "leader", limit=50, stale_after=timedelta(minutes=2))
    assert reminder_id in {c.reminder_id for c in claims}
    attempt_id = await AttemptStore(rig.db).begin(token, reminder_id)
    assert attempt_id is not None
    call_id = await rig.place(reminder_id, attempt_id, phone)
    refused = await store.finish_many(token, [(reminder_id, Outcome.sent(call_id, datetime.now(UTC), attempts=1))])
    # the call's own final event may beat the create's answer (a callee who rings for 10 ms): it moved
    # the reminder on (`sent`, or `pending` for a no-answer retry) and the dispatcher's `sent` is refused
    assert not refused or (await row(rig.db, reminder_id)).status in ("sent", "pending"), refused
    return attempt_id, call_id


async def row(db: Database, reminder_id: str):
    async with db.session() as session:
        return (await session.execute(select(Reminder.__table__).where(Reminder.id == reminder_id))).one()


async def confirmation(db: Database, appointment_id: str) -> str | None:
    async with db.session() as session:
        return (await session.execute(select(Appointment.confirmation)
                                      .where(Appointment.id == appointment_id))).scalar_one()


def greetings(call) -> list[dict]:
    """The greeting commands the Telnyx fake executed on a call."""
    return [c for c in call.command_log if str(c.get("command_id", "")).startswith("greet-")
            and c.get("result") == "executed"]


def heard_message(call) -> int:
    """How often the message itself (not the question, not the last words) was heard."""
    return sum(1 for words in call.listener.person_heard if words.startswith("Hello"))


class AnswersFailFor:
    """The database, whose first `failures` binding transactions (a voice request's) fail."""

    def __init__(self, db: Database, failures: int) -> None:
        self.db, self.failures, self.is_sqlite = db, failures, db.is_sqlite

    def session(self):
        return self.db.session()

    async def write(self, work, *args, **kwargs):
        if work.__name__ == "_answer" and self.failures > 0:
            self.failures -= 1
            from sqlalchemy.exc import OperationalError

            raise OperationalError("UPDATE reminders", {}, ConnectionRefusedError("database restarting"))
        return await self.db.write(work, *args, **kwargs)


def times(**overrides: float) -> SweepTimes:
    return SweepTimes(**{name: timedelta(seconds=value) for name, value in overrides.items()})


# -- 1, 7: the sweep and the greeting, late detection and skewed clocks -------------------------------


async def test_hole_1_a_late_detection_event_after_the_sweep_greeted_sends_no_second_message(db: Database) -> None:
    """Hole 1: the detection result comes after the sweep's wait; the sweep greeted (the one
    greeting command of the call); the late result sends nothing more. Heard once. The message
    lasts longer than the result is late, so a second greeting would still find the call live."""
    rig = make_rig(db, "telnyx", machine_detection=True, speak_ms=3000.0)
    rig.fake.controls.event_delay_ms, rig.fake.controls.event_delay_types = 1500.0, ["call.machine.detection.ended"]
    rig.fake.callees[PHONE] = CalleeScript("answer", digits="1")
    try:
        _, reminder_id = await book(db)
        attempt_id, call_id = await placed(rig, reminder_id)
        call = rig.call(call_id)
        await eventually(lambda: _true(call.status == "in-progress"))
        sweep = CallSweep(db, rig.provider, fallback=fallback_wording(TEMPLATES), times=times(greet_after=0.3))

        async def swept() -> bool:
            await sweep.once(token=1)
            return bool(greetings(call))

        await eventually(swept)  # the sweep greeted before the late detection result
        await eventually(lambda: _true(_detection_delivered(call)))  # the late result reached the service
        await eventually(rig.over(call_id))
        assert len(greetings(call)) == 1 and heard_message(call) == 1
    finally:
        await rig.aclose()


def _detection_delivered(call) -> bool:
    """The fake delivered the call's detection result (not merely emitted it)."""
    return any(d.get("type") == "call.machine.detection.ended" and d.get("result") == "acknowledged"
               for d in call.deliveries)


async def test_a_person_whose_detection_result_is_lost_is_greeted_before_the_silence_ends(db: Database) -> None:
    """Decision 0223: the detection's result is lost; the sweep, at the production times and period,
    greets the call as a person once the result is overdue (the Dial's analysis bound, then its
    delivery) — while the fake's person, who hangs up after its default 10 s of silence, is still
    there. Greeted after a fixed 10 s, that person had gone: a silent call, then another."""
    rig = _detection_lost(db)
    assert rig.fake.controls.patience_ms == 10_000.0  # the fake's callee, as the chaos runs have it
    rig.fake.callees[PHONE] = CalleeScript("answer", digits="1")
    try:
        _, reminder_id = await book(db)
        dispatcher = Dispatcher(db, rig.provider, config())
        assert (dispatcher.config.sweep_interval, dispatcher.config.sweep_times.greet_after) == (
            2.0, MACHINE_DETECTION_WITHIN + DETECTION_DELIVERY)

        async def over() -> bool:
            return len(rig.calls()) >= 1 and all(map(rig.is_over, rig.calls()))

        term = FakeTerm(1)
        task = asyncio.create_task(dispatcher.lead(term))
        try:  # the race itself runs on the production times: only the wait for its end is generous
            await eventually(over, timeout=40)
        finally:
            term.ended.set()
            await asyncio.wait_for(task, 10)
        (call,) = rig.calls()
        assert not _detection_delivered(call) and heard_message(call) == 1
        done = await row(db, reminder_id)
        assert (done.status, done.outcome, done.bound_call_id) == ("sent", "answered", call.call_id)
    finally:
        await rig.aclose()


def _detection_lost(db: Database) -> Rig:
    """Telnyx with machine detection whose every result is lost: calls bound by `call.answered`,
    greeted by nobody but the sweep."""
    rig = make_rig(db, "telnyx", machine_detection=True)
    rig.fake.controls.event_loss_rate, rig.fake.controls.event_loss_types = 1.0, ["call.machine.detection.ended"]
    return rig


async def _answered(db: Database, rig: Rig, count: int) -> list[str]:
    """`count` reminders, each to its own person who answers, placed; their call ids."""
    call_ids = []
    for index in range(count):
        phone = f"+1415555{index:04d}"
        rig.fake.callees[phone] = CalleeScript("answer")
        _, reminder_id = await book(db, phone=phone)
        call_ids.append((await placed(rig, reminder_id, phone=phone))[1])
    return call_ids


async def test_the_sweep_greets_a_burst_of_owed_calls_side_by_side(db: Database) -> None:
    """Decision 0223: many calls answered at once whose detection results are all lost are owed
    their greetings in the same round. Greeted one provider round trip after another, the last
    were greeted after their persons had hung up; the sweep sends `concurrency` at a time, and each
    call still hears its message once."""
    rig = _detection_lost(db)
    in_flight, peak, all_in = 0, 0, asyncio.Event()
    real = rig.provider.greet

    async def greet(call_id, words, *, stamp):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight == 3:
            all_in.set()
        try:  # held until the sweep has three in flight (one after another, never: the wait runs out)
            await asyncio.wait_for(all_in.wait(), 3)
        except TimeoutError:
            pass
        in_flight -= 1
        return await real(call_id, words, stamp=stamp)

    rig.provider.greet = greet  # type: ignore[method-assign]
    try:
        call_ids = await _answered(db, rig, 6)
        sweep = CallSweep(db, rig.provider, fallback=fallback_wording(TEMPLATES), times=times(greet_after=0.1),
                          concurrency=3)
        await eventually(lambda: _owed(sweep, len(call_ids)))  # bound, answered, live, none greeted
        await sweep.once(token=1)
        assert peak == 3
        for call_id in call_ids:
            await eventually(lambda call_id=call_id: _true(heard_message(rig.call(call_id)) == 1))
            assert len(greetings(rig.call(call_id))) == 1
    finally:
        await rig.aclose()


async def test_a_greeting_that_fails_in_the_sweep_does_not_hold_back_the_others(db: Database) -> None:
    """The first greeting the sweep sends fails (a provider outage on that request), whichever call
    it is: the round's other owed calls are greeted all the same, the failure is raised once they
    are (the dispatcher logs it), and the failed one, recorded before its send, is sent again by
    the next round — heard once. One row after another, the rows after the failure waited."""
    rig = _detection_lost(db)
    real, failed = rig.provider.greet, []

    async def greet(call_id, words, *, stamp):
        if not failed:
            failed.append(call_id)
            raise OSError("connection reset")
        return await real(call_id, words, stamp=stamp)

    rig.provider.greet = greet  # type: ignore[method-assign]
    try:
        calls_placed = await _answered(db, rig, 3)
        sweep = CallSweep(db, rig.provider, fallback=fallback_wording(TEMPLATES),
                          times=times(greet_after=0.1, resend_every=0.1))
        await eventually(lambda: _owed(sweep, len(calls_placed)))
        with pytest.raises(OSError, match="connection reset"):
            await sweep.once(token=1)
        (first,) = failed
        for call_id in set(calls_placed) - {first}:
            await eventually(lambda call_id=call_id: _true(heard_message(rig.call(call_id)) == 1))

        async def resent() -> bool:
            await sweep.once(token=1)
            return heard_message(rig.call(first)) == 1

        await eventually(resent)
        assert [len(greetings(rig.call(call_id))) for call_id in calls_placed] == [1, 1, 1]
    finally:
        await rig.aclose()


async def test_a_sweep_step_that_fails_does_not_hold_back_the_greetings(db: Database) -> None:
    """Ending a superseded call fails on every round (its provider request always errs): the
    round's greetings owed are still sent, and the failure is raised after them."""
    rig = _detection_lost(db)
    rig.fake.callees[PHONE] = CalleeScript("answer")

    async def cancel(call_id):
        raise ValueError("an unusable call id")

    try:
        _, reminder_id = await book(db)
        _, call_id = await placed(rig, reminder_id)
        sweep = CallSweep(db, rig.provider, fallback=fallback_wording(TEMPLATES), times=times(greet_after=0.1))

        async def stuck_row() -> list:
            return [type("Row", (), {"id": "attempt-x", "provider_call_id": "v3:unusable"})()]

        sweep.store.calls_to_end = stuck_row  # type: ignore[method-assign]
        rig.provider.cancel = cancel  # type: ignore[method-assign]
        await eventually(lambda: _owed(sweep, 1))
        with pytest.raises(ValueError, match="unusable"):
            await sweep.once(token=1)
        await eventually(lambda: _true(heard_message(rig.call(call_id)) == 1))
    finally:
        await rig.aclose()


async def _owed(sweep: CallSweep, count: int) -> bool:
    return len(await sweep.store.greetings_owed()) == count


@pytest.mark.parametrize(("overrides", "message"), [
    ({"resend_within": 55.0}, "dedupe window"),
    ({"greet_after": 35.0, "beep_wait": 35.0}, "shorter than beep_wait"),
])
def test_sweep_times_that_break_the_greeting_protocol_are_refused(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        times(**overrides)


class _Ahead:
    """`datetime` of a process whose clock is `skew` ahead."""

    def __init__(self, skew: timedelta) -> None:
        self.skew = skew

    def now(self, tz=None):
        return datetime.now(tz) + self.skew

    def __getattr__(self, name: str):
        return getattr(datetime, name)


async def test_hole_7_a_leader_whose_clock_is_ten_seconds_ahead_does_not_greet_early(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hole 7: with machine detection the bound call waits for its result; a leader 10 s ahead
    compared the webhook's timestamps with its own clock and greeted at once — then the result
    greeted again. On the database's clock it waits, and the call is greeted once."""
    for module in (dispatcher_module, claims_module):
        monkeypatch.setattr(module, "datetime", _Ahead(timedelta(seconds=10)))
    rig = make_rig(db, "telnyx", machine_detection=True, speak_ms=2000.0)  # still speaking when the result comes
    rig.fake.controls.detection_ms = 600.0
    rig.fake.callees[PHONE] = CalleeScript("answer", digits="1")
    try:
        _, reminder_id = await book(db)
        dispatcher = Dispatcher(db, rig.provider, config(sweep_interval=0.05, reconcile_grace=timedelta(seconds=5)))
        term = FakeTerm(1)
        task = asyncio.create_task(dispatcher.lead(term))
        try:
            await eventually(lambda: _true(len(rig.calls()) == 1 and rig.is_over(rig.calls()[0])))
        finally:
            term.ended.set()
            await asyncio.wait_for(task, 10)
        (call,) = rig.calls()
        assert len(greetings(call)) == 1 and heard_message(call) == 1
        assert (await row(db, reminder_id)).outcome == "answered"
    finally:
        await rig.aclose()


# -- 2: a greeting whose answer was lost --------------------------------------------------------------


async def test_hole_2_a_greeting_run_by_telnyx_whose_answer_was_lost_is_never_spoken_again(db: Database) -> None:
    """Hole 2: Telnyx runs the greeting, its answer never arrives; the callee hangs up without a
    key. The greeting was recorded as commanded before it was sent, so the ended call is counted
    heard, never released for a second call that would speak again."""
    rig = make_rig(db, "telnyx")
    rig.fake.controls.answer_lost_rate, rig.fake.controls.answer_lost_commands = 1.0, ["gather_using_speak"]
    rig.fake.controls.answer_lost_mode = "drop"
    rig.fake.callees[PHONE] = CalleeScript("answer")  # presses nothing, then hangs up
    rig.fake.controls.patience_ms = 1500.0  # silence before the greeting: seconds under load
    try:
        _, reminder_id = await book(db)
        dispatcher = Dispatcher(db, rig.provider, config(
            sweep_interval=0.05, sweep_times=times(release_after=0.2, resend_within=40, resend_every=0.2)))
        term = FakeTerm(1)
        task = asyncio.create_task(dispatcher.lead(term))
        try:
            async def settled() -> bool:
                return (await row(db, reminder_id)).outcome is not None and all(map(rig.is_over, rig.calls()))

            await eventually(settled)
            await asyncio.sleep(0.5)  # the sweep has had rounds to release it, were it to
        finally:
            term.ended.set()
            await asyncio.wait_for(task, 10)
        assert len(rig.calls()) == 1 and heard_message(rig.calls()[0]) == 1
        assert (await row(db, reminder_id)).outcome == "answered"
    finally:
        await rig.aclose()


# -- 3: a re-plan supersedes the old plan's calls -----------------------------------------------------


async def test_hole_3_a_replan_leaves_the_old_plans_ringing_call_nothing_to_say(db: Database) -> None:
    """Hole 3: a PATCH moving the appointment supersedes the `sent` reminder whose call still rings:
    answered later, that call is hung up without a word; it is not retried; the new plan's
    reminder keeps the call owed."""
    rig = make_rig(db, "twilio", ring_ms=60_000)
    try:
        appointment_id, reminder_id = await book(db)
        _, call_id = await placed(rig, reminder_id)
        await appointments.change(db, appointment_id, {"starts_at": datetime.now(UTC) + timedelta(days=2)}, PLANNING)
        old = await row(db, reminder_id)
        assert (old.status, old.skip_reason) == ("cancelled", "re-planned")
        view = await appointments.read(db, appointment_id)
        owed = [r for r in view["reminders"] if r["status"] == "pending"]
        assert owed and min(r["due_at"] for r in owed) <= datetime.now(UTC) + timedelta(seconds=5)  # kept, now
        async with rig.client() as client:  # the old call is answered after the PATCH
            path, form, headers = rig.signed_post("voice", {"r": reminder_id, "a": (await _attempt(db, reminder_id))},
                                                  {"CallSid": call_id, "AnsweredBy": "human"})
            answer = await client.post(path, data=form, headers=headers)
        assert answer.text.endswith("<Response><Hangup /></Response>")
        assert (await row(db, reminder_id)).bound_call_id is None
    finally:
        await rig.aclose()


async def _attempt(db: Database, reminder_id: str) -> str:
    async with db.session() as session:
        found = await session.execute(select(CallAttempt.id).where(CallAttempt.reminder_id == reminder_id))
        return found.scalar_one()


async def test_hole_3_6_the_old_plans_bound_call_takes_no_digits_after_a_replan(db: Database) -> None:
    """Holes 3 and 6: the old plan's bound call presses 1 (or a captured keypad request is
    replayed) after a PATCH cleared the confirmation: the new time stays unconfirmed."""
    rig = make_rig(db, "twilio")
    try:
        appointment_id, reminder_id = await book(db)
        attempt_id, call_id = await placed(rig, reminder_id)
        stamp = {"r": reminder_id, "a": attempt_id}
        async with rig.client() as client:
            path, form, headers = rig.signed_post("voice", stamp, {"CallSid": call_id, "AnsweredBy": "human"})
            assert "<Gather" in (await client.post(path, data=form, headers=headers)).text  # bound, asked
            await appointments.change(db, appointment_id, {"starts_at": datetime.now(UTC) + timedelta(days=2)},
                                      PLANNING)
            path, form, headers = rig.signed_post("gather", {**stamp, "n": "1"}, {"CallSid": call_id, "Digits": "1"})
            assert (await client.post(path, data=form, headers=headers)).text.endswith("<Hangup /></Response>")
        assert await confirmation(db, appointment_id) is None
    finally:
        await rig.aclose()


async def test_hole_6_a_keypad_round_is_taken_once(db: Database) -> None:
    """Hole 6: round 1's 2 (decline) replayed after the customer's 1 in round 1 changes nothing."""
    rig = make_rig(db, "twilio")
    try:
        appointment_id, reminder_id = await book(db)
        attempt_id, call_id = await placed(rig, reminder_id)
        stamp = {"r": reminder_id, "a": attempt_id}
        async with rig.client() as client:
            path, form, headers = rig.signed_post("voice", stamp, {"CallSid": call_id, "AnsweredBy": "human"})
            await client.post(path, data=form, headers=headers)
            for digits in ("1", "2"):
                path, form, headers = rig.signed_post("gather", {**stamp, "n": "1"},
                                                      {"CallSid": call_id, "Digits": digits})
                await client.post(path, data=form, headers=headers)
        assert await confirmation(db, appointment_id) == "confirmed"
        async with db.session() as session:
            status = (await session.execute(select(Appointment.status)
                                            .where(Appointment.id == appointment_id))).scalar_one()
        assert status == "scheduled"
    finally:
        await rig.aclose()


async def test_hole_6_a_telnyx_answer_redelivered_after_60_s_greets_nothing_again(db: Database) -> None:
    """Hole 6: Telnyx delivers `call.answered` again after its 60 s dedupe window (scaled here)
    while the call is live: the greeting was recorded, nothing is sent again."""
    rig = make_rig(db, "telnyx", speak_ms=1500.0)
    rig.fake.controls.time_scale = 0.01  # Telnyx's 60 s command_id window: 0.6 s …
    rig.fake._webhook_timeout = 200.0  # … but its 2 s webhook timeout kept (not 20 ms)
    rig.fake.controls.event_redeliver_rate, rig.fake.controls.event_redeliver_ms = 1.0, 800.0
    rig.fake.controls.event_redeliver_types = ["call.answered"]
    rig.fake.callees[PHONE] = CalleeScript("answer", digits="1")
    try:
        _, reminder_id = await book(db)
        _, call_id = await placed(rig, reminder_id)
        call = rig.call(call_id)
        await eventually(lambda: _true(any(d.get("redelivery") for d in call.deliveries)))
        await eventually(rig.over(call_id))
        assert len(greetings(call)) == 1 and heard_message(call) == 1
    finally:
        await rig.aclose()


# -- 4: machine detection waits for the beep ----------------------------------------------------------


@pytest.mark.parametrize("provider", ["twilio", "telnyx"])
async def test_hole_4_the_voicemail_is_left_after_the_beep(db: Database, provider: str) -> None:
    """Hole 4: the voicemail was spoken over the machine's greeting (Twilio `machine_start`,
    Telnyx `detect`): the machine kept nothing. Now after the beep: kept whole."""
    rig = make_rig(db, provider, machine_detection=True)
    rig.fake.callees[PHONE] = CalleeScript("machine", greeting_ms=400.0)
    try:
        _, reminder_id = await book(db)
        _, call_id = await placed(rig, reminder_id)
        await eventually(rig.over(call_id))
        call = rig.call(call_id)
        assert call.listener.voicemail and not call.listener.lost, (call.listener.voicemail, call.listener.lost)
        assert (await row(db, reminder_id)).outcome == "voicemail"
    finally:
        await rig.aclose()


async def test_a_beep_event_that_comes_before_the_answer_binds_the_machine_and_leaves_the_voicemail(
        db: Database) -> None:
    """Found by late-events (Telnyx): `call.answered` and the detection both later than the beep's
    `call.machine.greeting.ended`, which found the call unbound and hung it up — the machine kept
    nothing, and each call again met the same race. The beep event binds the call as a machine's
    now; the late answer and detection after it greet nothing again."""
    rig = make_rig(db, "telnyx", machine_detection=True)
    rig.fake.controls.event_delay_ms, rig.fake.controls.event_delay_max_ms = 1_000.0, 1_500.0
    rig.fake.controls.event_delay_types = ["call.answered", "call.machine.detection.ended"]
    rig.fake.callees[PHONE] = CalleeScript("machine", greeting_ms=200.0)
    try:
        _, reminder_id = await book(db)
        _, call_id = await placed(rig, reminder_id)
        call = rig.call(call_id)

        async def late_events_applied() -> bool:
            late = [d for d in call.deliveries if d.get("type") in rig.fake.controls.event_delay_types
                    and d.get("result") == "acknowledged"]
            return rig.is_over(call) and len(late) >= 2

        await eventually(late_events_applied)
        assert call.listener.voicemail and not call.listener.lost, (call.listener.voicemail, call.listener.lost)
        assert len(greetings(call)) == 1
        await eventually(lambda: _outcome_is(db, reminder_id, "voicemail"))
        assert len(rig.calls()) == 1
        done = await row(db, reminder_id)
        assert (done.outcome, done.bound_call_id) == ("voicemail", call_id)
    finally:
        await rig.aclose()


@pytest.mark.parametrize("provider", ["twilio"])
async def test_hole_4_a_fax_is_not_a_voicemail(db: Database, provider: str) -> None:
    rig = make_rig(db, provider, machine_detection=True)
    rig.fake.callees[PHONE] = CalleeScript("fax")
    try:
        _, reminder_id = await book(db)
        _, call_id = await placed(rig, reminder_id)
        await eventually(rig.over(call_id))
        await eventually(lambda: _outcome_is(db, reminder_id, "failed"))
        assert rig.call(call_id).heard == []
    finally:
        await rig.aclose()


async def _outcome_is(db: Database, reminder_id: str, outcome: str) -> bool:
    return (await row(db, reminder_id)).outcome == outcome


# -- 5: every hang-up cause ----------------------------------------------------------------------------


async def test_hole_5_telnyx_no_answer_is_retried_as_no_answer(db: Database) -> None:
    """Hole 5: `hangup_cause: no_answer` read as `completed` made the outcome `failed`, never
    retried; it is a no-answer, retried while NO_ANSWER_RETRIES last."""
    rig = make_rig(db, "telnyx", no_answer=NoAnswerPolicy(retries=1, delay=timedelta(minutes=10)))
    rig.fake.callees[PHONE] = CalleeScript("no-answer", hangup_cause="no_answer")
    try:
        _, reminder_id = await book(db)
        _, call_id = await placed(rig, reminder_id)
        await eventually(rig.over(call_id))
        await eventually(lambda: _outcome_is(db, reminder_id, "no_answer"))
        assert (await row(db, reminder_id)).status == "pending"  # called again in 10 minutes
    finally:
        await rig.aclose()


# -- 8: the smaller holes ------------------------------------------------------------------------------


def _stamped(rig: Rig, provider=None) -> StampedCalls:
    return StampedCalls(rig.db, provider or rig.provider, StampedConfig(
        caller_id=FROM, reconcile_grace=timedelta(seconds=1), max_attempts=5, retry_delay=lambda n, after: 1.0))


async def test_hole_8_a_dispatching_reminder_places_no_call_after_delete(db: Database) -> None:
    """Hole 8: claimed (`dispatching`), then the appointment is deleted before the create: no call."""
    rig = make_rig(db, "twilio")
    try:
        appointment_id, reminder_id = await book(db)
        store = ReminderStore(db)
        await store.raise_fence(3, "leader")
        (claim,) = await store.claim(3, "leader", limit=5, stale_after=timedelta(minutes=2))
        await appointments.cancel(db, appointment_id)
        finished: list[Outcome] = []

        async def finish(_claim, outcome: Outcome) -> None:
            finished.append(outcome)

        result = await _stamped(rig).handle(claim, token=3, may_send=lambda: True, now=lambda: datetime.now(UTC),
                                            finish=finish)
        assert result is None and rig.fake.calls == {}
        assert (await row(db, reminder_id)).status == "cancelled"
    finally:
        await rig.aclose()


async def test_hole_8_a_call_shown_to_exist_while_reconciling_holds_back_a_new_attempt(db: Database) -> None:
    """Hole 8: the reconciliation decided the attempt in doubt made no call, and a webhook proved
    the call meanwhile: `abandon` marks nothing, and no new attempt is made."""
    rig = make_rig(db, "twilio")
    try:
        _, reminder_id = await book(db)
        store = ReminderStore(db)
        await store.raise_fence(4, "leader")
        (claim,) = await store.claim(4, "leader", limit=5, stale_after=timedelta(minutes=2))
        attempts = AttemptStore(db)
        doubtful = await attempts.begin(4, reminder_id)
        long_ago = datetime.now(UTC) - timedelta(hours=1)
        stale_view = [AttemptView(doubtful, "in_doubt", long_ago, None, None)]  # what the leader read

        async def view(_reminder_id: str):
            async with db.session() as session:  # the webhook that proves the call, just after that read
                await session.execute(update(CallAttempt).where(CallAttempt.id == doubtful)
                                      .values(last_event_at=datetime.now(UTC), provider_call_id="CA" + "1" * 32))
                await session.commit()
            return None, stale_view, datetime.now(UTC)

        stamped = _stamped(rig)
        stamped.store.view = view  # type: ignore[method-assign]
        finished: list[Outcome] = []

        async def finish(_claim, outcome: Outcome) -> None:
            finished.append(outcome)

        result = await stamped.handle(claim, token=4, may_send=lambda: True, now=lambda: datetime.now(UTC),
                                      finish=finish)
        assert result is None and rig.fake.calls == {} and finished[-1].status == "pending"
    finally:
        await rig.aclose()


def test_hole_8_no_answer_retries_must_leave_attempts() -> None:
    """Hole 8: NO_ANSWER_RETRIES not below DISPATCH_MAX_ATTEMPTS let a reminder end `failed` with the
    outcome `no_answer`: refused at start."""
    with pytest.raises(SettingError, match="NO_ANSWER_RETRIES"):
        check(Settings(no_answer_retries=5, dispatch_max_attempts=5))
    check(Settings(no_answer_retries=4, dispatch_max_attempts=5))


async def test_hole_8_a_late_call_binds_no_failed_reminder(db: Database) -> None:
    """Hole 8: an attempt in doubt's call answered after its reminder `failed` binds nothing."""
    rig = make_rig(db, "twilio")
    try:
        _, reminder_id = await book(db)
        attempt_id, call_id = await placed(rig, reminder_id)
        async with db.session() as session:
            await session.execute(update(Reminder).where(Reminder.id == reminder_id).values(status="failed"))
            await session.commit()
        async with rig.client() as client:
            path, form, headers = rig.signed_post("voice", {"r": reminder_id, "a": attempt_id},
                                                  {"CallSid": call_id, "AnsweredBy": "human"})
            assert (await client.post(path, data=form, headers=headers)).text.endswith("<Hangup /></Response>")
        assert (await row(db, reminder_id)).bound_call_id is None
    finally:
        await rig.aclose()


# -- 9: the stated limits closed ------------------------------------------------------------------------


async def test_hole_9_twilio_asks_the_fallback_url_when_the_voice_request_fails(db: Database) -> None:
    """Hole 9: the replica answering the voice request fails (its database, here); Twilio asks the
    FallbackUrl — another replica — which binds the call and speaks, once."""
    rig = make_rig(db, "twilio")
    rig.app.state.voice_database_budget = 0.3
    try:
        _, reminder_id = await book(db)
        rig.app.state.db = AnswersFailFor(db, failures=2)  # the first voice request's tries all fail
        _, call_id = await placed(rig, reminder_id)
        await eventually(rig.over(call_id))
        call = rig.call(call_id)
        assert call.errors and heard_message(call) == 1  # the fallback spoke
        assert (await row(db, reminder_id)).bound_call_id == call_id
    finally:
        await rig.aclose()


async def test_hole_9_a_database_down_past_the_fallback_holds_the_call_until_it_speaks(db: Database) -> None:
    """Found by postgres-restart (Twilio): the database failed through the first voice request and
    its fallback; the fallback hung up — a person who answered heard nothing. Now the fallback holds
    the call (a second of silence, then the voice URL again) until the database answers."""
    rig = make_rig(db, "twilio")
    rig.app.state.voice_database_budget = 0.3
    try:
        _, reminder_id = await book(db)
        failing = AnswersFailFor(db, failures=10_000)
        rig.app.state.db = failing
        _, call_id = await placed(rig, reminder_id)
        call = rig.call(call_id)
        await eventually(lambda: _true(any(d.get("type") == "redirect" for d in call.deliveries)))
        failing.failures = 0  # the database is back while the call is held
        await eventually(rig.over(call_id))
        assert heard_message(call) == 1 and (await row(db, reminder_id)).bound_call_id == call_id
    finally:
        await rig.aclose()


async def test_hole_9_telnyx_events_are_acknowledged_and_a_lost_greeting_is_still_heard(db: Database) -> None:
    """Hole 9: a greeting Telnyx never received was answered 503 so that Telnyx would deliver the
    event again — it does not (a non-2xx goes to the failover URL). Now the event is acknowledged
    and the leader's sweep sends the one greeting command again: heard once."""
    rig = make_rig(db, "telnyx")
    real = rig.provider.greet
    lost = {"left": 1}

    async def greet(*args, **kwargs):
        if lost["left"]:
            lost["left"] -= 1
            return None  # never reached Telnyx; the answer is unknown
        return await real(*args, **kwargs)

    rig.provider.greet = greet  # type: ignore[method-assign]
    rig.fake.callees[PHONE] = CalleeScript("answer", digits="1")
    try:
        _, reminder_id = await book(db)
        _, call_id = await placed(rig, reminder_id)
        call = rig.call(call_id)
        await eventually(lambda: _true(lost["left"] == 0))
        tried = [d for d in call.deliveries if d.get("attempt", 0) >= 1]
        assert not [d for d in tried if d.get("status") is not None and d["status"] >= 300]  # no 503: acknowledged
        assert {d["type"] for d in tried if d.get("result") == "acknowledged"} >= {"call.initiated", "call.answered"}
        sweep = CallSweep(db, rig.provider, fallback=fallback_wording(TEMPLATES), times=times(resend_every=0.1))

        async def heard() -> bool:
            await sweep.once(token=1)
            return heard_message(call) == 1

        await eventually(heard)
        await eventually(rig.over(call_id))
        assert heard_message(call) == 1
    finally:
        await rig.aclose()


async def test_hole_9_a_call_whose_final_event_never_came_is_asked_of_the_provider(db: Database) -> None:
    """Hole 9: the final status event is lost; the leader asks Twilio for the call's state and
    records the outcome."""
    rig = make_rig(db, "twilio", no_answer=NoAnswerPolicy(retries=0))
    rig.fake.controls.event_loss_rate, rig.fake.controls.event_loss_types = 1.0, ["final"]
    rig.fake.callees[PHONE] = CalleeScript("busy")
    try:
        _, reminder_id = await book(db)
        attempt_id, call_id = await placed(rig, reminder_id)
        await eventually(rig.over(call_id))
        assert (await row(db, reminder_id)).outcome is None
        sweep = CallSweep(db, rig.provider, fallback=fallback_wording(TEMPLATES))

        async def asked_after_a_quarter_hour_of_silence() -> bool:
            # a non-final event still on its way may stamp last_event_at after the first backdating
            async with db.session() as session:
                await session.execute(update(CallAttempt).where(CallAttempt.id == attempt_id)
                                      .values(last_event_at=datetime.now(UTC) - timedelta(minutes=20)))
                await session.commit()
            await sweep.once(token=1)
            return (await row(db, reminder_id)).outcome == "busy"

        await eventually(asked_after_a_quarter_hour_of_silence)
    finally:
        await rig.aclose()


# -- 10: a PATCH that changes nothing ------------------------------------------------------------------


async def test_hole_10_a_patch_that_changes_nothing_replans_nothing(db: Database) -> None:
    """Hole 10: the same name sent again cancelled a reminder in transient retry (its time had
    passed) and the new plan dropped it: never called. Now nothing is re-planned."""
    appointment_id, reminder_id = await book(db, due_in=timedelta(minutes=-3))
    view = await appointments.change(db, appointment_id, {"customer_name": "Ann Example"}, PLANNING)
    assert [(r["id"], r["status"]) for r in view["reminders"]] == [(reminder_id, "pending")]
    assert (await row(db, reminder_id)).status == "pending"


async def test_hole_10_a_replan_keeps_a_call_that_was_owed(db: Database) -> None:
    """Hole 10: a real change re-plans; the reminder whose time had come is owed a call, which the
    new plan keeps, due now."""
    appointment_id, reminder_id = await book(db, due_in=timedelta(minutes=-3))
    before = time.time()
    view = await appointments.change(db, appointment_id, {"customer_name": "Ann Other"}, PLANNING)
    pending = [r for r in view["reminders"] if r["status"] == "pending"]
    assert pending and min(r["due_at"].timestamp() for r in pending) <= time.time() + 1
    assert min(r["due_at"].timestamp() for r in pending) >= before - 1
    assert reminder_id not in {r["id"] for r in pending}  # superseded (and, never claimed, pruned)


async def _remind_at_passed(db: Database, appointment_id: str) -> None:
    """The appointment's stored `remind_at` is in the past too: a new plan has no time left for it."""
    async with db.session() as session:
        await session.execute(update(Appointment).where(Appointment.id == appointment_id).values(
            remind_at=[(datetime.now(UTC) - timedelta(minutes=3)).isoformat()]))
        await session.commit()


@pytest.mark.parametrize("name", ["Ann Example", "Ann Other"])
async def test_hole_10_a_reminder_whose_time_passed_is_still_called_after_any_patch(db: Database, name: str) -> None:
    """Hole 10 as the issue found it: the reminder's time (and the stored `remind_at`) had passed,
    it waited in a transient retry; a PATCH of the same name (no change) or another name (a
    re-plan) must leave it a call: pending and due, never dropped as "already passed"."""
    appointment_id, reminder_id = await book(db, due_in=timedelta(minutes=-3))
    await _remind_at_passed(db, appointment_id)
    view = await appointments.change(db, appointment_id, {"customer_name": name}, PLANNING)
    pending = [r for r in view["reminders"] if r["status"] == "pending"]
    assert pending and min(r["due_at"].timestamp() for r in pending) <= time.time() + 1, view["reminders"]


# -- 11: SignalWire --------------------------------------------------------------------------------------


async def test_hole_11_signalwire_webhooks_with_uuid_sids_and_the_signing_key_are_answered(db: Database) -> None:
    """Hole 11: SignalWire's call SIDs are UUIDs and its webhooks are signed with the project's
    signing key in X-SignalWire-Signature: the bound call speaks."""
    rig = make_rig(db, "twilio")
    key = "PSK_projectsigningkey"
    rig.app.state.twilio_signature = TwilioSignature(key, PUBLIC)
    try:
        _, reminder_id = await book(db)
        store = ReminderStore(db)
        await store.raise_fence(1, "leader")
        await store.claim(1, "leader", limit=5, stale_after=timedelta(minutes=2))
        attempt_id = await AttemptStore(db).begin(1, reminder_id)
        sid = "b3877c40-da60-4998-90ad-b792e98472ca"  # SignalWire's documented call SID shape
        path = f"/telephony/twilio/voice?r={reminder_id}&a={attempt_id}"
        form = {"CallSid": sid, "AnsweredBy": "human"}
        headers = {"X-SignalWire-Signature": TwilioSignature(key, PUBLIC).sign(PUBLIC + path, form)}
        async with rig.client() as client:
            answer = await client.post(path, data=form, headers=headers)
        assert "<Gather" in answer.text and (await row(db, reminder_id)).bound_call_id == sid
    finally:
        await rig.aclose()


def test_hole_11_signalwire_mode_sends_no_twilio_connection_overrides() -> None:
    from service.providers.twilio import PACKAGE

    spec = CallSpec(to=PHONE, from_=FROM, reminder_id="r-1", appointment_id="a", attempt_id="a-1")
    twilio = PACKAGE.build(Settings(telephony_provider="twilio", public_url="https://x.test", twilio_account_sid="AC1",
                                    twilio_auth_token="t"))
    signalwire = PACKAGE.build(Settings(telephony_provider="twilio", public_url="https://x.test",
                                        twilio_account_sid="b3877c40-da60", twilio_auth_token="t",
                                        signalwire_signing_key="PSK_x"))
    assert any("#" in value for _, value in twilio.create_form(spec))
    assert not any("#" in value for _, value in signalwire.create_form(spec))
    assert ("FallbackUrl", signalwire.webhook_url("voice", Stamp("r-1", "a-1").query())) in signalwire.create_form(spec)


# -- 12: what the chaos runs found (harness/chaos_providers.py, RELIABILITY.md) ---------------------------


async def _in_doubt(rig: Rig, reminder_id: str, *, token: int = 1) -> tuple[str, str]:
    """Claimed, its attempt recorded, its call created at the fake but the create's answer lost
    (a timeout): the attempt in doubt and the reminder `pending` for its reconciliation, as the
    dispatcher leaves it. (attempt id, call id)."""
    store = ReminderStore(rig.db)
    await store.raise_fence(token, "leader")
    await store.claim(token, "leader", limit=50, stale_after=timedelta(minutes=2))
    attempts = AttemptStore(rig.db)
    attempt_id = await attempts.begin(token, reminder_id)
    assert attempt_id is not None
    call_id = await rig.place(reminder_id, attempt_id, record=False)
    await attempts.settle(attempt_id, AttemptState.IN_DOUBT, error="timeout: TimeoutError")
    retry = Outcome.retry(datetime.now(UTC), "timeout: TimeoutError", attempts=1)
    assert await store.finish_many(token, [(reminder_id, retry)]) == {}
    return attempt_id, call_id


@pytest.mark.parametrize("then", ["confirms", "opts out", "a cap counts the call"])
async def test_chaos_a_call_heard_while_its_create_was_in_doubt_is_sent_not_skipped(db: Database, then: str) -> None:
    """Found by provider-outage and lost-answers (Twilio): the create's answer was lost, the call
    was made; the callee heard the message and pressed 1 (or 9), or a cap per number counted that
    very call. The keypad skipped the reminder itself ("confirmed", "opted out": it was still
    `pending`, its attempt in doubt), or the next claim held it back (the cap), though its message
    was heard. Now a reminder bound to a call that spoke is finished — the keypad skips only the
    others —, and the leader reconciles a claimed reminder before anything may hold it back from
    a new call: `sent`, one call."""
    rig = make_rig(db, "twilio")
    rig.fake.callees[PHONE] = CalleeScript("answer", digits={"confirms": "1", "opts out": "9"}.get(then))
    try:
        appointment_id, reminder_id = await book(db)
        _, call_id = await _in_doubt(rig, reminder_id)
        await eventually(rig.over(call_id))
        assert (await row(db, reminder_id)).status == "pending"  # heard, bound: not skipped
        if then == "confirms":
            assert await confirmation(db, appointment_id) == "confirmed"
        dispatcher = Dispatcher(db, rig.provider, config(caps=CallCaps(per_day=1),
                                                         reconcile_grace=timedelta(seconds=30)))

        async def sent() -> bool:
            return (await row(db, reminder_id)).status != "pending"

        await lead_until(dispatcher, FakeTerm(2), sent)
        done = await row(db, reminder_id)
        assert (done.status, done.outcome, done.skip_reason, done.bound_call_id) == ("sent", "answered", None, call_id)
        assert len(rig.calls()) == 1 and heard_message(rig.calls()[0]) == 1
    finally:
        await rig.aclose()


async def test_chaos_a_replan_between_the_answer_and_the_greeting_calls_the_new_plan(db: Database) -> None:
    """Found by replan-while-ringing (Telnyx): a PATCH landed after `call.answered` bound the old
    plan's reminder and before its greeting (the machine detection still to come). Bound, it was
    taken as finished: not superseded, owed no call; its greeting was then refused (not current)
    and nobody heard either plan. Now a bound call that has said nothing leaves its reminder
    unfinished: superseded, its call hung up without a word, and the new plan calls now."""
    rig = make_rig(db, "telnyx", machine_detection=True)
    rig.fake.controls.detection_ms = 60_000.0  # the detection result is far away
    rig.fake.callees[PHONE] = CalleeScript("answer")
    try:
        appointment_id, reminder_id = await book(db)
        _, call_id = await placed(rig, reminder_id)
        await eventually(lambda: _bound(db, reminder_id))
        view = await appointments.change(db, appointment_id, {"starts_at": datetime.now(UTC) + timedelta(days=2)},
                                         PLANNING)
        old = await row(db, reminder_id)
        assert (old.status, old.skip_reason) == ("cancelled", "re-planned")
        owed = [r for r in view["reminders"] if r["status"] == "pending"]
        assert owed and min(r["due_at"] for r in owed) <= datetime.now(UTC) + timedelta(seconds=5)
        sweep = CallSweep(db, rig.provider, fallback=fallback_wording(TEMPLATES), times=times(greet_after=0.1))
        await sweep.once(token=1)  # the greeting it was owed: refused, the call hung up
        await eventually(rig.over(call_id))
        assert rig.call(call_id).heard == [] and not greetings(rig.call(call_id))
    finally:
        await rig.aclose()


async def _bound(db: Database, reminder_id: str) -> bool:
    return (await row(db, reminder_id)).bound_call_id is not None


def _answers_unheard(db: Database, *, patience_ms: float) -> Rig:
    """Telnyx with machine detection, a person who answers and hangs up after `patience_ms` of
    silence, and every event of the answer (`call.answered`, the detection) lost."""
    rig = make_rig(db, "telnyx", machine_detection=True)
    rig.fake.controls.event_loss_rate = 1.0
    rig.fake.controls.event_loss_types = ["call.answered", "call.machine.detection.ended"]
    rig.fake.controls.patience_ms = patience_ms
    rig.fake.callees[PHONE] = CalleeScript("answer")
    return rig


async def test_chaos_an_answered_call_whose_answer_events_are_all_lost_is_called_again(db: Database) -> None:
    """Found by lost-events and late-events (Telnyx): `call.answered` and the machine detection of a
    call both lost (or later than the callee waits in silence): nothing bound the call, the person
    heard silence and hung up, and `call.hangup` (`normal_clearing`) ended the reminder `failed`,
    never called again — a miss. Now an answered call that ended unbound, unheard, is called again
    at once, and the next call is heard once."""
    rig = _answers_unheard(db, patience_ms=300.0)
    try:
        _, reminder_id = await book(db)
        attempt_id, call_id = await placed(rig, reminder_id)
        await eventually(rig.over(call_id))

        async def ended() -> bool:  # the hang-up event applied
            return (await row(db, reminder_id)).status == "pending"

        await eventually(ended)
        first = await row(db, reminder_id)
        assert (first.status, first.outcome, first.bound_call_id) == ("pending", None, None)
        async with db.session() as session:
            error = (await session.execute(select(CallAttempt.error).where(CallAttempt.id == attempt_id))).scalar_one()
        assert error == ANSWERED_UNHEARD
        # the next call's events come, and its person waits as people do (300 ms against the
        # detection, its event and the greeting's command lost a second call under load)
        rig.fake.controls.event_loss_rate, rig.fake.controls.patience_ms = 0.0, 10_000.0
        dispatcher = Dispatcher(db, rig.provider, config(sweep_interval=0.05))

        async def heard() -> bool:
            return (await row(db, reminder_id)).outcome is not None and all(map(rig.is_over, rig.calls()))

        await lead_until(dispatcher, FakeTerm(2), heard)
        assert [heard_message(call) for call in rig.calls()] == [0, 1]
        assert (await row(db, reminder_id)).outcome == "answered"
    finally:
        await rig.aclose()


async def test_chaos_a_fax_hung_up_unbound_is_not_called_again(db: Database) -> None:
    """The other side of the rule above: a call that ended unbound because a fax answered (Twilio's
    `AnsweredBy=fax`: hung up, never bound) ends the reminder `failed`, not called again."""
    rig = make_rig(db, "twilio")
    rig.fake.callees[PHONE] = CalleeScript("fax")
    try:
        _, reminder_id = await book(db)
        _, call_id = await placed(rig, reminder_id)
        await eventually(rig.over(call_id))

        async def ended() -> bool:
            return (await row(db, reminder_id)).outcome is not None

        await eventually(ended)
        done = await row(db, reminder_id)
        assert (done.status, done.outcome, done.bound_call_id) == ("sent", "failed", None)
    finally:
        await rig.aclose()


async def test_chaos_an_answered_call_is_called_again_unheard_at_most_twice(db: Database) -> None:
    """A callee whose every answer ends before any event of it comes (lost each time) is not called
    over and over: after `UNHEARD_RECALLS` calls again, the reminder ends with the outcome `failed`."""
    rig = _answers_unheard(db, patience_ms=100.0)
    try:
        _, reminder_id = await book(db)
        dispatcher = Dispatcher(db, rig.provider, config(sweep_interval=0.05))

        async def done() -> bool:
            return (await row(db, reminder_id)).outcome is not None and all(map(rig.is_over, rig.calls()))

        await lead_until(dispatcher, FakeTerm(2), done)
        assert len(rig.calls()) == 1 + UNHEARD_RECALLS
        assert all(heard_message(call) == 0 for call in rig.calls())
        last = await row(db, reminder_id)
        assert (last.status, last.outcome) == ("sent", "failed")
    finally:
        await rig.aclose()


async def test_chaos_a_greeting_being_recorded_and_a_replan_exclude_each_other(db: Database) -> None:
    """The rule above, raced (PostgreSQL; SQLite has one writer): a greeting is being recorded for a
    bound call (its transaction open) when a PATCH re-plans. The PATCH waits for it, then sees the
    reminder heard and keeps it: never a superseded reminder whose greeting goes out."""
    if db.is_sqlite:
        pytest.skip("SQLite runs one writer at a time")
    rig = make_rig(db, "telnyx", ring_ms=60_000)
    try:
        appointment_id, reminder_id = await book(db)
        attempt_id, call_id = await placed(rig, reminder_id)
        stamp = Stamp(reminder_id, attempt_id)
        async with db.session() as session:  # answered: in progress, bound, no greeting yet
            await session.execute(update(CallAttempt).where(CallAttempt.id == attempt_id)
                                  .values(call_status="in-progress"))
            await session.commit()
        assert (await calls_module.answer(db, stamp, call_id, fallback=fallback_wording(TEMPLATES),
                                          heard_later=True)).speak
        async with db.engine.connect() as connection:
            await connection.begin()
            greeting = await connection.run_sync(calls_module._command_greeting, stamp, call_id, Answerer.PERSON,
                                                 fallback_wording(TEMPLATES))
            assert greeting.send
            replan = asyncio.create_task(appointments.change(
                db, appointment_id, {"starts_at": datetime.now(UTC) + timedelta(days=2)}, PLANNING))
            await asyncio.sleep(0.5)
            assert not replan.done()  # it waits for the greeting's transaction
            await connection.commit()
        await asyncio.wait_for(replan, 10)
        kept = await row(db, reminder_id)
        assert (kept.status, kept.bound_call_id) == ("sent", call_id)  # heard: finished, not superseded
    finally:
        await rig.aclose()


async def test_chaos_a_resent_greeting_refused_as_over_does_not_release_a_call_that_spoke(db: Database) -> None:
    """Found by etcd-partition (Telnyx) under load: the greeting ran, its answer was lost (and the
    events of the speech with it); the callee heard the message and hung up; the sweep's resend
    (same command) was answered "the call is over" (422 90018), recorded as "nothing spoken", and
    the call was released and made again: the message heard twice. A resend's "over" now leaves the
    first send's fate unknown: counted heard, one call."""
    rig = make_rig(db, "telnyx")
    rig.fake.controls.answer_lost_rate, rig.fake.controls.answer_lost_commands = 1.0, ["gather_using_speak"]
    rig.fake.controls.answer_lost_mode = "drop"
    rig.fake.callees[PHONE] = CalleeScript("answer")  # presses nothing, then hangs up
    rig.fake.controls.patience_ms = 1_000.0  # long enough for the greeting to come under load
    # the events that would tell of the speech are lost (they were late past every retry)
    rig.fake.controls.event_loss_rate = 1.0
    rig.fake.controls.event_loss_types = ["call.speak.started", "call.speak.ended", "call.gather.ended"]
    try:
        _, reminder_id = await book(db)
        _, call_id = await placed(rig, reminder_id)
        call = rig.call(call_id)
        # its hang-up event comes late: the service still takes the call for live when the sweep resends
        rig.fake.controls.event_delay_ms, rig.fake.controls.event_delay_types = 3_000.0, ["call.hangup"]
        rig.fake.controls.event_delay_rate = 1.0
        await eventually(lambda: _true(heard_message(call) == 1))  # the greeting ran; its answer is lost
        rig.fake.controls.answer_lost_rate = 0.0  # the resend's answer arrives: the call is over
        await eventually(lambda: _true(not call.alive))
        assert (await _attempt_row(db, reminder_id)).call_status != "completed"  # its hang-up not yet applied
        sweep = CallSweep(db, rig.provider, fallback=fallback_wording(TEMPLATES),
                          times=times(resend_every=0.0, release_after=0.0))
        await sweep.once(token=1)  # the resend, before the hang-up event
        assert any(c.get("result") == "ended" for c in call.command_log)  # answered "the call is over"

        async def hung_up() -> bool:
            return (await _attempt_row(db, reminder_id)).call_status == "completed"

        await eventually(hung_up)
        for _ in range(2):  # a release, were it to come
            await sweep.once(token=1)
        done = await row(db, reminder_id)
        assert (done.status, done.outcome, done.bound_call_id) == ("sent", "answered", call_id)
        assert len(rig.calls()) == 1 and heard_message(call) == 1
    finally:
        await rig.aclose()


async def _attempt_row(db: Database, reminder_id: str):
    async with db.session() as session:
        found = await session.execute(select(CallAttempt.__table__).where(CallAttempt.reminder_id == reminder_id))
        return found.one()


async def test_chaos_telnyx_events_are_acknowledged_before_their_commands_are_sent(db: Database) -> None:
    """Found by every Telnyx run at make chaos's size: the event handlers sent the greeting (and the
    question again, the last words, hangups) to Telnyx's API before answering the event; a command's
    round trip under load passed Telnyx's 2 s, so the event was delivered again, and again, each time
    costing the replicas more. The greeting is now recorded in the handler and its command sent
    once the event is acknowledged (a background task after the response)."""
    from fastapi import BackgroundTasks
    from starlette.requests import Request

    from service.providers.telnyx import webhooks
    from service.providers.telnyx.events import TelnyxEvent

    rig = make_rig(db, "telnyx", ring_ms=60_000)  # no machine detection: `call.answered` greets
    sent: list[str] = []
    real = rig.provider.greet

    async def greet(call_id, words, *, stamp):
        sent.append(call_id)
        return await real(call_id, words, stamp=stamp)

    rig.provider.greet = greet  # type: ignore[method-assign]
    try:
        _, reminder_id = await book(db)
        attempt_id, call_id = await placed(rig, reminder_id)
        event = TelnyxEvent("call.answered", "answered-1", datetime.now(UTC), call_id, Stamp(reminder_id, attempt_id))
        background = BackgroundTasks()
        await webhooks.answered(Request({"type": "http", "app": rig.app}), event, background)
        attempt = await _attempt_row(db, reminder_id)
        assert attempt.greeting == "person" and sent == []  # recorded, not yet sent: the event is answered first
        await background()  # what runs after the response
        assert sent == [call_id]
    finally:
        await rig.aclose()


async def test_chaos_a_greeting_found_over_is_recorded_after_a_database_blip(db: Database, monkeypatch) -> None:
    """Found by postgres-restart (Telnyx): the greeting's command was answered "the call is over"
    (nothing spoken) while the database restarted; the answer was lost with the failed write, the
    sweep's resend could only say "unknown", and the call counted heard: a miss. The answer is now
    recorded with retries (the send runs after the event's acknowledgement: no webhook deadline)."""
    from fastapi import BackgroundTasks
    from starlette.requests import Request

    from service.providers.telnyx import webhooks
    from service.providers.telnyx.events import TelnyxEvent

    rig = make_rig(db, "telnyx", ring_ms=60_000)  # no machine detection: `call.answered` greets

    async def greet(call_id, words, *, stamp):
        return False  # Telnyx: 422, the call is over

    real, failures = calls_module.greeting_sent, [OSError("connection refused")]

    async def greeting_sent(*args, **kwargs):
        if failures:
            raise failures.pop()
        return await real(*args, **kwargs)

    rig.provider.greet = greet  # type: ignore[method-assign]
    monkeypatch.setattr(webhooks.calls, "greeting_sent", greeting_sent)
    try:
        _, reminder_id = await book(db)
        attempt_id, call_id = await placed(rig, reminder_id)
        event = TelnyxEvent("call.answered", "answered-1", datetime.now(UTC), call_id, Stamp(reminder_id, attempt_id))
        background = BackgroundTasks()
        await webhooks.answered(Request({"type": "http", "app": rig.app}), event, background)
        await background()
        assert not failures and (await _attempt_row(db, reminder_id)).greeting_result == "ended"
    finally:
        await rig.aclose()


@pytest.mark.parametrize("provider", ["twilio", "telnyx"])
async def test_chaos_a_call_that_ended_unanswered_before_its_leader_recorded_it_is_not_made_again(
        db: Database, provider: str) -> None:
    """Found by leader-sigkill (Twilio): the leader created a call and died before recording the
    reminder `sent`; the call rang out (or a fax took it) and its final event recorded the outcome,
    leaving the reminder `dispatching`; the next leader re-claimed it, saw only a finished call and
    made a new one — a second call, answerable, past the no-answer retries. A final event with no
    retry to come now finishes a `dispatching` reminder as `sent`: its call existed."""
    rig = make_rig(db, provider)
    rig.fake.callees[PHONE] = CalleeScript("busy")
    try:
        _, reminder_id = await book(db)
        store = ReminderStore(db)
        await store.raise_fence(1, "leader")
        assert reminder_id in {c.reminder_id for c in await store.claim(1, "leader", limit=5,
                                                                          stale_after=timedelta(minutes=2))}
        attempt_id = await AttemptStore(db).begin(1, reminder_id)
        assert attempt_id is not None
        call_id = await rig.place(reminder_id, attempt_id, record=False)  # the leader dies before the answer

        async def ended() -> bool:
            return (await _attempt_row(db, reminder_id)).call_status in ("busy", "completed", "no-answer")

        await eventually(ended)
        done = await row(db, reminder_id)
        assert (done.status, done.outcome) == ("sent", "busy")
        await store.raise_fence(2, "successor")
        assert await store.claim(2, "successor", limit=5, stale_after=timedelta(minutes=2)) == []
        assert [rig.call_id(call) for call in rig.calls()] == [call_id]
    finally:
        await rig.aclose()
