"""The leader's sweep of real providers' calls, every few seconds while the term lasts: what no
webhook did, because an event came late, was lost, or its replica died (docs/decisions/0221).

- Calls that must end: a queued or ringing call of a reminder superseded by a re-plan or a
  cancellation (or bound to another call) is ended once.
- Calls whose final event never came: after a quarter of an hour without an event the provider is
  asked for the call's state; a final one is applied as its event would have been.
- Where speech is a command (Telnyx): a bound call whose greeting no event commanded gets it (the
  one greeting command of the call, recorded before it is sent); a greeting whose command's fate
  is unknown is sent again — the same command id and words — only while the provider still
  dedupes it; a bound call that ended before any word was commanded is released for a new call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from service.db import Database
from service.ledger import SweepStore, SweepTimes, calls
from service.ledger.calls import Fallback, greeting_words
from service.reminders import Answerer, NoAnswerPolicy, Wording, answerer
from service.telephony.provider import Provider, SpeechCommands, Stamp

__all__ = ["CallSweep"]

log = logging.getLogger(__name__)


class CallSweep:
    """`once(token)` does one round of the sweep for a provider without idempotency. The rows of
    each step are worked on `concurrency` at a time: each costs a provider round trip, and a burst
    of answered calls whose detection is late must be greeted within a person's patience, not one
    round trip after another."""

    def __init__(self, db: Database, provider: Provider, *, fallback: Fallback, policy: NoAnswerPolicy | None = None,
                 times: SweepTimes | None = None, batch: int = 50, concurrency: int = 8) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.db = db
        self.store = SweepStore(db, times, batch=batch)
        self.provider = provider
        self.speech: SpeechCommands | None = provider if isinstance(provider, SpeechCommands) else None
        self.fallback = fallback
        self.policy = policy
        self._slots = asyncio.Semaphore(concurrency)
        self._rounds = 0

    async def once(self, token: int) -> None:
        """One round: end, check, greet, release; under the term's fencing `token`. A step or a
        row that fails does not stop the others (each is its call's own protocol step): each
        failure is logged, and the first is raised once the round is done."""
        steps: list[tuple[Callable[[], Awaitable[Sequence[Any]]], Callable[[Any], Awaitable[None]]]] = [
            (self.store.calls_to_end, self._end_call), (self.store.stale_calls, self._check_stale_call)]
        if self.speech is not None:
            steps += [(self.store.greetings_owed, self._greet_owed),
                      (self.store.greetings_unconfirmed, self._greet_again)]
        failures: list[Exception] = []
        for rows, work in steps:
            try:
                failures += await self._each(await rows(), work)
            except Exception as error:  # noqa: BLE001 - the step's read: the next steps still run
                failures.append(error)
        if self.speech is not None:
            try:
                for reminder_id in await self.store.release_unheard(token):
                    log.warning("reminder %s: its bound call ended before its message began; calling again",
                                reminder_id)
            except Exception as error:  # noqa: BLE001 - raised with the others below
                failures.append(error)
        self._rounds += 1
        if self._rounds % 100 == 0:
            await self.store.forget_old_events()
        if failures:
            raise failures[0]

    async def _each(self, rows: Sequence[Any], work: Callable[[Any], Awaitable[None]]) -> list[Exception]:
        """`work` on every row, `concurrency` at a time; the rows' failures, each logged with its
        call (a cancellation is not a row's failure: it is raised)."""

        async def one(row: Any) -> None:
            async with self._slots:
                try:
                    await work(row)
                except Exception as error:
                    log.warning("call sweep: call %s (attempt %s): %s", row.provider_call_id, row.id,
                                type(error).__name__)
                    raise

        results = await asyncio.gather(*(one(row) for row in rows), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
        return [result for result in results if isinstance(result, Exception)]

    async def _end_call(self, row: Any) -> None:
        done = await self.provider.cancel(row.provider_call_id)
        await self.store.end_requested(row.id)
        log.info("call %s of a reminder that no longer calls (superseded, or bound to another call) "
                 "ended: %s", row.provider_call_id, done)

    async def _check_stale_call(self, row: Any) -> None:
        state = await self.provider.call_state(row.provider_call_id)
        await self.store.checked(row.id)
        if state is not None and calls.is_final(state):
            log.warning("call %s (reminder %s): its final event never came; the provider says %s",
                        row.provider_call_id, row.reminder_id, state)
            await calls.record_event(self.db, Stamp(row.reminder_id, row.id), row.provider_call_id, state, None,
                                     self.policy)

    def _wording(self, row: Any) -> Wording:
        return Wording.from_json(row.wording) if row.wording else self.fallback(row)

    async def _greet_owed(self, row: Any) -> None:
        assert self.speech is not None
        stamp, who = Stamp(row.reminder_id, row.id), answerer(row.answered_by)
        if who is Answerer.FAX:
            await self.provider.cancel(row.provider_call_id)
            return
        greeting = await calls.command_greeting(self.db, stamp, row.provider_call_id, who, fallback=self.fallback)
        if not greeting.bound:
            # its reminder was superseded (a re-plan, a cancellation) or skipped before a word: hung up
            await self.provider.cancel(row.provider_call_id)
            await self.store.end_requested(row.id)
            log.info("reminder %s no longer calls: its bound call %s hung up before a word", row.reminder_id,
                     row.provider_call_id)
            return
        if greeting.send and greeting.words is not None:
            log.warning("reminder %s: no event greeted bound call %s; greeting it (%s)", row.reminder_id,
                        row.provider_call_id, who)
            accepted = await self.speech.greet(row.provider_call_id, greeting.words, stamp=stamp)
            await calls.greeting_sent(self.db, stamp, row.provider_call_id, accepted=accepted)

    async def _greet_again(self, row: Any) -> None:
        assert self.speech is not None
        stamp = Stamp(row.reminder_id, row.id)
        words = greeting_words(Answerer(row.greeting), self._wording(row))
        accepted = await self.speech.greet(row.provider_call_id, words, stamp=stamp)
        await self.store.checked(row.id)
        log.warning("reminder %s: the greeting of call %s was not confirmed; sent again (same command): %s",
                    row.reminder_id, row.provider_call_id, accepted)
        # "The call is over" answering a resend does not say that nothing was spoken: the first
        # send, whose answer was lost, may have run before the call ended. Its fate stays
        # unknown (the call is counted heard when it ends), never "ended" (released: called again).
        await calls.greeting_sent(self.db, stamp, row.provider_call_id, accepted=True if accepted else None)
