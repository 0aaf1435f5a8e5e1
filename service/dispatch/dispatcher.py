"""The dispatcher: while this replica holds a leader term, call each due reminder once.

The only place that joins a term, the database and the provider. Data flows one way:
DB (fenced claim) → provider (one idempotency key per reminder) → DB (fenced record).

That is the `generic` provider, which dedupes creates by key. A provider without idempotency
(Twilio, Telnyx) goes through `service.dispatch.stamped`: each create is an attempt recorded under the
fence before it is sent, and an attempt in doubt is reconciled, never repeated blindly.

Guarantees, and their limits:
- Nothing is claimed unless the database's fence equals this term's token; the fence is raised
  when the term starts, so a deposed leader claims nothing once its successor has started.
- Right before each call the term is checked on the local (monotonic) deadline; a call already
  sent when the term ends completes and is recorded. A process paused between that check and the
  send can still send late: the idempotency key makes the provider collapse it with the
  successor's call of the same reminder.
- A reminder left `dispatching` by a dead or deposed term is claimed first by the next term and
  called with the same key: completed, not repeated.
- Outcomes are recorded after the call, fenced by the token like single writes were, but in
  batches (`OutcomeRecorder`: one transaction per few milliseconds or per `record_batch` outcomes). A
  reminder's task ends only once its outcome is written (or given up on after retries, when a
  later claim completes it with the same key), and the term waits for those tasks as before; its
  concurrency slot is given back when the provider answers (DISPATCH_CONCURRENCY bounds calls).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from service.db import Database
from service.dispatch.events import EventRelay, EventsConfig
from service.dispatch.limiter import RateLimiter
from service.dispatch.listing import ListingGate
from service.dispatch.stamped import StampedCalls, StampedConfig
from service.dispatch.sweep import CallSweep
from service.errors import SettingError
from service.ledger import Claim, Outcome, ReminderStore, StaleTerm, SweepTimes, consent, erasure, is_data_error
from service.ledger.cancellation import CONFIRMED_BY_CUSTOMER, OPTED_OUT
from service.metrics import (
    CALL_ATTEMPT_OUTCOMES,
    CALL_ATTEMPTS,
    CAPPED,
    DISPATCH_LAG,
    IN_FLIGHT,
    PERSONAL_DATA_ERASED,
    REMINDERS_DONE,
    SKIPPED_BY_CONSENT,
)
from service.privacy import strip_control
from service.reminders import (
    CallCaps,
    CallWindow,
    MessageTemplates,
    NoAnswerPolicy,
    ReminderStatus,
    Wording,
    call_message,
    decide_call,
)
from service.reminders.attempts import RECHECK
from service.telephony.http import usable_call_id
from service.telephony.provider import CallSpec, CreateKind, CreateResult, Provider

__all__ = ["DispatchConfig", "Dispatcher", "OutcomeRecorder", "StaleTerm", "Term"]

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
    # Outcomes are written in batches: at most this many per transaction, waiting at most this
    # long (seconds) for a batch to fill.
    record_batch: int = 500
    record_delay: float = 0.005
    # Reminder tasks of the term (calling, or waiting for their outcome to be written) at most;
    # None = twice `concurrency`. Slots free up when the provider answers: without this bound a
    # database that refuses outcomes would let claims and calls go on while tasks pile up.
    max_in_flight: int | None = None
    # Providers without idempotency: how long an attempt in doubt waits for its events (RECONCILE_GRACE).
    reconcile_grace: timedelta = timedelta(seconds=60)
    # Providers without idempotency: the leader's sweep of their calls (service.dispatch.sweep),
    # this often, with these waits; the no-answer retries of a call whose final event it finds;
    # the words of reminders planned before wording was stored.
    sweep_interval: float = 2.0
    sweep_times: SweepTimes = field(default_factory=SweepTimes)
    no_answer: NoAnswerPolicy | None = None
    templates: MessageTemplates = field(default_factory=lambda: MessageTemplates.parse(None))
    # Calls people agreed to: the caps per number, and whether a confirmed appointment is still called.
    caps: CallCaps = field(default_factory=CallCaps)
    call_after_confirmation: bool = False
    # PERSONAL_DATA_RETENTION: personal data of appointments that started longer ago is erased by
    # the leader, this often (seconds); None: kept.
    retention: timedelta | None = None
    retention_interval: float = 60.0
    # The events' relay (service.dispatch.events): the feed's numbering, delivery to EVENTS_URL, retention.
    events: EventsConfig = field(default_factory=EventsConfig)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise SettingError("DISPATCH_CONCURRENCY", "must be at least 1")
        if self.max_attempts < 1:
            raise SettingError("DISPATCH_MAX_ATTEMPTS", "must be at least 1")
        if not 0 < self.scan_interval <= 1:
            raise SettingError("scan_interval", "must be in (0, 1] seconds")
        if self.record_batch < 1 or not 0 <= self.record_delay <= 1:
            raise SettingError("record_batch", "must be at least 1, and record_delay within [0, 1] seconds")
        if self.max_in_flight is not None and self.max_in_flight < self.concurrency:
            raise SettingError("max_in_flight", "must be at least DISPATCH_CONCURRENCY")

    def retry_delay(self, attempts: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter after `attempts` failures; never sooner than Retry-After."""
        backoff = min(self.retry_max_delay, self.retry_base_delay * 2 ** (attempts - 1))
        return max(backoff * random.uniform(0.5, 1.0), retry_after or 0.0)

    @property
    def in_flight_limit(self) -> int:
        """How many reminder tasks of a term may exist at once."""
        return self.max_in_flight if self.max_in_flight is not None else 2 * self.concurrency


def message_for(claim: Claim) -> str:
    """The words of the call for a claimed reminder: fixed when it was planned (the domain's
    wording); reminders planned before wording was stored are worded as they were then."""
    if claim.wording:
        return Wording.from_json(claim.wording).message
    return call_message(claim.customer_name, claim.starts_at, claim.timezone)


def fallback_wording(templates: MessageTemplates) -> Callable[[Any], Wording]:
    """The words of a reminder planned before wording was stored (a row with `customer_name`,
    `starts_at`, `timezone`, `language`): rendered now, as then."""

    def wording(row: Any) -> Wording:
        language = row.language if templates.supports(row.language) else templates.default_language
        return templates.render(language, row.customer_name, row.starts_at, row.timezone)

    return wording


RECORD_RETRIES = 6
# Seconds the term's side loops (the call sweep, retention, the events relay) get to finish what
# they are doing when the term ends, before they are cancelled.
STOP_GRACE = 3.0


class OutcomeRecorder:
    """Writes one term's outcomes in batches, each batch in one fenced transaction.

    `record()` queues an outcome and returns once it is settled: None when it was written, else
    why not — the reminder is no longer this term's claim (another term took it over, or a
    webhook moved it on), or the database stayed down for every retry (the reminder stays
    `dispatching`: a later claim completes it with the same key).
    A writer waits `max_delay` seconds for a batch to fill, then writes up to `max_batch`
    outcomes per transaction until the queue is empty; while it writes, outcomes arriving meanwhile
    get a second writer (at most `max_writers`), so a write's round trips do not hold up the next
    batch. Batches never share a reminder. Writer tasks exist only while outcomes wait: nothing
    to close.
    """

    def __init__(
        self,
        store: ReminderStore,
        token: int,
        *,
        max_batch: int,
        max_delay: float,
        max_writers: int = 2,
        keep_trying: Callable[[], bool] = lambda: False,
        retries: int = RECORD_RETRIES,
    ) -> None:
        self.store = store
        # writes of a batch tried while `keep_trying` says no, before giving up on it
        self.retries = retries
        self.token = token
        # While this says yes (the term is valid), a database outage is waited out, not given up
        # on: a given-up outcome would leave the reminder `dispatching` until a stale-claim sweep.
        self.keep_trying = keep_trying
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_writers = max_writers
        self._queue: dict[str, tuple[Outcome, asyncio.Future[str | None]]] = {}
        self._later: list[tuple[str, Outcome, asyncio.Future[str | None]]] = []
        self._writing: set[str] = set()
        self._writers: set[asyncio.Task[None]] = set()
        self._filling = False

    async def record(self, reminder_id: str, outcome: Outcome) -> str | None:
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        if reminder_id in self._queue or reminder_id in self._writing:  # one write per reminder at a time
            self._later.append((reminder_id, outcome, future))
        else:
            self._queue[reminder_id] = (outcome, future)
        self._spawn()
        # shielded: a cancelled caller does not cancel the write of its own or others' outcomes
        return await asyncio.shield(future)

    def _spawn(self) -> None:
        if not self._queue or self._filling or len(self._writers) >= self.max_writers:
            return
        writer = asyncio.create_task(self._write(), name=f"recorder-{self.token}")
        self._writers.add(writer)
        writer.add_done_callback(self._writers.discard)

    async def _write(self) -> None:
        self._filling = True
        try:
            if len(self._queue) < self.max_batch and self.max_delay > 0:
                await asyncio.sleep(self.max_delay)  # let the batch fill
        finally:
            self._filling = False
        while self._queue:
            batch = dict(list(self._queue.items())[: self.max_batch])
            for reminder_id in batch:
                del self._queue[reminder_id]
            self._writing.update(batch)
            try:
                await self._flush(batch)
            finally:
                self._writing.difference_update(batch)
                later, self._later = self._later, []
                for reminder_id, outcome, future in later:
                    if reminder_id in self._queue or reminder_id in self._writing:
                        self._later.append((reminder_id, outcome, future))
                    else:
                        self._queue[reminder_id] = (outcome, future)

    async def _flush(self, batch: dict[str, tuple[Outcome, asyncio.Future[str | None]]]) -> None:
        """Write `batch`, retrying while the database is down: the outcomes are facts worth keeping."""
        items = [(reminder_id, outcome) for reminder_id, (outcome, _) in batch.items()]
        attempt = 0
        while attempt < self.retries or self.keep_trying():
            attempt += 1
            try:
                not_recorded = await self.store.finish_many(self.token, items)
            except Exception as error:  # noqa: BLE001
                if not is_data_error(error):
                    log.warning("recording %d outcome(s) failed (%s); retrying", len(items), type(error).__name__)
                    await asyncio.sleep(min(0.25 * 2 ** min(attempt, 5), 4.0))
                    continue
                # Bad values, not an outage: retrying the same batch would fail forever and hold
                # every other outcome back. Split it until the poison row is alone, record that
                # one with what is known, and keep going.
                await self._isolate(batch)
                return
            for reminder_id, (_, future) in batch.items():
                if not future.done():
                    future.set_result(not_recorded.get(reminder_id))
            return
        for _, future in batch.values():
            if not future.done():
                future.set_result("the database refused every try; a later claim completes it with the same key")

    async def _isolate(self, batch: dict[str, tuple[Outcome, asyncio.Future[str | None]]]) -> None:
        """Write `batch` after a data error: halves separately, a lone row with its values made safe."""
        if len(batch) > 1:
            items = list(batch.items())
            middle = len(items) // 2
            await self._flush(dict(items[:middle]))
            await self._flush(dict(items[middle:]))
            return
        ((reminder_id, (outcome, future)),) = batch.items()
        safe = salvage_outcome(outcome)
        log.error("reminder %s: its outcome holds values the database refuses; recording it without them", reminder_id)
        try:
            why: str | None = (await self.store.finish_many(self.token, [(reminder_id, safe)])).get(reminder_id)
        except Exception as error:  # noqa: BLE001 - even the salvaged row failed: give up on this one only
            why = f"even without the refused values the database refused it ({type(error).__name__})"
        if not future.done():
            future.set_result(why)


# Text columns of an outcome and how much of each is kept when the database refuses the values.
_SALVAGE_TEXT_LIMIT = 500


def salvage_outcome(outcome: Outcome) -> Outcome:
    """`outcome` with values the database can store: control characters out, texts capped, a bad
    call id dropped.

    What is known stays: the status (a call the provider accepted is still `sent`), and why a
    value was dropped goes to `last_error`.
    """
    notes: list[str] = []
    call_id = outcome.provider_call_id
    if call_id is not None and usable_call_id(call_id) is None:
        notes.append("provider call id refused: unusable")
        call_id = None

    def safe(text: str | None) -> str | None:
        return None if text is None else strip_control(text)[:_SALVAGE_TEXT_LIMIT]

    last_error = safe(outcome.last_error)
    if notes:
        last_error = "; ".join([*notes, *([last_error] if last_error else [])])[:_SALVAGE_TEXT_LIMIT]
    return replace(outcome, provider_call_id=call_id, last_error=last_error, skip_reason=safe(outcome.skip_reason))


# reminders_call_attempts_total's `outcome` label (its values: service.metrics.CALL_ATTEMPT_OUTCOMES)
_SENT, _TRANSIENT, _PERMANENT, _NOT_SENT = CALL_ATTEMPT_OUTCOMES
_ATTEMPT_LABEL = {
    CreateKind.CREATED: _SENT,
    CreateKind.NOT_CREATED: _TRANSIENT,
    CreateKind.IN_DOUBT: _TRANSIENT,
    CreateKind.REJECTED: _PERMANENT,
    CreateKind.NOT_SENT: _NOT_SENT,
}


class Dispatcher:
    """Calls due reminders for the length of a term; `lead(term)` is the elector's callback."""

    def __init__(self, db: Database, provider: Provider, config: DispatchConfig) -> None:
        self.store = ReminderStore(db)
        self.provider = provider
        self.config = config
        self._stamped = None if self.provider.dedupes_creation else StampedCalls(
            db, self.provider, StampedConfig(caller_id=config.caller_id, reconcile_grace=config.reconcile_grace,
                                             max_attempts=config.max_attempts, retry_delay=config.retry_delay))
        self._sweep = None if self.provider.dedupes_creation else CallSweep(
            db, self.provider, fallback=fallback_wording(config.templates), policy=config.no_answer,
            times=config.sweep_times)
        self._limiter = RateLimiter(config.calls_per_second)
        self._events = EventRelay(db, config.events)
        self._listing = ListingGate(lambda since: consent.listed_since(db, since))
        # Every reminder task of the term until its outcome is written (waited for at term end).
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        # The concurrency slots: reminders claimed and not yet past their call. A slot is given
        # back when the provider answers, not when the outcome is written: DISPATCH_CONCURRENCY
        # bounds calls in flight, and a batch being written does not hold calls back.
        self._slots: set[str] = set()
        self._slot_freed = asyncio.Event()

    async def lead(self, term: Term) -> None:
        """Dispatch until `term` ends, then wait for the calls in flight. StaleTerm if fenced out."""
        token = term.fencing_token
        await self.store.raise_fence(token, self.config.instance)
        log.info("dispatching under fencing token %d", token)
        recorder = OutcomeRecorder(
            self.store, token, max_batch=self.config.record_batch, max_delay=self.config.record_delay,
            keep_trying=term.valid,
        )
        ended = asyncio.ensure_future(term.ended.wait())
        sweep = asyncio.create_task(self._sweep_calls(term, ended), name="call-sweep") if self._sweep else None
        eraser = (asyncio.create_task(self._erase_old(term, ended), name="retention")
                  if self.config.retention is not None else None)
        events = asyncio.create_task(self._events.run(term, ended), name="events")
        try:
            while term.valid():
                asked = self._free()
                claimed = await self._claim_some(term, asked)
                if claimed is None:  # the database did not answer: try again shortly
                    await self._wait(ended, self.config.scan_interval * 2)
                    continue
                for claim in claimed:
                    if claim.reminder_id not in self._in_flight:
                        task = asyncio.create_task(self._handle(term, claim, recorder))
                        self._in_flight[claim.reminder_id] = task
                        self._slots.add(claim.reminder_id)
                        task.add_done_callback(lambda _t, rid=claim.reminder_id: self._done(rid))
                if len(claimed) < asked:
                    # Fewer than asked: nothing else was due. A freed slot finds nothing new, so the
                    # next look is the scan's (a claim per freed slot cost a claim per call).
                    await asyncio.wait({ended}, timeout=self.config.scan_interval)
                elif self._room():
                    continue  # a full claim: more may be due right now
                else:
                    await self._wait_for_room(ended, self.config.scan_interval)
        finally:
            ended.cancel()
            # Each loop ends at its next look at `ended`: a statement in flight finishes rather than
            # being cancelled mid-way (its connection reset in the middle of its rollback); what
            # has not ended after STOP_GRACE is cancelled.
            stopping = {task for task in (sweep, eraser, events) if task is not None}
            if stopping:
                await asyncio.wait(stopping, timeout=STOP_GRACE)
                for task in stopping:
                    task.cancel()
                await asyncio.gather(*stopping, return_exceptions=True)
            if self._in_flight:
                log.info("term %d over: waiting for %d call(s) in flight", token, len(self._in_flight))
                await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
            log.info("stopped dispatching under fencing token %d", token)

    async def _sweep_calls(self, term: Term, ended: asyncio.Future[bool]) -> None:
        """While the term lasts: the sweep of the provider's calls (CallSweep)."""
        assert self._sweep is not None
        while term.valid() and not ended.done():
            try:
                await self._sweep.once(term.fencing_token)
            except Exception as error:  # noqa: BLE001 - a DB or provider outage must not end the term
                log.warning("call sweep failed: %s", type(error).__name__)
            await asyncio.wait({ended}, timeout=self.config.sweep_interval)

    async def _erase_old(self, term: Term, ended: asyncio.Future[bool]) -> None:
        """While the term lasts: erase the personal data of appointments that started more than
        PERSONAL_DATA_RETENTION ago, a batch per transaction, all that are due each round."""
        assert self.config.retention is not None
        while term.valid() and not ended.done():
            total = 0
            try:
                while term.valid():
                    now = self._now()
                    erased = await erasure.erase_past(self.store.db, now - self.config.retention, now)
                    total += erased
                    PERSONAL_DATA_ERASED.labels("retention").inc(erased)
                    if erased < erasure.BATCH:
                        break
                    log.info("retention: %d appointment(s) erased so far this round", total)
            except Exception as error:  # noqa: BLE001 - a DB outage must not end the term
                log.warning("retention: erasing failed: %s", type(error).__name__)
            if total:
                log.info("retention: personal data of %d appointment(s) erased (older than %s after the appointment)",
                         total, self.config.retention)
            await asyncio.wait({ended}, timeout=self.config.retention_interval)

    def _now(self) -> datetime:
        """The database's time, as far as this process can tell (its clock and the offset the last
        claim measured): the times the term writes are compared with other replicas' on it."""
        return datetime.now(UTC) + self.store.clock_offset

    def _done(self, reminder_id: str) -> None:
        self._in_flight.pop(reminder_id, None)
        self._release(reminder_id)
        self._slot_freed.set()  # a task slot (in_flight_limit) is free too

    def _release(self, reminder_id: str) -> None:
        if reminder_id in self._slots:
            self._slots.discard(reminder_id)
            self._slot_freed.set()

    async def _wait_for_room(self, ended: asyncio.Future[bool], timeout: float) -> None:
        """Wait up to `timeout` s (the scan) or until a claim is worth its cost: a quarter of the
        slots free, or nothing in flight. One claim costs about as much as 20 claimed rows, so
        claiming per freed slot would spend most of the database time on claims."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not ended.done():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await self._wait(ended, left)
            if self._room():
                return

    def _free(self) -> int:
        """Claims that may start now: free call slots, within the bound on tasks in flight."""
        return min(self.config.concurrency - len(self._slots), self.config.in_flight_limit - len(self._in_flight))

    def _room(self) -> bool:
        free = self._free()
        return free >= max(1, self.config.concurrency // 4) or (free > 0 and not self._slots)

    async def _wait(self, ended: asyncio.Future[bool], timeout: float) -> None:
        self._slot_freed.clear()
        freed = asyncio.ensure_future(self._slot_freed.wait())
        try:
            await asyncio.wait({ended, freed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()

    async def _claim_some(self, term: Term, free: int) -> list[Claim] | None:
        if free <= 0:
            return []
        try:
            return await self.store.claim(
                term.fencing_token, self.config.instance, limit=free, stale_after=self.config.stale_claim_after,
                caps=self.config.caps, window=self.config.call_window,
                # reconciled before any hold is asked (`_handle`): an orphan is held like the others
                hold_orphans=self._stamped is not None,
            )
        except StaleTerm:
            raise
        except Exception as error:  # noqa: BLE001 - a DB outage must not end the term's loop
            log.warning("claiming reminders failed: %s: %s", type(error).__name__, error)
            return None

    async def _handle(self, term: Term, claim: Claim, recorder: OutcomeRecorder) -> None:
        if self._stamped is not None:
            # Reconciled first: what holds a reminder back (below) is about a new call, never one
            # that exists — a reminder whose call was answered while its create's answer was in
            # doubt is `sent`, whatever its appointment or number became since.
            await self._handle_stamped(term, claim, recorder, lambda: self._hold(claim, self._now()))
            return
        hold = self._hold(claim, self._now())
        if hold is not None:
            await self._finish(recorder, claim, hold)
            return
        await self._limiter.acquire()
        if not term.valid():
            return  # stays `dispatching` under this token: the next term completes it with the same key
        try:
            listed = await self._listing.listed(claim.phone_hash, claim.claimed_at)
        except Exception as error:  # noqa: BLE001 - the list cannot be read: no call
            self._release(claim.reminder_id)
            await self._finish(recorder, claim, Outcome.retry(self._now() + RECHECK,
                                                              f"the do-not-call list could not be read: "
                                                              f"{type(error).__name__}"))
            return
        if listed:
            self._release(claim.reminder_id)
            SKIPPED_BY_CONSENT.labels("opted_out").inc()
            await self._finish(recorder, claim, Outcome.skipped(OPTED_OUT))
            return
        spec = CallSpec(
            to=claim.phone,
            from_=self.config.caller_id,
            reminder_id=claim.reminder_id,
            appointment_id=claim.appointment_id,
            attempt_id="",
            message=message_for(claim),
            idempotency_key=claim.idempotency_key,
        )
        IN_FLIGHT.inc()
        try:
            # checked again right before the first byte leaves: a process frozen since the check
            # above must not call on resume
            result = await self.provider.create_call(spec, may_send=term.valid)
        finally:
            IN_FLIGHT.dec()
            self._release(claim.reminder_id)
        CALL_ATTEMPTS.labels(_ATTEMPT_LABEL[result.kind]).inc()
        if result.kind is CreateKind.NOT_SENT:
            return  # as above: the next term completes it with the same key, no attempt spent
        await self._record(recorder, claim, result)

    def _hold(self, claim: Claim, now: datetime) -> Outcome | None:
        """What keeps a claimed reminder from a new call now: its appointment cancelled, what
        `_held` says, its time (misfired, or outside the call window); None: call."""
        if claim.appointment_cancelled:
            return Outcome.cancelled("appointment cancelled")
        held = self._held(claim)
        if held is not None:
            return held
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
            return Outcome.skipped(decision.skip_reason)
        if decision.wait_until:
            return Outcome.wait(decision.wait_until)
        return None

    def _held(self, claim: Claim) -> Outcome | None:
        """What holds a claimed reminder back from calling: its number opted out, its appointment
        is confirmed (unless CALL_AFTER_CONFIRMATION), or a cap per number."""
        if claim.opted_out:
            SKIPPED_BY_CONSENT.labels("opted_out").inc()
            return Outcome.skipped(OPTED_OUT)
        if claim.confirmed and not self.config.call_after_confirmation:
            SKIPPED_BY_CONSENT.labels("confirmed").inc()
            return Outcome.skipped(CONFIRMED_BY_CUSTOMER)
        if claim.cap is None:
            return None
        if claim.cap.skip_reason is not None:
            CAPPED.labels(claim.cap.cap, "skipped").inc()
            log.info("reminder %s skipped: %s", claim.reminder_id, claim.cap.skip_reason)
            return Outcome.skipped(claim.cap.skip_reason)
        assert claim.cap.wait_until is not None
        CAPPED.labels(claim.cap.cap, "deferred").inc()
        return Outcome.wait(claim.cap.wait_until, f"call cap per {claim.cap.cap} reached for this number: "
                                                  f"waiting until {claim.cap.wait_until.isoformat(timespec='seconds')}")

    async def _handle_stamped(self, term: Term, claim: Claim, recorder: OutcomeRecorder,
                              hold: Callable[[], Outcome | None]) -> None:
        """A provider without idempotency: reconcile earlier attempts, then at most one new one,
        unless `hold` says what keeps it from a new call."""
        assert self._stamped is not None

        async def finish(done: Claim, outcome: Outcome) -> None:
            if outcome.status == ReminderStatus.SENT and outcome.attempts is not None:
                DISPATCH_LAG.observe(max(0.0, (self._now() - done.due_at).total_seconds()))
            await self._finish(recorder, done, outcome)

        IN_FLIGHT.inc()
        try:
            result = await self._stamped.handle(
                claim, token=term.fencing_token, may_send=term.valid, now=lambda: self._now(), finish=finish,
                before_create=self._limiter.acquire, hold=hold,
            )
        except Exception as error:  # noqa: BLE001 - a database or provider failure mid-way
            # Not left `dispatching` until the stale-claim sweep: looked at again shortly, and an
            # attempt recorded but not settled is reconciled then, never repeated blindly.
            log.warning("reminder %s: %s during its call; looking again shortly", claim.reminder_id,
                        type(error).__name__)
            result = None
            if term.valid():
                await self._finish(recorder, claim, Outcome.retry(self._now() + RECHECK,
                                                                  f"interrupted: {type(error).__name__}"))
        finally:
            IN_FLIGHT.dec()
            self._release(claim.reminder_id)
        if result is not None:
            CALL_ATTEMPTS.labels(_ATTEMPT_LABEL[result.kind]).inc()

    async def _record(self, recorder: OutcomeRecorder, claim: Claim, outcome: CreateResult) -> None:
        now = self._now()
        attempts = claim.attempts + 1
        if outcome.kind is CreateKind.CREATED:
            DISPATCH_LAG.observe(max(0.0, (now - claim.due_at).total_seconds()))
            # `error`: e.g. an unusable call id, refused by the client
            await self._finish(recorder, claim, Outcome.sent(outcome.call_id, now, attempts=attempts,
                                                             error=outcome.error))
        elif outcome.kind in (CreateKind.NOT_CREATED, CreateKind.IN_DOUBT) and attempts < self.config.max_attempts:
            delay = self.config.retry_delay(attempts, outcome.retry_after)
            log.info("reminder %s: attempt %d failed (%s), retry in %.1fs", claim.reminder_id, attempts, outcome.error,
                     delay)
            await self._finish(recorder, claim, Outcome.retry(now + timedelta(seconds=delay), outcome.error,
                                                              attempts=attempts))
        else:
            log.warning("reminder %s failed after %d attempt(s): %s", claim.reminder_id, attempts, outcome.error)
            await self._finish(recorder, claim, Outcome.failed(outcome.error, attempts=attempts))

    async def _finish(self, recorder: OutcomeRecorder, claim: Claim, outcome: Outcome) -> None:
        """Record an outcome under the recorder's term (batched; returns once it is settled)."""
        why_not = await recorder.record(claim.reminder_id, outcome)
        if why_not is not None:
            log.info("reminder %s: its %s outcome was not recorded: %s", claim.reminder_id, outcome.status, why_not)
        elif outcome.status in (ReminderStatus.SENT, ReminderStatus.FAILED, ReminderStatus.SKIPPED):
            REMINDERS_DONE.labels(str(outcome.status)).inc()
