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

from service.db import Database
from service.ledger import SpeechStore
from service.providers.telnyx.rest import speak_command_id
from service.telephony.provider import SpeechCommands, Stamp

__all__ = ["SpeechSweep"]

log = logging.getLogger(__name__)


class SpeechSweep:
    """`once(now)` re-sends the message of every bound call that owes it (at most `batch`)."""

    def __init__(self, db: Database, provider: SpeechCommands, *, wording: Callable[[Any], str],
                 confirm_after: timedelta = timedelta(seconds=10), batch: int = 50) -> None:
        self.store = SpeechStore(db, confirm_after=confirm_after, batch=batch)
        self.provider = provider
        self.wording = wording

    async def once(self, now: datetime, token: int | None = None) -> int:
        """Speak again where it is owed, and (with the term's `token`) release reminders whose bound
        call ended unheard; returns how many speak commands were accepted."""
        if token is not None:
            for reminder_id in await self.store.release_unheard(now, token):
                log.warning("reminder %s: its bound call ended before the message began; calling again", reminder_id)
        accepted = 0
        for row in await self.store.owed(now):
            stamp = Stamp(row.reminder_id, row.id)
            done = await self.provider.speak(row.provider_call_id, self.wording(row),
                                             command_id=speak_command_id(row.id), stamp=stamp)
            log.warning("reminder %s: bound call %s never confirmed its message; spoken again: %s",
                        row.reminder_id, row.provider_call_id, done)
            accepted += bool(done)
            await self.store.looked_at(row.id, now)
        return accepted
