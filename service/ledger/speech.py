"""The reminders of providers whose speech is a command (Telnyx), as the leader's sweep sees them:
bound calls whose message never began, and bound calls that ended before it did.

`release_unheard` is the one status change here (`sent` → `pending`, under the fence of the
term): the bound call ended before its message began, so the message was never heard and a new
call may speak it (docs/decisions/0141-telnyx-speech-is-a-command.md).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from service.db import Database
from service.db.models import Appointment, CallAttempt, Reminder
from service.ledger.fence import fence_holds
from service.reminders.lifecycle import ReminderStatus, require
from service.reminders.outcomes import CALL_ANSWERED, LIVE_CALL_STATES

__all__ = ["RELEASED", "SpeechStore"]

RELEASED = "released: the bound call ended before its message began"


class SpeechStore:
    """Reads and writes of the speech sweep; `confirm_after`: how long a call may stay silent."""

    def __init__(self, db: Database, *, confirm_after: timedelta, batch: int) -> None:
        self.db = db
        self.confirm_after = confirm_after
        self.batch = batch

    async def owed(self, now: datetime) -> list[Any]:
        """Bound calls answered at least `confirm_after` ago whose speech never started, with what
        their words need (`wording`, or the appointment's name, time and zone)."""
        async with self.db.session() as session:
            rows = await session.execute(
                select(CallAttempt.id, CallAttempt.reminder_id, CallAttempt.provider_call_id, Reminder.wording,
                       Appointment.customer_name, Appointment.starts_at, Appointment.timezone)
                .join(Reminder, Reminder.bound_attempt_id == CallAttempt.id)
                .join(Appointment, Appointment.id == Reminder.appointment_id)
                .where(CallAttempt.call_status == CALL_ANSWERED, CallAttempt.updated_at < now - self.confirm_after,
                       CallAttempt.provider_call_id.is_not(None))
                .order_by(CallAttempt.updated_at)
                .limit(self.batch)
            )
            return list(rows)

    async def looked_at(self, attempt_id: str, now: datetime) -> None:
        """The sweep spoke (or tried to) on the attempt's call: look again only after `confirm_after`."""
        async with self.db.session() as session:
            await session.execute(
                update(CallAttempt)
                .where(CallAttempt.id == attempt_id, CallAttempt.call_status == CALL_ANSWERED)
                .values(updated_at=now)
            )
            await session.commit()

    async def release_unheard(self, now: datetime, token: int) -> list[str]:
        """Reminders whose bound call ended before its message: unbound and `pending` again, only
        while the fence is `token`. Returns their ids."""
        require(ReminderStatus.SENT, ReminderStatus.PENDING)
        async with self.db.session() as session:
            rows = await session.execute(
                select(Reminder.id, CallAttempt.id.label("attempt_id"))
                .join(CallAttempt, CallAttempt.id == Reminder.bound_attempt_id)
                .where(Reminder.outcome.is_(None), Reminder.status == ReminderStatus.SENT,
                       CallAttempt.call_status.is_not(None), CallAttempt.call_status.not_in(LIVE_CALL_STATES),
                       CallAttempt.last_event_at < now - self.confirm_after)
                .limit(self.batch)
            )
            released = []
            for row in list(rows):
                result = await session.execute(
                    update(Reminder)
                    .where(Reminder.id == row.id, Reminder.bound_attempt_id == row.attempt_id,
                           Reminder.outcome.is_(None), Reminder.status == ReminderStatus.SENT, fence_holds(token))
                    .values(bound_call_id=None, bound_attempt_id=None, answered_at=None,
                            status=ReminderStatus.PENDING, next_attempt_at=now, fence_token=token,
                            last_error=RELEASED)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:
                    await session.execute(update(CallAttempt).where(CallAttempt.id == row.attempt_id)
                                          .values(error=RELEASED))
                    released.append(row.id)
            await session.commit()
        return released
