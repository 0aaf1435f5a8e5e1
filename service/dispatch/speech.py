"""The leader's sweep for providers whose speech is a command (Telnyx): a bound call whose
message was never confirmed gets it again, and a reminder whose bound call ended before its
message began is released for a new call.

The events route speaks on `call.answered` before acknowledging it, so a replica dying in between
is covered by Telnyx delivering the event again. What that does not cover — an event Telnyx gave up
on, a speak command that failed on every try — is found here: a reminder's bound call still
`in-progress` (answered, no `call.speak.started` since) with nothing recorded for `confirm_after`.
The command is sent again with the same `command_id`, so a repeat within the provider's dedupe
window is not spoken twice; a call that has ended since answers 422 and is left alone.

A bound call can also end before its message began (the callee hung up in the silence). Binding
leaves the reminder's `outcome` empty for such providers; the speech's first event sets it
(`answered`). A bound call that is over, with no outcome and no event for `confirm_after` (a late
`call.speak.started` still counts), is released: the reminder goes back to `pending` — under the
fence of this term — and gets a new attempt. The message was never heard, so at most once holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, select, update

from service.db import Database
from service.db.models import Appointment, CallAttempt, LeaderFence, Reminder, ReminderStatus
from service.telephony.provider import SpeechCommands, Stamp
from service.telephony.telnyx import speak_command_id

__all__ = ["SpeechSweep"]

log = logging.getLogger(__name__)

ANSWERED = "in-progress"
# Non-final call states (service.webhooks.calls' ranks): anything else means the call is over.
_ALIVE = ("queued", "initiated", "ringing", ANSWERED, "speaking", "spoken")
RELEASED = "released: the bound call ended before its message began"
FENCE_ROW = 1


class SpeechSweep:
    """`once(now)` re-sends the message of every bound call that owes it (at most `batch`)."""

    def __init__(self, db: Database, provider: SpeechCommands, *, wording: Callable[[Any], str],
                 confirm_after: timedelta = timedelta(seconds=10), batch: int = 50) -> None:
        self.db = db
        self.provider = provider
        self.wording = wording
        self.confirm_after = confirm_after
        self.batch = batch

    async def owed(self, now: datetime) -> list[Any]:
        """Bound calls answered at least `confirm_after` ago whose speech never started."""
        async with self.db.session() as session:
            rows = await session.execute(
                select(CallAttempt.id, CallAttempt.reminder_id, CallAttempt.provider_call_id, Reminder.wording,
                       Appointment.customer_name, Appointment.starts_at, Appointment.timezone)
                .join(Reminder, Reminder.bound_attempt_id == CallAttempt.id)
                .join(Appointment, Appointment.id == Reminder.appointment_id)
                .where(CallAttempt.call_status == ANSWERED, CallAttempt.updated_at < now - self.confirm_after,
                       CallAttempt.provider_call_id.is_not(None))
                .order_by(CallAttempt.updated_at)
                .limit(self.batch)
            )
            return list(rows)

    async def once(self, now: datetime, token: int | None = None) -> int:
        """Speak again where it is owed, and (with the term's `token`) release reminders whose bound
        call ended unheard; returns how many speak commands were accepted."""
        if token is not None:
            await self.release_unheard(now, token)
        accepted = 0
        for row in await self.owed(now):
            stamp = Stamp(row.reminder_id, row.id)
            done = await self.provider.speak(row.provider_call_id, self.wording(row),
                                             command_id=speak_command_id(row.id), stamp=stamp)
            log.warning("reminder %s: bound call %s never confirmed its message; spoken again: %s",
                        row.reminder_id, row.provider_call_id, done)
            accepted += bool(done)
            async with self.db.session() as session:  # look again only after another `confirm_after`
                await session.execute(
                    update(CallAttempt)
                    .where(CallAttempt.id == row.id, CallAttempt.call_status == ANSWERED)
                    .values(updated_at=now)
                )
                await session.commit()
        return accepted

    async def release_unheard(self, now: datetime, token: int) -> list[str]:
        """Reminders whose bound call ended before its message: unbound and `pending` again, only
        while the fence is `token`. Returns their ids."""
        async with self.db.session() as session:
            rows = await session.execute(
                select(Reminder.id, CallAttempt.id.label("attempt_id"))
                .join(CallAttempt, CallAttempt.id == Reminder.bound_attempt_id)
                .where(Reminder.outcome.is_(None), Reminder.status == ReminderStatus.SENT,
                       CallAttempt.call_status.is_not(None), CallAttempt.call_status.not_in(_ALIVE),
                       CallAttempt.last_event_at < now - self.confirm_after)
                .limit(self.batch)
            )
            candidates = list(rows)
            fenced = exists().where(LeaderFence.id == FENCE_ROW, LeaderFence.token == token)
            released = []
            for row in candidates:
                result = await session.execute(
                    update(Reminder)
                    .where(Reminder.id == row.id, Reminder.bound_attempt_id == row.attempt_id,
                           Reminder.outcome.is_(None), Reminder.status == ReminderStatus.SENT, fenced)
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
        for reminder_id in released:
            log.warning("reminder %s: its bound call ended before the message began; calling again", reminder_id)
        return released
