"""The leader's sweep for providers whose speech is a command (Telnyx): a bound call whose
message was never confirmed gets it again.

The events route speaks on `call.answered` before acknowledging it, so a replica dying in between
is covered by Telnyx delivering the event again. What that does not cover — an event Telnyx gave up
on, a speak command that failed on every try — is found here: a reminder's bound call still
`in-progress` (answered, no `call.speak.started` since) with nothing recorded for `confirm_after`.
The command is sent again with the same `command_id`, so a repeat within the provider's dedupe
window is not spoken twice; a call that has ended since answers 422 and is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from service.db import Database
from service.db.models import Appointment, CallAttempt, Reminder
from service.telephony.provider import SpeechCommands, Stamp
from service.telephony.telnyx import speak_command_id

__all__ = ["SpeechSweep"]

log = logging.getLogger(__name__)

ANSWERED = "in-progress"


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
                select(CallAttempt.id, CallAttempt.reminder_id, CallAttempt.provider_call_id,
                       Appointment.customer_name, Appointment.starts_at, Appointment.timezone)
                .join(Reminder, Reminder.bound_attempt_id == CallAttempt.id)
                .join(Appointment, Appointment.id == Reminder.appointment_id)
                .where(CallAttempt.call_status == ANSWERED, CallAttempt.updated_at < now - self.confirm_after,
                       CallAttempt.provider_call_id.is_not(None))
                .order_by(CallAttempt.updated_at)
                .limit(self.batch)
            )
            return list(rows)

    async def once(self, now: datetime) -> int:
        """Speak again where it is owed; returns how many commands were accepted."""
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
