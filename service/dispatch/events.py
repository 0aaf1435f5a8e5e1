"""The events' relay, while this replica holds a leader term (docs/decisions/0251): the feed's
numbering, the delivery to EVENTS_URL signed as Standard Webhooks says, and the retention — the
rows are the ledger's (service.ledger.outbox), the HTTP is here.

- Numbering: every `poll_interval`, the events committed since get the next positions (the feed
  and the delivery see numbered events only).
- Delivery (EVENTS_URL set): at least once, in order per appointment — each appointment's oldest
  pending event (its head) is sent, at most one per appointment at a time and `concurrency` in all,
  on a transport of its own: a slow receiver holds these tasks, never a reminder call. Every try
  carries the event's id as `webhook-id`, the time of the try and its signature (the
  `standardwebhooks` library). A 2xx ends it; 410 stops delivery to the endpoint until
  `reminders events-resume` (or another EVENTS_URL); anything else, a timeout or no connection is
  tried again after an exponential backoff with jitter, until EVENTS_MAX_AGE after the event,
  when it is given up (counted, logged) and the appointment's next event goes.
- A 2xx is recorded with the others that came within `mark_linger` of it, in one statement;
  the appointment's next event goes once its mark is written.
- A try in flight when the term ends is abandoned: its result is never recorded, so the next
  leader sends the event again, same id (receivers dedupe on `webhook-id`).
- Retention: events older than EVENTS_RETENTION are deleted, oldest positions first.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import httpx
from standardwebhooks.webhooks import Webhook

from service.db import Database
from service.ledger.fence import StaleTerm
from service.ledger.outbox import Delivery, Head, OutboxStore, endpoint_key
from service.metrics import EVENT_DELIVERIES
from service.telephony.http import (
    SendRefused,
    describe_failure,
    parse_retry_after,
    pooled_transport,
    post_guarded,
    send_capped,
)

__all__ = ["EventRelay", "EventsConfig"]

log = logging.getLogger(__name__)

_USER_AGENT = "reminders-events/0.1.0"
# events numbered, and deleted by retention, per transaction
_NUMBER_BATCH = 1000
_PRUNE_BATCH = 5000


@dataclass(frozen=True)
class EventsConfig:
    """EVENTS_URL (None: no delivery; the feed still works), EVENTS_SECRET (`whsec_…`), the time
    one try may take, EVENTS_MAX_AGE, EVENTS_RETENTION; and how the relay paces itself."""

    url: str | None = None
    secret: str | None = None
    timeout: float = 10.0
    max_age: timedelta = timedelta(hours=24)
    retention: timedelta = timedelta(days=7)
    concurrency: int = 8
    poll_interval: float = 0.5
    # How long a delivery's 2xx waits for others to share its mark's statement: at a provider's
    # pace a mark per event was a statement, and a look for the next heads, per event.
    mark_linger: float = 0.05
    retry_base: float = 1.0
    retry_max: float = 300.0
    prune_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.url is not None and not self.secret:
            raise ValueError("a delivery needs its secret")
        if not 0 <= self.mark_linger <= 1:
            raise ValueError("mark_linger must be within [0, 1] seconds")

    def retry_delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds before the next try after `attempts` failed ones: exponential, with jitter,
        never sooner than the receiver's Retry-After."""
        backoff = min(self.retry_max, self.retry_base * 2 ** max(0, attempts - 1))
        return max(backoff * random.uniform(0.5, 1.0), retry_after or 0.0)


class _Term(Protocol):
    fencing_token: int

    def valid(self) -> bool: ...


class _DeliveredMarks:
    """One term's 2xx answers, recorded together: `mark(event_id)` waits for its event's mark and
    says whether it was written. The marks that arrive within `linger` of a write's start, or
    while it is written, share one statement; a failed write fails each of its marks (the events
    stay pending: tried again)."""

    def __init__(self, store: OutboxStore, token: int, linger: float) -> None:
        self.store = store
        self.token = token
        self.linger = linger
        self._waiting: dict[str, asyncio.Future[bool]] = {}
        self._writer: asyncio.Task[None] | None = None

    async def mark(self, event_id: str) -> bool:
        future = self._waiting.get(event_id)
        if future is None:
            future = self._waiting[event_id] = asyncio.get_running_loop().create_future()
            # retrieved even when its delivery was cancelled meanwhile (no "never retrieved" noise)
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="events-delivered")
        # shielded: a cancelled delivery does not cancel the write of the others' marks
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Stops writing (the term is over): the marks not written stay pending events."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        for future in self._waiting.values():
            future.cancel()

    async def _write(self) -> None:
        try:
            if self.linger:
                await asyncio.sleep(self.linger)
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                try:
                    written = await self.store.delivered(self.token, batch.keys())
                except Exception as error:  # noqa: BLE001 - each delivery logs it
                    for future in batch.values():
                        if not future.done():
                            future.set_exception(error)
                    continue
                for event_id, future in batch.items():
                    if not future.done():
                        future.set_result(event_id in written)
        finally:
            self._writer = None


class EventRelay:
    """`run(term, ended)`: number, deliver and prune for the length of a leader term."""

    def __init__(self, db: Database, config: EventsConfig, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """`transport` replaces the aiohttp-backed one (tests)."""
        self.store = OutboxStore(db)
        self.config = config
        self._webhook = Webhook(config.secret) if config.url and config.secret else None
        self._endpoint = endpoint_key(config.url) if config.url else None
        self._transport = transport
        self._wake = asyncio.Event()
        # When a try of this relay met 410 (the loop's clock): delivery stops at once, not at the
        # next numbering (which reads the endpoint's mark), else the head went again until then
        self._gone_at: float | None = None

    async def run(self, term: _Term, ended: asyncio.Future[bool]) -> None:
        """Until the term ends: number, deliver, prune. A try in flight at the end is abandoned."""
        transport = self._transport or (pooled_transport(self.config.concurrency) if self._webhook else None)
        in_flight: dict[str, asyncio.Task[None]] = {}
        marks = _DeliveredMarks(self.store, term.fencing_token, self.config.mark_linger)
        loop = asyncio.get_running_loop()
        next_prune = next_number = loop.time()
        gone: str | None = None
        try:
            while term.valid() and not ended.done():
                self._wake.clear()
                try:
                    # numbered every poll_interval; a delivery that ends wakes the loop only to send
                    # its appointment's next event (a numbering per delivery cost reads per event)
                    if loop.time() >= next_number:
                        looked = loop.time()
                        next_number = looked + self.config.poll_interval
                        gone = await self._number(term)
                        if self._gone_at is not None and self._gone_at < looked and gone != self._endpoint:
                            self._gone_at = None  # resumed (`reminders events-resume`) since that 410
                    if transport is not None and gone != self._endpoint and self._gone_at is None:
                        await self._start(term, transport, marks, in_flight)
                    if loop.time() >= next_prune:
                        next_prune = loop.time() + self.config.prune_interval
                        await self._prune(term)
                except StaleTerm:
                    return
                except Exception as error:  # noqa: BLE001 - a DB outage must not end the term
                    log.warning("events relay: %s", type(error).__name__)
                wake = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({ended, wake}, timeout=self.config.poll_interval,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
        finally:
            for task in in_flight.values():
                task.cancel()
            await asyncio.gather(*in_flight.values(), return_exceptions=True)
            await marks.close()
            if transport is not None and transport is not self._transport:
                await transport.aclose()

    async def _number(self, term: _Term) -> str | None:
        """Number what waits; the endpoint key that answered 410, if any."""
        waiting, gone = await self.store.unnumbered()
        if waiting:
            while await self.store.number(term.fencing_token, batch=_NUMBER_BATCH) == _NUMBER_BATCH and term.valid():
                pass
        return gone

    async def _start(self, term: _Term, transport: httpx.AsyncBaseTransport, marks: _DeliveredMarks,
                     in_flight: dict[str, asyncio.Task[None]]) -> None:
        free = self.config.concurrency - len(in_flight)
        if free <= 0:
            return
        for head in await self.store.heads(free + len(in_flight)):
            key = head.appointment_id or f"event:{head.id}"
            if key in in_flight:
                continue  # its appointment's event in flight is the older one: this one waits
            task = asyncio.create_task(self._deliver(term, transport, marks, head), name=f"event-{head.id}")
            in_flight[key] = task
            task.add_done_callback(lambda _t, k=key: (in_flight.pop(k, None), self._wake.set()))
            free -= 1
            if free == 0:
                return

    async def _prune(self, term: _Term) -> None:
        total = 0
        while True:
            pruned = await self.store.prune(term.fencing_token, self.config.retention, batch=_PRUNE_BATCH)
            total += pruned
            if pruned < _PRUNE_BATCH:
                break
        if total:
            log.info("events: %d older than EVENTS_RETENTION (%s) deleted", total, self.config.retention)

    # -- one try -----------------------------------------------------------------------------------

    async def _deliver(self, term: _Term, transport: httpx.AsyncBaseTransport, marks: _DeliveredMarks,
                       head: Head) -> None:
        token = term.fencing_token
        try:
            if head.now - head.created_at >= self.config.max_age:  # e.g. a retry picked up late, or a backlog
                reason = "EVENTS_MAX_AGE passed before " + ("the next try" if head.attempts else "a try")
                if await self.store.give_up(token, head.id, reason):
                    self._given_up(head, reason, tries=head.attempts)
                return
            try:
                response = await post_guarded(lambda request: send_capped(transport, request), self.config.url or "",
                                              self._headers(head), head.body.encode(), may_send=term.valid,
                                              timeout=self.config.timeout)
            except SendRefused:
                return  # the term ended as it was sent: nothing left; the next leader sends it
            except (httpx.HTTPError, OSError, TimeoutError) as error:
                await self._failed(token, head, describe_failure(error), None)
                return
            status = response.status_code
            if 200 <= status < 300:
                if await marks.mark(head.id):
                    EVENT_DELIVERIES.labels("delivered").inc()
            elif status == 410:
                await self._gone(head)
            else:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await self._failed(token, head, f"HTTP {status}", retry_after)
        except Exception as error:  # noqa: BLE001 - the row stays pending: tried again
            log.warning("event %s: its delivery could not be recorded (%s)", head.id, type(error).__name__)

    def _headers(self, head: Head) -> dict[str, str]:
        """Standard Webhooks' headers: the event's id (the same on every try), this try's time and
        the signature of both with the body."""
        assert self._webhook is not None
        now = datetime.now(UTC)
        return {"Content-Type": "application/json", "User-Agent": _USER_AGENT, "webhook-id": head.id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": self._webhook.sign(head.id, now, head.body)}

    async def _failed(self, token: int, head: Head, error: str, retry_after: float | None) -> None:
        delay = self.config.retry_delay(head.attempts + 1, retry_after)
        state = await self.store.failed(token, head.id, error, retry_in=timedelta(seconds=delay),
                                        max_age=self.config.max_age)
        if state == Delivery.PENDING:
            EVENT_DELIVERIES.labels("failed").inc()
            log.info("event %s: try %d failed (%s); again in %.1f s", head.id, head.attempts + 1, error, delay)
        elif state == Delivery.GIVEN_UP:
            self._given_up(head, error, tries=head.attempts + 1)

    def _given_up(self, head: Head, error: str, *, tries: int) -> None:
        EVENT_DELIVERIES.labels("given_up").inc()
        log.warning("event %s (appointment %s) given up after %d tries, EVENTS_MAX_AGE (%s) after it: %s",
                    head.id, head.appointment_id, tries, self.config.max_age, error)

    async def _gone(self, head: Head) -> None:
        assert self._endpoint is not None
        await self.store.gone(self._endpoint)
        self._gone_at = asyncio.get_running_loop().time()
        EVENT_DELIVERIES.labels("gone").inc()
        log.error("EVENTS_URL answered 410 Gone to event %s: delivery stopped (events stay in the feed); "
                  "`reminders events-resume` delivers again", head.id)
