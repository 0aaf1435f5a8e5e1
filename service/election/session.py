"""A lease kept alive, with a local deadline the holder can trust without asking etcd.

Guarantee: while `valid()` is true, etcd cannot have expired the lease — *provided* the local
monotonic clock runs at a sane rate and etcd honours the TTL it granted. The local deadline is

    send time of the last acknowledged keepalive (or of the grant) + ttl - margin

measured on ``time.monotonic()``. The server starts the TTL when it *receives* that request,
which is after we sent it, so our deadline is at least ``margin`` seconds earlier than the
earliest moment the server could expire the lease and let a successor in.

Each keepalive is bounded by min(request_timeout, half the validity left), so a stuck attempt
leaves time for a retry (through another endpoint, with several) before the deadline.

Loss is detected two ways and `lost` is set by whichever comes first (it is sticky: once
`valid()` turned false it never turns true again):

* a timer fires at the deadline if no fresher acknowledgement moved it (a frozen or partitioned
  etcd produces no answer at all, so waiting for the next keepalive's failure is not enough);
* a keepalive answer with TTL <= 0 means the server no longer knows the lease.

Limits: a process paused (GC, SIGSTOP, VM steal) between `valid()` and the action it guards can
act after the deadline: fencing tokens cover that. `close()` stops renewing without telling etcd
(the lease then lives until its TTL); `revoke()` deletes it and every key attached to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aetcd
from aetcd import rpc

from .aio import cancel_and_wait, raise_if_cancelling
from .client import call
from .errors import ETCD_FAILURES, EtcdError, translate

log = logging.getLogger(__name__)


class LeaseSession:
    """One etcd lease, renewed every (ttl - margin)/3 seconds until closed or lost.

    Build one with ``await LeaseSession.grant(client, ttl=..., margin=...)``.
    Hooks (all optional, called synchronously, exceptions ignored): ``on_keepalive(rtt_seconds)``
    after each acknowledged keepalive, ``on_keepalive_failure()`` after each failed one.
    """

    def __init__(
        self,
        client: aetcd.Client,
        lease_id: int,
        *,
        ttl: float,
        margin: float,
        granted_at: float,
        request_timeout: float = 2.0,
        on_keepalive: Callable[[float], None] | None = None,
        on_keepalive_failure: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.margin = margin
        # three keepalives fit between the last acknowledged one and the local deadline
        self.interval = (ttl - margin) / 3
        self.request_timeout = request_timeout
        self._lease_id = lease_id
        self._deadline = granted_at + ttl - margin
        self._last_ack_sent = granted_at
        self._on_keepalive = on_keepalive
        self._on_keepalive_failure = on_keepalive_failure
        self._lost_callbacks: list[Callable[[str], None]] = []
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self._closed = False
        self._tasks = [
            asyncio.create_task(self._keepalive_loop(), name=f"lease-keepalive-{lease_id:x}"),
            asyncio.create_task(self._expiry_timer(), name=f"lease-deadline-{lease_id:x}"),
        ]

    @classmethod
    async def grant(
        cls,
        client: aetcd.Client,
        *,
        ttl: int,
        margin: float,
        request_timeout: float = 2.0,
        on_keepalive: Callable[[float], None] | None = None,
        on_keepalive_failure: Callable[[], None] | None = None,
    ) -> LeaseSession:
        """Grant a lease of `ttl` seconds and start keeping it alive. Raises `EtcdError`."""
        sent = time.monotonic()
        response = await call(client, "LeaseGrant", "leasestub", rpc.LeaseGrantRequest(TTL=ttl), request_timeout)
        if response.error:
            raise EtcdError(f"lease grant refused: {response.error}")
        # etcd may round a small TTL up; the smaller of the two is the safe one to count with.
        effective = min(ttl, response.TTL) if response.TTL > 0 else ttl
        return cls(
            client,
            response.ID,
            ttl=effective,
            margin=margin,
            granted_at=sent,
            request_timeout=request_timeout,
            on_keepalive=on_keepalive,
            on_keepalive_failure=on_keepalive_failure,
        )

    # -- state ---------------------------------------------------------------------------------

    @property
    def lease_id(self) -> int:
        return self._lease_id

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` instant after which the lease must be treated as gone."""
        return self._deadline

    def remaining(self) -> float:
        """Seconds until the local deadline (0 once lost)."""
        if self.lost.is_set():
            return 0.0
        return max(0.0, self._deadline - time.monotonic())

    def valid(self) -> bool:
        """True while the lease is renewed and its local deadline has not passed."""
        return not self.lost.is_set() and time.monotonic() < self._deadline

    def add_lost_callback(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` synchronously when the session is lost (at once if it is)."""
        if self.lost.is_set():
            callback(self.lost_reason or "lost")
        else:
            self._lost_callbacks.append(callback)

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        if reason != "closed":
            log.warning("lease %x lost: %s", self._lease_id, reason)
        for callback in self._lost_callbacks:
            try:
                callback(reason)
            except Exception:
                log.exception("lease-lost callback failed")
        self._lost_callbacks.clear()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    # -- background tasks ----------------------------------------------------------------------

    async def _expiry_timer(self) -> None:
        while not self.lost.is_set():
            delay = self._deadline - time.monotonic()
            if delay <= 0:
                self._lose("no keepalive acknowledged before the local deadline")
                return
            await asyncio.sleep(delay)

    async def _keepalive_once(self, timeout: float) -> int:
        """Send one keepalive; the server's remaining TTL for the lease (<= 0: unknown lease)."""
        await self.client.connect()
        stream = self.client.leasestub.LeaseKeepAlive(
            [rpc.LeaseKeepAliveRequest(ID=self._lease_id)], timeout=timeout, metadata=self.client.metadata
        )
        try:
            async for reply in stream:
                return reply.TTL
        finally:
            stream.cancel()
        raise EtcdError("keepalive stream closed without an answer")

    async def _keepalive_loop(self) -> None:
        next_send = self._last_ack_sent + self.interval
        retry = min(0.5, self.interval / 4)
        while not self.lost.is_set():
            raise_if_cancelling()
            delay = next_send - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.monotonic()
            # at most half the validity left, so a stuck attempt leaves time for a retry
            # (possibly through another endpoint) before the deadline
            timeout = min(self.request_timeout, max(0.05, (self._deadline - sent) / 2))
            try:
                async with asyncio.timeout(timeout + 0.5):
                    ttl = await self._keepalive_once(timeout)
            except ETCD_FAILURES as error:
                self._hook(self._on_keepalive_failure)
                log.debug("keepalive of lease %x failed: %s", self._lease_id, translate(error))
                next_send = time.monotonic() + retry
                continue
            if ttl <= 0:
                self._hook(self._on_keepalive_failure)
                self._lose("etcd no longer knows the lease (expired or revoked)")
                return
            if self.lost.is_set():
                return
            if time.monotonic() >= self._deadline:  # too late: validity never comes back
                self._lose("no keepalive acknowledged before the local deadline")
                return
            self._hook(self._on_keepalive, time.monotonic() - sent)
            self._last_ack_sent = sent
            self._deadline = max(self._deadline, sent + min(self.ttl, ttl) - self.margin)
            next_send = sent + self.interval

    @staticmethod
    def _hook(hook: Callable[..., None] | None, *args: float) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.exception("session metrics hook failed")

    # -- ending --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop renewing (the lease stays on the server until it expires or is revoked)."""
        self._closed = True
        self._lose("closed")
        await cancel_and_wait(*(task for task in self._tasks if task is not asyncio.current_task()))

    async def revoke(self, timeout: float | None = None) -> bool:
        """Close, then revoke the lease (deleting its keys). True when etcd confirmed the lease
        is gone (revoked now or unknown already); errors are logged and swallowed."""
        await self.close()
        return await revoke_lease(self.client, self._lease_id, timeout or self.request_timeout)

    def __repr__(self) -> str:
        state = "valid" if self.valid() else f"lost ({self.lost_reason})"
        return f"LeaseSession(lease={self._lease_id:x}, ttl={self.ttl}, {state})"


async def revoke_lease(client: aetcd.Client, lease_id: int, timeout: float) -> bool:
    """Revoke `lease_id`; True if it is gone afterwards (NOT_FOUND counts), False on error."""
    try:
        await call(client, "LeaseRevoke", "leasestub", rpc.LeaseRevokeRequest(ID=lease_id), timeout)
    except EtcdError as error:
        if error.code is not None and error.code.name == "NOT_FOUND":
            return True
        log.info("revoking lease %x failed: %s", lease_id, error)
        return False
    return True
