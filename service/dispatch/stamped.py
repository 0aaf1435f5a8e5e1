"""Calls through a provider without idempotency: attempts recorded (fenced) before they are sent,
and attempts in doubt reconciled, never blindly repeated (docs/DESIGN.md, "Real providers").

The SQL is the ledger's (`AttemptStore`); the rule is `service.reminders.attempts.reconcile`;
`StampedCalls` runs one claimed reminder through them for the dispatcher:

1. The reminder already has a bound call, a created attempt, or an attempt some webhook spoke of:
   it is `sent` — whatever holds it back from a new call (its appointment cancelled, its number
   listed, its appointment confirmed, a cap, its time), which is asked only before a new one.
2. An attempt is unresolved (`creating` — its sender died — or `in_doubt` — a timeout or 5xx): no
   new attempt while it is younger than RECONCILE_GRACE, nor while any call to the number created
   since it is queued, ringing or in progress (its own webhooks will carry the stamp); the
   reminder goes back to `pending` until the next look. Only then is it `not_created`.
3. A new attempt: recorded under the term's fence, then sent with its stamp, then settled.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from service.db import Database
from service.ledger import AttemptStore, Outcome
from service.reminders.attempts import RECHECK, AttemptState, Reconciliation, Step, reconcile
from service.telephony.provider import CallSpec, CreateKind, CreateResult, Provider, ProviderUnavailable

__all__ = ["StampedCalls", "StampedConfig"]

log = logging.getLogger(__name__)


class ClaimLike(Protocol):
    reminder_id: str
    appointment_id: str
    phone: str
    attempts: int


# (claim, its outcome) → written under the term (the dispatcher's batched recorder)
Finish = Callable[["ClaimLike", Outcome], Awaitable[None]]


@dataclass(frozen=True)
class StampedConfig:
    caller_id: str
    reconcile_grace: timedelta
    max_attempts: int
    retry_delay: Callable[[int, float | None], float]  # (attempts so far, Retry-After) → seconds


class StampedCalls:
    """One claimed reminder through a provider without idempotency (see the module docstring)."""

    def __init__(self, db: Database, provider: Provider, config: StampedConfig) -> None:
        self.store = AttemptStore(db)
        self.provider = provider
        self.config = config

    async def handle(
        self,
        claim: ClaimLike,
        *,
        token: int,
        may_send: Callable[[], bool],
        now: Callable[[], datetime],
        finish: Finish,
        before_create: Callable[[], Awaitable[None]] | None = None,
        hold: Callable[[], Outcome | None] | None = None,
    ) -> CreateResult | None:
        """Reconcile, then create if nothing exists or can appear and `hold` (asked only then)
        keeps nothing back; what it says is the reminder's outcome instead. Returns the create's
        result, or None when no create was sent (already sent, waiting, held, or not ours any more)."""
        # the attempts' times and the grace are on the database's clock
        bound, attempts, db_time = await self.store.view(claim.reminder_id)
        decision = reconcile(attempts, bound_call_id=bound, now=db_time, grace=self.config.reconcile_grace)
        if decision.step is Step.LIST:
            try:
                live = await self.provider.live_calls(claim.phone)
            except ProviderUnavailable as error:
                log.info("reminder %s: in doubt, calls cannot be listed (%s); looking again", claim.reminder_id, error)
                live = None
            if live is None:
                decision = Reconciliation(Step.WAIT, wait_until=now() + RECHECK)
            else:
                # A listing that returns stamps (Telnyx's client_state) names each call's reminder:
                # only this reminder's calls count. Without one (Twilio), every call to the number does.
                live = [call for call in live if call.stamp is None or call.stamp.reminder_id == claim.reminder_id]
                decision = reconcile(attempts, bound_call_id=bound, now=db_time, grace=self.config.reconcile_grace,
                                     live_created=[call.created_at for call in live])
        if decision.step is Step.SENT:
            await finish(claim, Outcome.sent(decision.call_id, now()))
            return None
        if decision.step is Step.WAIT:
            assert decision.wait_until is not None
            waiting = "a call attempt is in doubt: waiting for its events"
            await finish(claim, Outcome.retry(decision.wait_until, waiting))
            return None
        if decision.abandon:
            if await self.store.abandon(decision.abandon) < len(decision.abandon):
                # a webhook spoke of one of them meanwhile: its call exists, so no new attempt
                await finish(claim, Outcome.retry(now() + RECHECK, "a call attempt in doubt turned out to exist"))
                return None
            log.info("reminder %s: %d attempt(s) in doubt made no call; a new attempt follows",
                     claim.reminder_id, len(decision.abandon))
        held = hold() if hold is not None else None
        if held is not None:
            await finish(claim, held)
            return None
        if claim.attempts >= self.config.max_attempts:
            await finish(claim, Outcome.failed("no call after the maximum number of attempts"))
            return None
        if before_create is not None:
            await before_create()  # the rate limiter
        if not may_send():
            return None
        attempt_id = await self.store.begin(token, claim.reminder_id)
        if attempt_id is None:
            # the fence moved on (the reminder is the next term's), or a re-plan or cancellation
            # superseded it: its outcome is written by neither
            return None
        spec = CallSpec(to=claim.phone, from_=self.config.caller_id, reminder_id=claim.reminder_id,
                        appointment_id=claim.appointment_id, attempt_id=attempt_id)
        result = await self.provider.create_call(spec, may_send=may_send)
        await self._settle(claim, attempt_id, result, now(), finish)
        return result

    async def _settle(self, claim: ClaimLike, attempt_id: str, result: CreateResult, at: datetime,
                      finish: Finish) -> None:
        attempts = claim.attempts + 1
        if result.kind is CreateKind.CREATED:
            await self.store.settle(attempt_id, AttemptState.CREATED, call_id=result.call_id)
            await finish(claim, Outcome.sent(result.call_id, at, attempts=attempts))
        elif result.kind is CreateKind.NOT_SENT:
            # Certainly no call; the reminder stays `dispatching` for the next term to take up.
            await self.store.settle(attempt_id, AttemptState.NOT_CREATED, error=result.error)
        elif result.kind is CreateKind.IN_DOUBT:
            await self.store.settle(attempt_id, AttemptState.IN_DOUBT, error=result.error)
            log.warning("reminder %s: attempt %s in doubt (%s): reconciling before any new attempt",
                        claim.reminder_id, attempt_id, result.error)
            await finish(claim, Outcome.retry(at + min(self.config.reconcile_grace, RECHECK), result.error,
                                              attempts=attempts))
        elif result.kind is CreateKind.NOT_CREATED and attempts < self.config.max_attempts:
            await self.store.settle(attempt_id, AttemptState.NOT_CREATED, error=result.error)
            delay = self.config.retry_delay(attempts, result.retry_after)
            await finish(claim, Outcome.retry(at + timedelta(seconds=delay), result.error, attempts=attempts))
        else:
            await self.store.settle(attempt_id, AttemptState.NOT_CREATED, error=result.error)
            log.warning("reminder %s failed after %d attempt(s): %s", claim.reminder_id, attempts, result.error)
            await finish(claim, Outcome.failed(result.error, attempts=attempts))
