"""The calls of real providers as the leader's sweep sees them (service.dispatch.sweep), on the
database's clock:

- calls that must end: a call of a reminder that was superseded (re-plan, cancellation) or never
  bound, still queued or ringing — ended once;
- calls whose final event never came: their state is asked of the provider now and then;
- where speech is a command (Telnyx): bound calls owed their greeting (no event recorded one: the
  machine detection is late or lost, or the replica died before recording), greetings commanded
  whose fate is unknown (sent again, same command, only inside the provider's dedupe window), and
  bound calls that ended before any word was commanded: released for a new call (`sent` →
  `pending`, under the fence), the one status change here (docs/decisions/0221).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, not_, or_, select, update

from service.db import Database
from service.db.clock import db_now
from service.db.models import Appointment, AppointmentStatus, CallAttempt, ProviderEvent, Reminder
from service.ledger.calls import HEARD
from service.ledger.cancellation import REPLANNED
from service.ledger.events import EventSource, finished_in
from service.ledger.fence import fence_holds
from service.reminders import Answerer
from service.reminders.lifecycle import ReminderStatus, require
from service.reminders.outcomes import CALL_ANSWERED, FINAL_CALL_STATES, MACHINE_ANSWERS, PRE_ANSWER_STATES
from service.sql import none_of, one_of
from service.telephony.provider import MACHINE_DETECTION_WITHIN

# how late the detection's event may come and still be on time: its delivery and handling
DETECTION_DELIVERY = timedelta(milliseconds=2_500)

__all__ = ["DETECTION_DELIVERY", "RELEASED", "SweepStore", "SweepTimes"]

RELEASED = "released: the bound call ended before its message began"

_WORDS = (CallAttempt.id, CallAttempt.reminder_id, CallAttempt.provider_call_id, CallAttempt.greeting,
          CallAttempt.answered_by, Reminder.wording, Appointment.customer_name, Appointment.starts_at,
          Appointment.timezone, Appointment.language)


class SweepTimes:
    """How long the sweep lets things be before it acts."""

    def __init__(self, *, greet_after: timedelta = MACHINE_DETECTION_WITHIN + DETECTION_DELIVERY,
                 beep_wait: timedelta = timedelta(seconds=35), resend_within: timedelta = timedelta(seconds=45),
                 resend_every: timedelta = timedelta(seconds=5), release_after: timedelta = timedelta(seconds=10),
                 stale_after: timedelta = timedelta(minutes=15), check_every: timedelta = timedelta(minutes=5),
                 events_kept: timedelta = timedelta(days=1)) -> None:
        # a person answered (or nobody knows who): greeted after `greet_after` without an event
        # that did it — once the detection's result is overdue, before a person tires of the
        # silence (decision 0223); a machine: after `beep_wait` (its greeting and beep, or the
        # provider's 30 s beep detection); a commanded greeting is sent again every `resend_every`,
        # but only while younger than `resend_within` (Telnyx ignores a repeated command_id for
        # 60 s, no longer)
        if resend_within >= timedelta(seconds=55):
            raise ValueError("resend_within must stay well inside the provider's 60 s dedupe window")
        if greet_after >= beep_wait:
            raise ValueError("greet_after must be shorter than beep_wait")
        self.greet_after, self.beep_wait = greet_after, beep_wait
        self.resend_within, self.resend_every = resend_within, resend_every
        self.release_after, self.stale_after, self.check_every = release_after, stale_after, check_every
        self.events_kept = events_kept


def _current() -> Any:
    """The reminder belongs to its appointment's current plan, and the appointment is scheduled."""
    return exists().where(Appointment.id == Reminder.appointment_id, Appointment.plan == Reminder.plan,
                          Appointment.status == AppointmentStatus.SCHEDULED)


def _not_current() -> Any:
    """The reminder no longer calls: superseded or finished without this call, or its appointment
    re-planned or cancelled."""
    return or_(one_of(Reminder.status, (ReminderStatus.CANCELLED, ReminderStatus.SKIPPED, ReminderStatus.FAILED)),
               not_(_current()))


class SweepStore:
    """Reads and writes of the leader's call sweep (at most `batch` rows each)."""

    def __init__(self, db: Database, times: SweepTimes | None = None, *, batch: int = 50) -> None:
        self.db = db
        self.times = times or SweepTimes()
        self.batch = batch

    async def _rows(self, statement: Any) -> list[Any]:
        async with self.db.session() as session:
            return list(await session.execute(statement.limit(self.batch)))

    # -- calls to end -----------------------------------------------------------------------------

    async def calls_to_end(self) -> list[Any]:
        """Calls not yet answered of reminders that no longer call, or bound to another call."""
        return await self._rows(
            select(CallAttempt.id, CallAttempt.provider_call_id)
            .join(Reminder, Reminder.id == CallAttempt.reminder_id)
            .where(CallAttempt.provider_call_id.is_not(None), CallAttempt.cancel_requested_at.is_(None),
                   or_(CallAttempt.call_status.is_(None), one_of(CallAttempt.call_status, PRE_ANSWER_STATES)),
                   # never the bound call itself (answered, whatever its status events say yet)
                   or_(Reminder.bound_attempt_id.is_(None), Reminder.bound_attempt_id != CallAttempt.id),
                   or_(_not_current(), Reminder.bound_call_id.is_not(None)))
        )

    async def end_requested(self, attempt_id: str) -> None:
        await self._touch(attempt_id, cancel_requested_at=db_now())

    async def _touch(self, attempt_id: str, **values: Any) -> None:
        async with self.db.session() as session:
            await session.execute(update(CallAttempt).where(CallAttempt.id == attempt_id).values(values))
            await session.commit()

    # -- calls whose final event never came --------------------------------------------------------

    async def stale_calls(self) -> list[Any]:
        """Calls with no final state and no event for `stale_after`, not asked about lately."""
        return await self._rows(
            select(CallAttempt.id, CallAttempt.reminder_id, CallAttempt.provider_call_id)
            .where(CallAttempt.provider_call_id.is_not(None),
                   or_(CallAttempt.call_status.is_(None), none_of(CallAttempt.call_status, FINAL_CALL_STATES)),
                   CallAttempt.last_event_at < db_now(-self.times.stale_after),
                   or_(CallAttempt.checked_at.is_(None), CallAttempt.checked_at < db_now(-self.times.check_every)))
        )

    async def checked(self, attempt_id: str) -> None:
        await self._touch(attempt_id, checked_at=db_now())

    # -- greetings (speech as a command) -------------------------------------------------------------

    async def greetings_owed(self) -> list[Any]:
        """Bound calls answered, still live, with no greeting commanded and not being ended: past
        `greet_after` (a person, or nobody knows who) or `beep_wait` (a machine)."""
        person = or_(CallAttempt.answered_by.is_(None), none_of(CallAttempt.answered_by, MACHINE_ANSWERS))
        return await self._rows(
            select(*_WORDS)
            .join(Reminder, Reminder.bound_attempt_id == CallAttempt.id)
            .join(Appointment, Appointment.id == Reminder.appointment_id)
            .where(CallAttempt.greeting.is_(None), CallAttempt.call_status == CALL_ANSWERED,
                   CallAttempt.cancel_requested_at.is_(None),
                   or_(Reminder.answered_at < db_now(-self.times.beep_wait),
                       and_(Reminder.answered_at < db_now(-self.times.greet_after), person)))
        )

    async def greetings_unconfirmed(self) -> list[Any]:
        """Greetings commanded whose command's fate is unknown, young enough to be sent again
        (same command id, same words), not sent again for `resend_every`."""
        return await self._rows(
            select(*_WORDS)
            .join(Reminder, Reminder.bound_attempt_id == CallAttempt.id)
            .join(Appointment, Appointment.id == Reminder.appointment_id)
            .where(CallAttempt.greeting.is_not(None), CallAttempt.greeting_result.is_(None),
                   or_(CallAttempt.call_status.is_(None), none_of(CallAttempt.call_status, FINAL_CALL_STATES)),
                   CallAttempt.greeting_at > db_now(-self.times.resend_within),
                   or_(CallAttempt.checked_at.is_(None), CallAttempt.checked_at < db_now(-self.times.resend_every)))
        )

    async def release_unheard(self, token: int) -> list[str]:
        """Reminders whose bound call ended before a word of it was commanded: unbound and
        `pending` again, only while the fence is `token`. A bound call that ended after its
        greeting was commanded, with the command's fate unknown, may have spoken: its outcome is
        recorded as heard, never released. One of a plan a re-plan superseded meanwhile (its
        greeting's fate was unknown then, and turned out to be "the call was over") is not released
        but `cancelled` ("re-planned"): its plan no longer calls. Returns the ids released."""
        require(ReminderStatus.SENT, ReminderStatus.PENDING)
        require(ReminderStatus.SENT, ReminderStatus.CANCELLED)
        ended = (one_of(CallAttempt.call_status, FINAL_CALL_STATES),
                 CallAttempt.last_event_at < db_now(-self.times.release_after))
        async with self.db.session() as session:
            rows = list(await session.execute(
                select(Reminder.id, CallAttempt.id.label("attempt_id"), CallAttempt.provider_call_id,
                       CallAttempt.greeting, CallAttempt.greeting_result, _current().label("current"))
                .join(CallAttempt, CallAttempt.id == Reminder.bound_attempt_id)
                .where(Reminder.outcome.is_(None), Reminder.status == ReminderStatus.SENT, *ended)
                .limit(self.batch)
            ))
            released, heard, cancelled = [], [], []
            for row in rows:
                if row.greeting is not None and row.greeting_result != "ended":
                    result = await session.execute(HEARD[Answerer(row.greeting) is Answerer.MACHINE], {
                        "reminder_id": row.id, "call_id": row.provider_call_id, "attempt_id": row.attempt_id})
                    if result.rowcount == 1:
                        heard.append(row.id)
                    continue
                if not self.db.is_sqlite:  # the attempt before the reminder, as every writer of both locks them
                    await session.execute(select(CallAttempt.id).where(CallAttempt.id == row.attempt_id)
                                          .with_for_update())
                unheard = (Reminder.id == row.id, Reminder.bound_attempt_id == row.attempt_id,
                           Reminder.outcome.is_(None), Reminder.status == ReminderStatus.SENT)
                if not row.current:
                    # superseded while its greeting's fate was unknown, which then turned out to be
                    # "the call was over": nobody heard it, and its plan no longer calls
                    result = await session.execute(update(Reminder).where(*unheard, not_(_current()))
                                                   .values(status=ReminderStatus.CANCELLED, skip_reason=REPLANNED,
                                                           updated_at=db_now()))
                    if result.rowcount == 1:
                        cancelled.append(row.id)
                    continue
                result = await session.execute(
                    update(Reminder)
                    .where(*unheard, _current(), fence_holds(token))
                    .values(bound_call_id=None, bound_attempt_id=None, answered_at=None,
                            status=ReminderStatus.PENDING, next_attempt_at=db_now(), fence_token=token,
                            last_error=RELEASED)
                )
                if result.rowcount == 1:
                    await session.execute(update(CallAttempt).where(CallAttempt.id == row.attempt_id)
                                          .values(error=RELEASED))
                    released.append(row.id)
            await session.run_sync(finished_in, [*heard, *cancelled], EventSource.SYSTEM)
            await session.commit()
        return released

    # -- events already applied ----------------------------------------------------------------------

    async def forget_old_events(self) -> int:
        async with self.db.session() as session:
            result = await session.execute(
                delete(ProviderEvent).where(ProviderEvent.received_at < db_now(-self.times.events_kept)))
            await session.commit()
        return int(result.rowcount or 0)
