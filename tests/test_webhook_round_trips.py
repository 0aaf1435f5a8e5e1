"""What a call's webhooks cost the database (issue 26, docs/decisions/0261): a call event that ends
nothing is ONE statement, on PostgreSQL without BEGIN/COMMIT; the answer and a final event of a
bound call are one transaction each, of no more statements than their guarantees need; and what
those statements still do (the state moved on by state and order, the binding, its one
`reminder.finished`)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from service.db import CallAttempt, Database, Event, Reminder
from service.dispatch.dispatcher import fallback_wording
from service.ledger import AttemptStore, calls
from service.reminders import Answerer, MessageTemplates
from service.reminders.attempts import AttemptState
from service.telephony.provider import Stamp
from tests.support.wire import Wire, claimed_reminder, one_statement

pytestmark = pytest.mark.anyio

FALLBACK = fallback_wording(MessageTemplates.parse(None))


async def placed_call(db: Database, token: int = 5) -> tuple[Stamp, str]:
    """A reminder whose call was created (`sent`, its attempt `created` with the provider's id)."""
    reminder_id = await claimed_reminder(db, token)
    store = AttemptStore(db)
    attempt_id = await store.begin(token, reminder_id)
    assert attempt_id is not None
    call_id = f"CA{attempt_id.replace('-', '')}"
    await store.settle(attempt_id, AttemptState.CREATED, call_id=call_id)
    await db.write(lambda connection: connection.execute(
        Reminder.__table__.update().where(Reminder.id == reminder_id).values(status="sent")))
    return Stamp(reminder_id, attempt_id), call_id


def one_transaction(db: Database, wire: Wire, most: int) -> list[str]:
    statements = [" ".join(statement.split()[:2]) for statement in wire.statements]
    assert 1 <= len(statements) <= most, statements
    if not db.is_sqlite:
        assert wire.transactions == ["start", "commit"], wire.transactions
    wire.clear()
    return statements


async def test_a_call_event_that_ends_nothing_is_one_statement(db: Database, wire: Wire) -> None:
    stamp, call_id = await placed_call(db)
    wire.clear()
    for order, status in enumerate(("initiated", "ringing", "initiated", "in-progress")):
        result = await calls.record_event(db, stamp, call_id, status, order)
        one_statement(db, wire, "UPDATE call_attempts SET")
        assert result.known and not result.cancel
    # "initiated" after "ringing" did not move it back; the order is the last applied event's
    row = await db.read(lambda connection: connection.execute(
        select(CallAttempt.call_status, CallAttempt.last_sequence, CallAttempt.rang_at)
        .where(CallAttempt.id == stamp.attempt_id)).one())
    assert (row.call_status, row.last_sequence) == ("in-progress", 3) and row.rang_at is not None
    # another call's id, or a stamp naming another reminder: unknown, nothing written
    assert not (await calls.record_event(db, stamp, "CA-other", "ringing", 9)).known
    assert not (await calls.record_event(db, Stamp("no-such-reminder", stamp.attempt_id), call_id, "ringing", 9)).known
    wire.clear()


async def test_the_answer_and_the_end_of_a_bound_call_are_one_short_transaction_each(db: Database,
                                                                                     wire: Wire) -> None:
    stamp, call_id = await placed_call(db)
    await calls.record_event(db, stamp, call_id, "ringing", 1)
    wire.clear()

    spoken = await calls.answer(db, stamp, call_id, fallback=FALLBACK)
    # the attempt with the words, its update, the binding, its reminder.finished
    assert one_transaction(db, wire, 4) == ["SELECT call_attempts.id,", "UPDATE call_attempts",
                                            "UPDATE reminders", "INSERT INTO"]
    assert spoken.speak and spoken.newly_bound and spoken.wording is not None and not spoken.cancel

    again = await calls.answer(db, stamp, call_id, fallback=FALLBACK)  # the same call asks again: the same words
    one_transaction(db, wire, 3)
    assert again.speak and not again.newly_bound and again.wording == spoken.wording

    ended = await calls.record_event(db, stamp, call_id, "completed", 5)
    # a bound reminder was finished when it was bound: the attempt only
    assert one_transaction(db, wire, 2) == ["SELECT call_attempts.id,", "UPDATE call_attempts"]
    assert ended.known and ended.outcome is None
    finished = await db.read(lambda connection: connection.execute(
        select(Event.type).where(Event.dedupe == f"reminder.finished:{stamp.reminder_id}")).all())
    assert len(finished) == 1


async def test_a_telnyx_event_is_one_transaction_with_what_it_sets_off(db: Database, wire: Wire) -> None:
    stamp, call_id = await placed_call(db)
    wire.clear()
    answered = calls.CallEvent("in-progress", 1, "ev-answered")
    result = await calls.answer(db, stamp, call_id, fallback=FALLBACK, heard_later=True, event=answered,
                                greet=Answerer.PERSON)
    one_transaction(db, wire, 9)
    assert result.speak and result.newly_bound and result.event.known and not result.event.duplicate
    assert result.greeting is not None and result.greeting.send and result.greeting.words is not None

    # delivered again: recognised, still the bound call's, its greeting not recorded twice
    again = await calls.answer(db, stamp, call_id, fallback=FALLBACK, heard_later=True, event=answered,
                               greet=Answerer.PERSON)
    one_transaction(db, wire, 9)
    assert again.event.duplicate and again.speak and not again.newly_bound
    assert again.greeting is not None and not again.greeting.send

    heard = await calls.heard_event(db, stamp, call_id, calls.CallEvent(calls.SPEAKING, 2, "ev-speak"))
    one_transaction(db, wire, 4)
    assert heard.known and not heard.duplicate
    outcome = await db.read(lambda connection: connection.execute(
        select(Reminder.outcome).where(Reminder.id == stamp.reminder_id)).scalar_one())
    assert outcome == "answered"

    pressed = await calls.keypad(db, stamp, call_id, "1", fallback=FALLBACK, event=calls.CallEvent(None, 3, "ev-1"))
    one_transaction(db, wire, 12)
    assert pressed.bound and pressed.changed and pressed.event.known
    replayed = await calls.keypad(db, stamp, call_id, "1", fallback=FALLBACK, event=calls.CallEvent(None, 3, "ev-1"))
    assert replayed.event.duplicate and not replayed.bound and not replayed.changed

    # an event whose stamp names no attempt of ours: nothing applied, nothing set off
    stranger = Stamp(stamp.reminder_id, "no-such-attempt")
    unknown = await calls.answer(db, stranger, call_id, fallback=FALLBACK, heard_later=True,
                                 event=calls.CallEvent("in-progress", 1, "ev-stranger"), greet=Answerer.PERSON)
    assert not unknown.event.known and not unknown.speak and unknown.greeting is None
    wire.clear()
