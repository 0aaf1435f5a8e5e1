"""The dispatcher: while this replica holds a leader term, call each due reminder once.

The only place that joins a term, the database and the provider. Data flows one way:
DB (fenced claim) → provider (one idempotency key per reminder) → DB (fenced record).

Guarantees, and their limits:
- Nothing is claimed unless the database's fence equals this term's token; the fence is raised
  when the term starts, so a deposed leader claims nothing once its successor has started.
- Right before each call the term is checked on the local (monotonic) deadline; a call already
  sent when the term ends completes and is recorded. A process paused between that check and the
  send can still send late: the idempotency key makes the provider collapse it with the
  successor's call of the same reminder.
- A reminder left `dispatching` by a dead or deposed term is claimed first by the next term and
  called with the same key: completed, not repeated.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from service.config import CallWindow
from service.db import Database, ReminderStatus
from service.dispatch.limiter import RateLimiter
from service.dispatch.policy import decide_call
from service.dispatch.store import Claim, ReminderStore, StaleTerm
from service.metrics import CALL_ATTEMPTS, DISPATCH_LAG, IN_FLIGHT, REMINDERS_DONE
from service.telephony import CallOutcome, CallRequest, OutcomeKind, TelephonyClient

__all__ = ["DispatchConfig", "Dispatcher", "StaleTerm", "Term"]

log = logging.getLogger(__name__)


class Term(Protocol):
    """What the dispatcher needs of a leader term (service.election.Term provides it)."""

    fencing_token: int
    ended: asyncio.Event

    def valid(self) -> bool: ...


@dataclass(frozen=True)
class DispatchConfig:
    instance: str
    caller_id: str
    call_window: CallWindow
    misfire_grace: timedelta
    concurrency: int = 50
    calls_per_second: float = 0.0
    max_attempts: int = 5
    retry_base_delay: float = 1.0
    retry_max_delay: float = 300.0
    # How often to look for due work when nothing wakes the loop earlier.
    scan_interval: float = 0.5
    # A claim of this term's own with no outcome after this long is claimed again.
    stale_claim_after: timedelta = timedelta(minutes=2)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 < self.scan_interval <= 1:
            raise ValueError("scan_interval must be in (0, 1] seconds")


def message_for(claim: Claim) -> str:
    """The words of the call: stable for a reminder, since its key stands for one body."""
    local = claim.starts_at.astimezone(ZoneInfo(claim.timezone))
    return (
        f"Hello {claim.customer_name}, this is a reminder of your appointment on "
        f"{local:%A %d %B %Y at %H:%M} ({claim.timezone})."
    )


class Dispatcher:
    """Calls due reminders for the length of a term; `lead(term)` is the elector's callback."""

    def __init__(self, db: Database, client: TelephonyClient, config: DispatchConfig) -> None:
        self.store = ReminderStore(db)
        self.client = client
        self.config = config
        self._limiter = RateLimiter(config.calls_per_second)
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()

    async def lead(self, term: Term) -> None:
        """Dispatch until `term` ends, then wait for the calls in flight. StaleTerm if fenced out."""
        token = term.fencing_token
        await self.store.raise_fence(token, self.config.instance)
        log.info("dispatching under fencing token %d", token)
        ended = asyncio.ensure_future(term.ended.wait())
        try:
            while term.valid():
                claimed = await self._claim_some(term)
                if claimed is None:  # the database did not answer: try again shortly
                    await self._wait(ended, self.config.scan_interval * 2)
                    continue
                for claim in claimed:
                    if claim.reminder_id not in self._in_flight:
                        task = asyncio.create_task(self._handle(term, claim))
                        self._in_flight[claim.reminder_id] = task
                        task.add_done_callback(lambda _t, rid=claim.reminder_id: self._done(rid))
                if len(claimed) and len(self._in_flight) < self.config.concurrency:
                    continue  # more may be due right now
                await self._wait(ended, self.config.scan_interval)
        finally:
            ended.cancel()
            if self._in_flight:
                log.info("term %d over: waiting for %d call(s) in flight", token, len(self._in_flight))
                await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
            log.info("stopped dispatching under fencing token %d", token)

    def _done(self, reminder_id: str) -> None:
        self._in_flight.pop(reminder_id, None)
        self._slot_freed.set()

    async def _wait(self, ended: asyncio.Future[bool], timeout: float) -> None:
        self._slot_freed.clear()
        freed = asyncio.ensure_future(self._slot_freed.wait())
        try:
            await asyncio.wait({ended, freed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()

    async def _claim_some(self, term: Term) -> list[Claim] | None:
        free = self.config.concurrency - len(self._in_flight)
        if free <= 0:
            return []
        try:
            return await self.store.claim(
                term.fencing_token,
                self.config.instance,
                limit=free,
                now=datetime.now(UTC),
                stale_after=self.config.stale_claim_after,
            )
        except StaleTerm:
            raise
        except Exception as error:  # noqa: BLE001 - a DB outage must not end the term's loop
            log.warning("claiming reminders failed: %s: %s", type(error).__name__, error)
            return None

    async def _handle(self, term: Term, claim: Claim) -> None:
        token = term.fencing_token
        now = datetime.now(UTC)
        if claim.appointment_cancelled:
            await self._finish(claim, token, status=ReminderStatus.CANCELLED, skip_reason="appointment cancelled")
            return
        decision = decide_call(
            scheduled_at=claim.scheduled_at,
            starts_at=claim.starts_at,
            zone=ZoneInfo(claim.timezone),
            window=self.config.call_window,
            grace=self.config.misfire_grace,
            now=now,
        )
        if decision.skip_reason:
            log.warning("reminder %s skipped: %s", claim.reminder_id, decision.skip_reason)
            await self._finish(claim, token, status=ReminderStatus.SKIPPED, skip_reason=decision.skip_reason)
            return
        if decision.wait_until:
            await self._finish(claim, token, status=ReminderStatus.PENDING, next_attempt_at=decision.wait_until)
            return
        await self._limiter.acquire()
        if not term.valid():
            return  # stays `dispatching` under this token: the next term completes it with the same key
        request = CallRequest(
            to=claim.phone,
            from_=self.config.caller_id,
            message=message_for(claim),
            appointment_id=claim.appointment_id,
            reminder_id=claim.reminder_id,
            idempotency_key=claim.idempotency_key,
        )
        IN_FLIGHT.inc()
        try:
            outcome = await self.client.place_call(request)
        finally:
            IN_FLIGHT.dec()
        CALL_ATTEMPTS.labels(outcome.kind.value).inc()
        await self._record(claim, token, outcome)

    async def _record(self, claim: Claim, token: int, outcome: CallOutcome) -> None:
        now = datetime.now(UTC)
        attempts = claim.attempts + 1
        if outcome.kind is OutcomeKind.SENT:
            DISPATCH_LAG.observe(max(0.0, (now - claim.due_at).total_seconds()))
            await self._finish(
                claim, token, status=ReminderStatus.SENT, attempts=attempts, provider_call_id=outcome.call_id,
                sent_at=now, last_error=None,
            )
        elif outcome.kind is OutcomeKind.TRANSIENT and attempts < self.config.max_attempts:
            delay = self.retry_delay(attempts, outcome.retry_after)
            log.info("reminder %s: attempt %d failed (%s), retry in %.1fs", claim.reminder_id, attempts, outcome.error, delay)
            await self._finish(
                claim, token, status=ReminderStatus.PENDING, attempts=attempts, last_error=outcome.error,
                next_attempt_at=now + timedelta(seconds=delay),
            )
        else:
            log.warning("reminder %s failed after %d attempt(s): %s", claim.reminder_id, attempts, outcome.error)
            await self._finish(claim, token, status=ReminderStatus.FAILED, attempts=attempts, last_error=outcome.error)

    def retry_delay(self, attempts: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter after `attempts` failures; never sooner than Retry-After."""
        backoff = min(self.config.retry_max_delay, self.config.retry_base_delay * 2 ** (attempts - 1))
        return max(backoff * random.uniform(0.5, 1.0), retry_after or 0.0)

    async def _finish(self, claim: Claim, token: int, **values: object) -> None:
        """Record, retrying while the database is down: the outcome is a fact worth keeping."""
        status = values.get("status")
        for attempt in range(6):
            try:
                if await self.store.finish(claim.reminder_id, token, **values):
                    if status in (ReminderStatus.SENT, ReminderStatus.FAILED, ReminderStatus.SKIPPED):
                        REMINDERS_DONE.labels(str(status)).inc()
                else:
                    log.info("reminder %s was taken over by a newer term; its outcome is theirs", claim.reminder_id)
                return
            except Exception as error:  # noqa: BLE001
                log.warning("recording reminder %s failed (%s); retrying", claim.reminder_id, type(error).__name__)
                await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
        log.error("could not record reminder %s; a later claim will complete it with the same key", claim.reminder_id)
