"""The reminder lifecycle table, and every writer of the ledger refusing a transition the table
does not hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select

from service import appointments
from service.config import Settings
from service.db import Appointment, CallAttempt, Database, Reminder
from service.db.models import new_id
from service.ledger import Outcome, ReminderStore, SweepStore, SweepTimes, calls, consent
from service.reminders import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    MessageTemplates,
    NoAnswerPolicy,
    ReminderStatus,
    Wording,
    idempotency_key,
    require,
    sources_of,
)
from service.telephony.provider import Stamp

S = ReminderStatus


def test_the_table_is_the_documented_lifecycle() -> None:
    assert TRANSITIONS[S.PENDING] == {S.DISPATCHING, S.CANCELLED, S.SKIPPED}
    assert TRANSITIONS[S.DISPATCHING] == {S.SENT, S.FAILED, S.SKIPPED, S.CANCELLED, S.PENDING}
    # a real provider's call nobody answered: retried, or superseded by a re-plan
    assert TRANSITIONS[S.SENT] == {S.PENDING, S.CANCELLED, S.SKIPPED}
    assert TERMINAL == {S.SENT, S.FAILED, S.CANCELLED, S.SKIPPED}
    assert set(TRANSITIONS) == set(ReminderStatus)
    assert sources_of(S.DISPATCHING) == {S.PENDING}
    assert sources_of(S.CANCELLED) == {S.PENDING, S.DISPATCHING, S.SENT}
    assert sources_of(S.PENDING) == {S.DISPATCHING, S.SENT}


@pytest.mark.parametrize(
    ("source", "target"),
    [(S.SENT, S.DISPATCHING), (S.CANCELLED, S.PENDING), (S.PENDING, S.SENT), (S.DISPATCHING, S.DISPATCHING),
     (S.SKIPPED, S.DISPATCHING), (S.PENDING, "bogus"), (S.DISPATCHING, None)],
)
def test_a_transition_outside_the_table_is_refused(source, target) -> None:
    with pytest.raises(IllegalTransition):
        require(source, target)


def test_every_allowed_transition_passes() -> None:
    for source, targets in TRANSITIONS.items():
        for target in targets:
            require(source, target)


def test_the_key_is_the_reminder_alone() -> None:
    assert idempotency_key("abc") == "reminder-abc" == idempotency_key("abc")





# -- every writer of the ledger asks the table --------------------------------------------------


async def _seed(db: Database, *, status: S = S.PENDING, token: int | None = None, bound: bool = False,
                call_status: str | None = None, now: datetime | None = None) -> tuple[str, str, str]:
    """An appointment in two hours with one reminder in `status` (claimed under `token`; `bound`:
    its call "CA1" of an attempt answered and bound) and a second, pending reminder; the ids of the
    appointment, the reminder and its attempt."""
    now = now or datetime.now(UTC)
    appointment_id, reminder_id, attempt_id = new_id(), new_id(), new_id()
    phone_hash = (await consent.phone_hasher(db))("+14155552671")
    async with db.session() as session:
        await session.execute(insert(Appointment).values(
            id=appointment_id, customer_name="Ada", phone="+14155552671", phone_hash=phone_hash,
            starts_at=now + timedelta(hours=2),
            timezone="UTC", status="scheduled", language="en-US", created_at=now, updated_at=now))
        for rid, state in ((reminder_id, status), (new_id(), S.PENDING)):
            await session.execute(insert(Reminder).values(
                id=rid, appointment_id=appointment_id, due_at=now, next_attempt_at=now, status=state, attempts=0,
                idempotency_key=idempotency_key(rid), fence_token=token if rid == reminder_id else None,
                claimed_at=now if token and rid == reminder_id else None, created_at=now, updated_at=now,
                bound_call_id="CA1" if bound and rid == reminder_id else None,
                bound_attempt_id=attempt_id if bound and rid == reminder_id else None))
        if token is not None:
            await session.execute(insert(CallAttempt).values(
                id=attempt_id, reminder_id=reminder_id, fencing_token=token, state="created", provider_call_id="CA1",
                call_status=call_status, last_event_at=now - timedelta(minutes=5), created_at=now, updated_at=now))
        await session.commit()
    if token is not None:
        await ReminderStore(db).raise_fence(token, "leader")
    return appointment_id, reminder_id, attempt_id


async def _state(db: Database, appointment_id: str) -> list[tuple[str, str]]:
    async with db.session() as session:
        appointment = (await session.execute(select(Appointment.status)
                                             .where(Appointment.id == appointment_id))).scalar()
        rows = await session.execute(select(Reminder.id, Reminder.status)
                                     .where(Reminder.appointment_id == appointment_id).order_by(Reminder.id))
        return [("appointment", appointment), *((reminder_id, status) for reminder_id, status in rows)]


def _without(monkeypatch: pytest.MonkeyPatch, source: S, target: S) -> None:
    """The lifecycle table as if `source` → `target` were not in it."""
    monkeypatch.setitem(TRANSITIONS, source, TRANSITIONS[source] - {target})


def _fallback(row) -> Wording:
    return MessageTemplates.parse(None).render("en-US", row.customer_name, row.starts_at, row.timezone)


async def _claim(db: Database, _ids: tuple[str, str, str]) -> None:
    await ReminderStore(db).raise_fence(5, "leader")
    await ReminderStore(db).claim(5, "leader", limit=10, now=datetime.now(UTC) + timedelta(seconds=1),
                                  stale_after=timedelta(minutes=2))


async def _outcome(db: Database, ids: tuple[str, str, str]) -> None:
    await ReminderStore(db).finish_many(5, [(ids[1], Outcome.sent("CA1", datetime.now(UTC), attempts=1))])


async def _delete(db: Database, ids: tuple[str, str, str]) -> None:
    await appointments.cancel(db, ids[0])


async def _replan(db: Database, ids: tuple[str, str, str]) -> None:
    starts = datetime.now(UTC) + timedelta(days=3)
    await appointments.change(db, ids[0], {"starts_at": starts}, Settings().planning_config())


async def _decline(db: Database, ids: tuple[str, str, str]) -> None:
    await calls.keypad(db, Stamp(ids[1], ids[2]), "CA1", "2", fallback=_fallback)


async def _confirm(db: Database, ids: tuple[str, str, str]) -> None:
    await calls.keypad(db, Stamp(ids[1], ids[2]), "CA1", "1", fallback=_fallback)


async def _opt_out_by_keypad(db: Database, ids: tuple[str, str, str]) -> None:
    await calls.keypad(db, Stamp(ids[1], ids[2]), "CA1", "9", fallback=_fallback)


async def _opt_out_by_api(db: Database, _ids: tuple[str, str, str]) -> None:
    await consent.add(db, "+14155552671")


async def _no_answer_retry(db: Database, ids: tuple[str, str, str]) -> None:
    await calls.record_event(db, Stamp(ids[1], ids[2]), "CA1", "no-answer", 9,
                             NoAnswerPolicy(retries=1, delay=timedelta(minutes=1)))


async def _release_unheard(db: Database, _ids: tuple[str, str, str]) -> None:
    store = SweepStore(db, SweepTimes(release_after=timedelta(seconds=1)), batch=10)
    await store.release_unheard(5)


# (writer, the transition it makes, how the reminder is seeded)
WRITERS = [
    pytest.param(_claim, (S.PENDING, S.DISPATCHING), {}, id="claim"),
    pytest.param(_outcome, (S.DISPATCHING, S.SENT), {"status": S.DISPATCHING, "token": 5}, id="outcome"),
    pytest.param(_delete, (S.PENDING, S.CANCELLED), {}, id="delete"),
    pytest.param(_replan, (S.PENDING, S.CANCELLED), {}, id="re-plan"),
    pytest.param(_decline, (S.PENDING, S.CANCELLED), {"status": S.SENT, "token": 5, "bound": True,
                                                      "call_status": "in-progress"}, id="keypad-decline"),
    pytest.param(_confirm, (S.PENDING, S.SKIPPED), {"status": S.SENT, "token": 5, "bound": True,
                                                    "call_status": "in-progress"}, id="keypad-confirm"),
    pytest.param(_opt_out_by_keypad, (S.PENDING, S.SKIPPED), {"status": S.SENT, "token": 5, "bound": True,
                                                              "call_status": "in-progress"}, id="keypad-opt-out"),
    pytest.param(_opt_out_by_api, (S.PENDING, S.SKIPPED), {}, id="do-not-call-api"),
    pytest.param(_opt_out_by_api, (S.SENT, S.SKIPPED), {"status": S.SENT, "token": 5, "call_status": "ringing"},
                 id="do-not-call-api-while-ringing"),
    pytest.param(_no_answer_retry, (S.SENT, S.PENDING), {"status": S.SENT, "token": 5, "call_status": "ringing"},
                 id="no-answer-retry"),
    pytest.param(_release_unheard, (S.SENT, S.PENDING), {"status": S.SENT, "token": 5, "bound": True,
                                                         "call_status": "completed"}, id="release-unheard"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("writer", "transition", "seed"), WRITERS)
async def test_each_writer_refuses_a_transition_the_table_lacks(db: Database, monkeypatch: pytest.MonkeyPatch,
                                                                writer, transition, seed) -> None:
    ids = await _seed(db, **seed)
    before = await _state(db, ids[0])
    _without(monkeypatch, *transition)
    with pytest.raises(IllegalTransition):
        await writer(db, ids)
    assert await _state(db, ids[0]) == before  # nothing written
    monkeypatch.undo()
    await writer(db, ids)  # with the table whole, the same write goes through
    assert await _state(db, ids[0]) != before


async def _one_dispatching(db: Database, store: ReminderStore, token: int) -> str:
    now = datetime.now(UTC)
    reminder_id = new_id()
    async with db.session() as session:
        appointment = Appointment(
            id=new_id(), customer_name="Ada", phone="+14155552671", starts_at=now + timedelta(hours=2),
            timezone="UTC", status="scheduled",
        )
        appointment.reminders = [
            Reminder(id=reminder_id, due_at=now, next_attempt_at=now, status=S.PENDING, attempts=0,
                     idempotency_key=idempotency_key(reminder_id))
        ]
        session.add(appointment)
        await session.commit()
    await store.raise_fence(token, "leader")
    claims = await store.claim(token, "leader", limit=10, now=now + timedelta(seconds=1),
                               stale_after=timedelta(minutes=2))
    assert [c.reminder_id for c in claims] == [reminder_id]
    return reminder_id


async def _status(db: Database, reminder_id: str) -> str:
    async with db.session() as session:
        return (await session.execute(select(Reminder.status).where(Reminder.id == reminder_id))).scalar_one()


@pytest.mark.anyio
@pytest.mark.parametrize("target", [S.DISPATCHING, "bogus"])
async def test_the_store_refuses_an_outcome_outside_the_table(db: Database, target) -> None:
    store = ReminderStore(db)
    reminder_id = await _one_dispatching(db, store, token=5)
    with pytest.raises(IllegalTransition):
        await store.finish_many(5, [(reminder_id, Outcome(target, last_error="x"))])
    assert await _status(db, reminder_id) == S.DISPATCHING  # nothing written


@pytest.mark.anyio
async def test_the_store_records_an_allowed_outcome(db: Database) -> None:
    store = ReminderStore(db)
    reminder_id = await _one_dispatching(db, store, token=6)
    assert await store.finish_many(6, [(reminder_id, Outcome.sent("c-1", datetime.now(UTC)))]) == {}
    assert await _status(db, reminder_id) == S.SENT
