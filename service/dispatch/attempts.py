"""Calls through a provider without idempotency: attempts recorded (fenced) before they are sent,
and attempts in doubt reconciled, never blindly repeated (DESIGN.md "Real providers").

`AttemptStore` is the SQL; the rule is `service.reminders.attempts.reconcile`; `StampedCalls` runs
one claimed reminder through them for the dispatcher:

1. The reminder already has a bound call, a created attempt, or an attempt some webhook spoke of:
   it is `sent`.
2. An attempt is unresolved (`creating` — its sender died — or `in_doubt` — a timeout or 5xx): no
   new attempt while it is younger than RECONCILE_GRACE, nor while any call to the number created
   since it is queued, ringing or in progress (its own webhooks will carry the stamp); the
   reminder goes back to `pending` until the next look. Only then is it `not_created`.
3. A new attempt: recorded under the term's fence, then sent with its stamp, then settled.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select, update

from service.db import Database
from service.db.models import CallAttempt, LeaderFence, Reminder, new_id
from service.reminders import ReminderStatus
from service.reminders.attempts import RECHECK, AttemptState, AttemptView, Reconciliation, Step, reconcile
from service.telephony.provider import CallSpec, CreateKind, CreateResult, Provider, ProviderUnavailable

__all__ = ["AttemptStore", "StampedCalls", "StampedConfig"]

log = logging.getLogger(__name__)

FENCE_ROW = 1


class AttemptStore:
    """The SQL of attempts. `begin` is fenced; settling and reading are not (an attempt id is one
    sender's alone, and its outcome is a fact whoever records it)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def begin(self, token: int, reminder_id: str, now: datetime) -> str | None:
        """Record a new attempt, only while the fence is `token` and the reminder is `dispatching`
        under it; its id, or None when this term may not create calls for the reminder any more."""
        attempt_id = new_id()
        async with self.db.session() as session:
            # The reminder's row is locked (a successor's claim of it waits, then sees this
            # attempt); the fence is read, not locked: a lock per attempt on the one fence row
            # would let a leader frozen inside this transaction hold up its successor's fence
            # raise. A raise that commits meanwhile is caught by `may_send` before the create.
            ours = await session.execute(
                select(Reminder.id)
                .where(Reminder.id == reminder_id, Reminder.fence_token == token,
                       Reminder.status == ReminderStatus.DISPATCHING)
                .with_for_update()
            )
            if ours.first() is None:
                await session.rollback()
                return None
            fence = select(LeaderFence.token).where(LeaderFence.id == FENCE_ROW)
            if (await session.execute(fence)).scalar() != token:
                await session.rollback()
                return None
            session.add(CallAttempt(id=attempt_id, reminder_id=reminder_id, fencing_token=token,
                                    state=AttemptState.CREATING, created_at=now, updated_at=now))
            await session.commit()
        return attempt_id

    async def settle(self, attempt_id: str, state: AttemptState, *, call_id: str | None = None,
                     error: str | None = None) -> None:
        """Record what the create achieved. CREATED always holds (it is the provider's word);
        any other state only replaces `creating` or `in_doubt`."""
        statement = update(CallAttempt).where(CallAttempt.id == attempt_id)
        if state != AttemptState.CREATED:
            statement = statement.where(CallAttempt.state.in_((AttemptState.CREATING, AttemptState.IN_DOUBT)))
        values: dict[str, Any] = {"state": state, "error": error}
        async with self.db.session() as session:
            await session.execute(statement.values(values))
            if call_id is not None:
                await session.execute(
                    update(CallAttempt)
                    .where(CallAttempt.id == attempt_id, CallAttempt.provider_call_id.is_(None))
                    .values(provider_call_id=call_id)
                )
            await session.commit()

    async def abandon(self, attempt_ids: Sequence[str]) -> None:
        if not attempt_ids:
            return
        async with self.db.session() as session:
            await session.execute(
                update(CallAttempt)
                .where(CallAttempt.id.in_(list(attempt_ids)),
                       CallAttempt.state.in_((AttemptState.CREATING, AttemptState.IN_DOUBT)),
                       CallAttempt.provider_call_id.is_(None), CallAttempt.last_event_at.is_(None))
                .values(state=AttemptState.NOT_CREATED, error="reconciled: no event and no live call after the grace")
            )
            await session.commit()

    async def view(self, reminder_id: str) -> tuple[str | None, list[AttemptView]]:
        """The reminder's bound call id and its attempts, oldest first."""
        async with self.db.session() as session:
            bound = (await session.execute(select(Reminder.bound_call_id).where(Reminder.id == reminder_id))).scalar()
            rows = await session.execute(
                select(CallAttempt.id, CallAttempt.state, CallAttempt.created_at, CallAttempt.provider_call_id,
                       CallAttempt.last_event_at, CallAttempt.call_status)
                .where(CallAttempt.reminder_id == reminder_id)
                .order_by(CallAttempt.created_at)
            )
            return bound, [AttemptView(*row) for row in rows]


class ClaimLike(Protocol):
    reminder_id: str
    appointment_id: str
    phone: str
    attempts: int


# (claim, reminder column values) → written under the term (the dispatcher's batched recorder)
Finish = Callable[..., Awaitable[None]]


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
    ) -> CreateResult | None:
        """Reconcile, then create if nothing exists or can appear. Returns the create's result, or
        None when no create was sent (already sent, waiting, or not ours any more)."""
        bound, attempts = await self.store.view(claim.reminder_id)
        decision = reconcile(attempts, bound_call_id=bound, now=now(), grace=self.config.reconcile_grace)
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
                decision = reconcile(attempts, bound_call_id=bound, now=now(), grace=self.config.reconcile_grace,
                                     live_created=[call.created_at for call in live])
        if decision.step is Step.SENT:
            await finish(claim, status=ReminderStatus.SENT, provider_call_id=decision.call_id, sent_at=now(),
                         last_error=None)
            return None
        if decision.step is Step.WAIT:
            await finish(claim, status=ReminderStatus.PENDING, next_attempt_at=decision.wait_until,
                         last_error="a call attempt is in doubt: waiting for its events")
            return None
        if decision.abandon:
            log.info("reminder %s: %d attempt(s) in doubt made no call; a new attempt follows",
                     claim.reminder_id, len(decision.abandon))
            await self.store.abandon(decision.abandon)
        if claim.attempts >= self.config.max_attempts:
            await finish(claim, status=ReminderStatus.FAILED, last_error="no call after the maximum number of attempts")
            return None
        if before_create is not None:
            await before_create()  # the rate limiter
        if not may_send():
            return None
        attempt_id = await self.store.begin(token, claim.reminder_id, now())
        if attempt_id is None:
            return None  # the fence moved on: the reminder is the next term's
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
            await finish(claim, status=ReminderStatus.SENT, attempts=attempts, provider_call_id=result.call_id,
                         sent_at=at, last_error=None)
        elif result.kind is CreateKind.NOT_SENT:
            # Certainly no call; the reminder stays `dispatching` for the next term to take up.
            await self.store.settle(attempt_id, AttemptState.NOT_CREATED, error=result.error)
        elif result.kind is CreateKind.IN_DOUBT:
            await self.store.settle(attempt_id, AttemptState.IN_DOUBT, error=result.error)
            log.warning("reminder %s: attempt %s in doubt (%s): reconciling before any new attempt",
                        claim.reminder_id, attempt_id, result.error)
            await finish(claim, status=ReminderStatus.PENDING, attempts=attempts, last_error=result.error,
                         next_attempt_at=at + min(self.config.reconcile_grace, RECHECK))
        elif result.kind is CreateKind.NOT_CREATED and attempts < self.config.max_attempts:
            await self.store.settle(attempt_id, AttemptState.NOT_CREATED, error=result.error)
            delay = self.config.retry_delay(attempts, result.retry_after)
            await finish(claim, status=ReminderStatus.PENDING, attempts=attempts, last_error=result.error,
                         next_attempt_at=at + timedelta(seconds=delay))
        else:
            await self.store.settle(attempt_id, AttemptState.NOT_CREATED, error=result.error)
            log.warning("reminder %s failed after %d attempt(s): %s", claim.reminder_id, attempts, result.error)
            await finish(claim, status=ReminderStatus.FAILED, attempts=attempts, last_error=result.error)
