"""The long-running elector: campaign, lead, step down, campaign again — until shutdown.

Loop: connect → grant a lease (`LeaseSession`) → `Election.campaign` → on election, a `Term` is
created and ``on_started_leading(term)`` runs as a task → the term ends on the first of: local
lease deadline passed / lease unknown to etcd, own key deleted (e.g. ``etcdctl del``),
``max_term`` reached, the leading task returning or failing, shutdown → the leading task gets
``drain_timeout`` seconds to finish (then it is cancelled) → ``on_stopped_leading(term)`` →
the key is resigned (guarded by its create revision) when etcd can be expected to answer →
the old lease is revoked, in the background with backoff if etcd is unreachable (a restarted
etcd brings leases back with a fresh TTL: an unrevoked stale key would block the election for a
whole TTL) → campaign again with a new lease. Errors talking to etcd are logged (messages only,
never credentials) and retried with capped, jittered backoff; the loop never ends by itself.

Guarantee: `is_leader` / `Term.valid()` are true only while this replica's key is the oldest
under the prefix and its lease cannot have expired on the server (see `LeaseSession`). A term
ends locally *before* its key is deleted, so two electors of this kind never both believe they
lead (up to the margin: clock-rate and process-pause caveats in `session.py`).

Shutdown is quick: the term ends at once, an idle leading task returns at once, the resign txn
deletes the key (the successor, watching exactly that key, is elected in milliseconds), then
the lease is revoked (removing a follower's queued key as well).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aetcd
from aetcd import rpc

from .aio import cancel_and_wait, close_quietly, raise_if_cancelling
from .backoff import Backoff
from .client import call, connect
from .config import ElectionConfig
from .election import Election, LeaderInfo
from .errors import ElectionError, EtcdError
from .session import LeaseSession, revoke_lease
from .term import Term

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Term-end reasons after which the key is already gone or etcd is unreachable: no resign.
_NO_RESIGN_PREFIXES = ("lease lost", "election key deleted")


# Seconds between attempts while etcd refuses this replica's credentials.
AUTH_RETRY_DELAY = 30.0
_AUTH_FAILURE_TEXTS = ("authentication failed", "invalid user ID or password", "user name is empty")


def is_auth_failure(error: BaseException) -> bool:
    """True when etcd refused the credentials (not an expired token, which a new client fixes)."""
    if not isinstance(error, EtcdError):
        return False
    text = str(error)
    return any(marker in text for marker in _AUTH_FAILURE_TEXTS) or (
        error.code is not None and error.code.name == "PERMISSION_DENIED"
    )


class Elector:
    """Keeps one replica in the election for as long as `run()` runs.

    Metrics hooks (optional, synchronous, exceptions ignored): ``on_keepalive(rtt_seconds)``,
    ``on_keepalive_failure()``, ``on_transition(is_leader)`` on every start and end of a term,
    ``on_error()`` on every failed election cycle.
    """

    def __init__(
        self,
        config: ElectionConfig,
        *,
        on_started_leading: Callable[[Term], Awaitable[None]],
        on_stopped_leading: Callable[[Term], Awaitable[None]] | None = None,
        drain_timeout: float = 10.0,
        on_keepalive: Callable[[float], None] | None = None,
        on_keepalive_failure: Callable[[], None] | None = None,
        on_transition: Callable[[bool], None] | None = None,
        on_error: Callable[[], None] | None = None,
        on_auth_failure: Callable[[], None] | None = None,
        revoke: Callable[[aetcd.Client, int, float], Awaitable[bool]] = revoke_lease,
        revoke_backoff: tuple[float, float] = (0.1, 0.5),
    ) -> None:
        self.config = config
        # How an old lease is revoked, and the (first, longest) delay between failed attempts.
        self._revoke = revoke
        self._revoke_backoff = revoke_backoff
        self._on_auth_failure = on_auth_failure
        # A configuration error (etcd refused the credentials), named for /leader and /readyz;
        # None once etcd grants a lease again.
        self.config_error: str | None = None
        self.last_retry_delay: float | None = None
        self.drain_timeout = drain_timeout
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._on_keepalive = on_keepalive
        self._on_keepalive_failure = on_keepalive_failure
        self._on_transition = on_transition
        self._on_error = on_error
        self._client = connect(config)
        self._election = Election(self._client, config.prefix, request_timeout=config.request_timeout)
        self._term: Term | None = None
        self._leader: LeaderInfo | None = None
        self._state = "idle"
        self._running = False
        self._stopping = False
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._shutdown_drain: float | None = None
        self._observer: asyncio.Task[None] | None = None
        self._revokers: set[asyncio.Task[None]] = set()
        # Set (and replaced) whenever etcd grants this elector a lease: pending revokes retry then
        # instead of at their next backoff tick, so stale keys go as soon as etcd is back.
        self._etcd_answered = asyncio.Event()

    # -- status ----------------------------------------------------------------------------------

    @property
    def instance(self) -> str:
        return self.config.name

    @property
    def term(self) -> Term | None:
        """The current term while leading (it may have just become invalid), else None."""
        return self._term

    @property
    def is_leader(self) -> bool:
        term = self._term
        return term is not None and term.valid()

    @property
    def fencing_token(self) -> int | None:
        term = self._term
        return term.fencing_token if term is not None and term.valid() else None

    @property
    def leader_name(self) -> str | None:
        """Name of the leader per etcd (own name while leading); None if none or unknown."""
        if self.is_leader:
            return self.config.name
        return self._leader.name if self._leader is not None else None

    @property
    def state(self) -> str:
        """idle | campaigning | leading | backoff | stopped."""
        return self._state

    async def etcd_healthy(self, timeout: float = 1.0) -> bool:
        """True if etcd answers a linearizable read within `timeout` seconds."""
        request = rpc.RangeRequest(key=(self.config.prefix + "/").encode(), count_only=True)
        try:
            async with asyncio.timeout(timeout):
                await call(self._client, "Range", "kvstub", request, timeout)
        except Exception:  # noqa: BLE001 - any failure means "not healthy"
            return False
        return True

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Campaign and lead until `shutdown()` (or cancellation). Never returns on its own."""
        if self._running:
            raise RuntimeError("Elector.run() is already running")
        self._running = True
        self._done.clear()
        self._observer = asyncio.create_task(self._observe_loop(), name=f"elector-observe-{self.instance}")
        backoff = Backoff(0.25, 2.0)  # capped low: a restarted etcd should see us back quickly
        try:
            while not self._stopping:
                raise_if_cancelling()
                if await self._cycle():
                    backoff.reset()
                    delay = random.uniform(0, 0.05)
                elif self.config_error is not None:
                    # wrong credentials do not fix themselves: retry slowly, not every 2 s forever
                    delay = AUTH_RETRY_DELAY * random.uniform(0.8, 1.0)
                else:
                    delay = backoff.next()
                self.last_retry_delay = delay
                if self._stopping:
                    break
                self._state = "backoff"
                try:
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                except TimeoutError:
                    pass
        finally:
            await self._finish()

    async def _finish(self) -> None:
        await cancel_and_wait(self._observer, *self._revokers)
        self._observer = None
        self._leader = None
        await close_quietly(self._client)
        self._state = "stopped"
        self._running = False
        self._done.set()

    async def _cycle(self) -> bool:
        """One lease's life: grant, campaign, maybe lead. False when it failed on an error."""
        session: LeaseSession | None = None
        cancelled = False
        try:
            self._state = "campaigning"
            session = await LeaseSession.grant(
                self._client,
                ttl=self.config.lease_ttl,
                margin=self.config.effective_margin,
                request_timeout=self.config.request_timeout,
                on_keepalive=self._on_keepalive,
                on_keepalive_failure=self._on_keepalive_failure,
            )
            self._heard_from_etcd()
            self.config_error = None
            term = await self._until_stopped(self._election.campaign(session, self.config.name))
            if term is not None:
                await self._lead(term)
            return True
        except asyncio.CancelledError:
            cancelled = True
            raise
        except ElectionError as error:
            if is_auth_failure(error):
                self.config_error = "etcd refused the credentials: check ETCD_USERNAME and ETCD_PASSWORD"
                log.error("configuration error: %s (%s); retrying in about %.0f s",
                          self.config_error, error, AUTH_RETRY_DELAY)
                self._hook(self._on_auth_failure)
                self._hook(self._on_error)
                return False
            log.warning("election cycle for %s failed: %s: %s", self.instance, type(error).__name__, error)
            self._hook(self._on_error)
            if isinstance(error, EtcdError) and error.code is not None and error.code.name == "UNAUTHENTICATED":
                await self._reset_client()
            return False
        except Exception:
            log.exception("election cycle for %s failed unexpectedly", self.instance)
            self._hook(self._on_error)
            return False
        finally:
            if session is not None:
                if self._stopping or cancelled:
                    try:
                        async with asyncio.timeout(self.config.request_timeout + 0.5):
                            await session.revoke()
                    except BaseException:  # noqa: BLE001 - best effort on the way out
                        pass
                else:
                    await session.close()
                    self._revoke_in_background(session.lease_id)

    async def _until_stopped(self, awaitable: Awaitable[T]) -> T | None:
        """Await `awaitable` unless shutdown starts first (then cancel it and return None)."""
        work = asyncio.ensure_future(awaitable)
        if self._stop.is_set():
            await cancel_and_wait(work)
            return None
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(work, stop)
        if work.cancelled():
            return None
        return work.result()

    async def _lead(self, term: Term) -> None:
        if self._stopping:  # elected just as shutdown began: hand the key straight back
            term._end("shutdown")
        elif not term.valid():  # the lease went while the campaign returned
            term._end("lease lost: deadline passed")
        if term.ended.is_set():
            await self._resign_if_needed(term)
            return
        self._term = term
        self._state = "leading"
        log.info("%s leads: term %d, key %s", self.instance, term.fencing_token, term.key)
        self._hook(self._on_transition, True)
        loop = asyncio.get_running_loop()
        leading = asyncio.create_task(self._run_leading(term), name=f"leading-{term.fencing_token}")
        key_watch = asyncio.create_task(self._watch_own_key(term), name=f"own-key-{term.fencing_token}")
        timer = None
        if self.config.max_term is not None:
            timer = loop.call_later(self.config.max_term, term._end, "max_term reached")
        try:
            await term.wait_ended()
        except asyncio.CancelledError:
            term._end("cancelled")
            leading.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            await cancel_and_wait(key_watch)
        drain = self._shutdown_drain if self._stopping and self._shutdown_drain is not None else self.drain_timeout
        if not leading.done():
            await asyncio.wait({leading}, timeout=drain)
        if not leading.done():
            log.warning("leading task of term %d still running after %.1f s: cancelling it", term.fencing_token, drain)
            await cancel_and_wait(leading, timeout=max(1.0, drain))
        if self._on_stopped is not None:
            try:
                async with asyncio.timeout(max(1.0, drain)):
                    await self._on_stopped(term)
            except Exception:
                log.exception("on_stopped_leading failed")
        self._term = None
        self._hook(self._on_transition, False)
        await self._resign_if_needed(term)

    async def _resign_if_needed(self, term: Term) -> None:
        """Delete the key of an ended term unless it is gone already or etcd is unreachable."""
        if (term.reason or "").startswith(_NO_RESIGN_PREFIXES):
            return
        try:
            await self._election.resign(term)
        except ElectionError as error:
            log.warning("resigning term %d failed (the lease revoke follows): %s", term.fencing_token, error)

    async def _run_leading(self, term: Term) -> None:
        try:
            await self._on_started(term)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("on_started_leading failed: stepping down")
            term._end("leading task failed")
            return
        term._end("leading task returned")

    async def _watch_own_key(self, term: Term) -> None:
        """End the term if its key is deleted or replaced behind our back."""
        await self._election.wait_deleted(term.key, term.fencing_token)
        term._end("election key deleted")

    async def _observe_loop(self) -> None:
        while True:
            raise_if_cancelling()
            try:
                async for info in self._election.observe():
                    self._leader = info
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("observing the election failed")
                self._leader = None
                await asyncio.sleep(1.0)

    def _revoke_in_background(self, lease_id: int) -> None:
        task = asyncio.create_task(self._revoke_until_done(lease_id), name=f"revoke-{lease_id:x}")
        self._revokers.add(task)
        task.add_done_callback(self._revokers.discard)

    async def _revoke_until_done(self, lease_id: int) -> None:
        # Every candidate's stale key must go before anyone is elected after an outage, so the
        # election waits for the *slowest* revoke: a short cap keeps that from growing with the
        # number of candidates (a revoke is one small RPC; failing ones fail fast).
        backoff = Backoff(*self._revoke_backoff)
        while not await self._revoke(self._client, lease_id, self.config.request_timeout):
            raise_if_cancelling()
            answered = self._etcd_answered
            try:
                async with asyncio.timeout(backoff.next()):
                    await answered.wait()
            except TimeoutError:
                pass

    def _heard_from_etcd(self) -> None:
        self._etcd_answered.set()
        self._etcd_answered = asyncio.Event()

    async def _reset_client(self) -> None:
        """A new client (new channel, new auth token, endpoints re-resolved)."""
        old = self._client
        self._client = connect(self.config)
        self._election = Election(self._client, self.config.prefix, request_timeout=self.config.request_timeout)
        if self._observer is not None:
            await cancel_and_wait(self._observer)
            self._observer = asyncio.create_task(self._observe_loop(), name=f"elector-observe-{self.instance}")
        await close_quietly(old)

    @staticmethod
    def _hook(hook: Callable[..., None] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.exception("elector metrics hook failed")

    # -- shutdown --------------------------------------------------------------------------------

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop leading and campaigning: end the term ("shutdown"), give the leading task up to
        `drain_timeout` seconds, resign, revoke the lease, stop `run()`. Idempotent."""
        drain = self.drain_timeout if drain_timeout is None else drain_timeout
        self._shutdown_drain = drain
        self._stopping = True
        self._stop.set()
        term = self._term
        if term is not None:
            term._end("shutdown")
        if self._running:
            # the drain, then on_stopped + resign + revoke (each etcd call bounded by request_timeout)
            bound = drain + 3 * self.config.request_timeout + 2
            try:
                async with asyncio.timeout(bound):
                    await self._done.wait()
            except TimeoutError:
                log.warning("elector %s did not stop within %.1f s", self.instance, bound)
        elif self._state != "stopped":
            await close_quietly(self._client)
            self._state = "stopped"
