"""Go-compatible leader election on etcd (``client/v3/concurrency/election.go``).

Layout, identical to Go's ``concurrency.NewElection(session, prefix)``: each candidate writes
``<prefix>/<lease id in lowercase hex>`` = its value, attached to its lease. The candidate whose
key has the smallest create revision leads. Go clients and ``etcdctl elect`` can therefore
campaign against, or observe, the same prefix.

Campaign, as Go does it: a txn creates the key if absent (else reads it back, and proclaims if
the value differs); then the candidate waits, one key at a time, for the deletion of the newest
key created before its own (sort CREATE desc, limit 1, max_create_revision = own - 1), watching
only that key — deleting the leader wakes exactly one successor, no herd.

Better than Go: after waking, the candidate re-reads its own key and requires the same create
revision (the key may have been deleted meanwhile, e.g. ``etcdctl del``); and the wait is raced
against the session's local deadline, so a candidate whose lease may have expired never
returns as leader. Transient etcd errors while waiting are retried with backoff as long as the
session is valid.

Limits: the election is only as exclusive as the lease: see `LeaseSession`/`Term`. One
`Election` object runs one campaign at a time (like Go's). A cancelled or failed campaign
leaves the key in place: close the session by revoking its lease (or let it expire).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd import rpc
from aetcd.utils import prefix_range_end

from .aio import cancel_and_wait, raise_if_cancelling
from .backoff import Backoff
from .client import call
from .errors import ETCD_FAILURES, CompactedError, EtcdError, NotLeader, SessionLost, translate
from .session import LeaseSession
from .term import Term

log = logging.getLogger(__name__)

_UNSET: Any = object()


@dataclass(frozen=True)
class LeaderInfo:
    """The current leader as etcd sees it: its key, its value (the name) and create revision."""

    key: str
    name: str
    create_revision: int


def _to_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _create_equals(key: bytes, revision: int) -> Any:
    return rpc.Compare(key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=revision)


class Election:
    """Campaign, resign, proclaim and observe on one election prefix."""

    def __init__(self, client: aetcd.Client, prefix: str, *, request_timeout: float = 2.0) -> None:
        self.client = client
        self.prefix = prefix
        self.request_timeout = request_timeout
        self._key_prefix = (prefix + "/").encode()
        self._range_end = prefix_range_end(self._key_prefix)
        #: Diagnostic: the predecessor key the running campaign currently waits on.
        self.waiting_for: str | None = None

    def key_for(self, session: LeaseSession) -> str:
        """The key a session campaigns with: ``<prefix>/<lease id hex>`` (Go's ``%x``)."""
        return f"{self.prefix}/{session.lease_id:x}"

    # -- raw requests ----------------------------------------------------------------------------

    async def _range(self, key: bytes, range_end: bytes = b"", **fields: Any) -> Any:
        request = rpc.RangeRequest(key=key, range_end=range_end, **fields)
        return await call(self.client, "Range", "kvstub", request, self.request_timeout)

    async def _txn(self, compare: list[Any], success: list[Any], failure: list[Any] | None = None) -> Any:
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure or [])
        return await call(self.client, "Txn", "kvstub", request, self.request_timeout)

    async def _first(self, *, newest: bool, max_create_revision: int = 0) -> Any:
        """Oldest (or newest) key under the prefix, by create revision."""
        return await self._range(
            self._key_prefix,
            self._range_end,
            sort_target=rpc.RangeRequest.CREATE,
            sort_order=rpc.RangeRequest.DESCEND if newest else rpc.RangeRequest.ASCEND,
            limit=1,
            max_create_revision=max_create_revision,
        )

    async def _watch(self, key: bytes, start_revision: int, **options: Any) -> aetcd.Watch:
        try:
            async with asyncio.timeout(self.request_timeout + 1):
                return await self.client.watch(key, start_revision=start_revision, **options)
        except ETCD_FAILURES as error:
            raise translate(error) from error

    @staticmethod
    async def _cancel_watch(watch: aetcd.Watch) -> None:
        try:
            async with asyncio.timeout(1.0):
                await watch.cancel()
        except Exception:  # noqa: BLE001 - best effort; a broken stream drops it anyway
            pass

    # -- campaign --------------------------------------------------------------------------------

    async def campaign(self, session: LeaseSession, value: str | bytes) -> Term:
        """Block until this session leads; return the `Term`.

        Raises `SessionLost` if the session is lost before that, `NotLeader` if the own key was
        deleted or replaced meanwhile, `EtcdError` if the first write fails.
        """
        if not session.valid():
            raise SessionLost(f"session not valid: {session.lost_reason or 'deadline passed'}")
        data = _to_bytes(value)
        key = self.key_for(session)
        raw_key = key.encode()
        response = await self._txn(
            [_create_equals(raw_key, 0)],
            [rpc.RequestOp(request_put=rpc.PutRequest(key=raw_key, value=data, lease=session.lease_id))],
            [rpc.RequestOp(request_range=rpc.RangeRequest(key=raw_key))],
        )
        if response.succeeded:
            revision = response.header.revision
        else:
            existing = response.responses[0].response_range.kvs[0]
            revision = existing.create_revision
            if existing.value != data:
                await self._proclaim(raw_key, revision, data, session.lease_id)
        await self._race(self._wait_predecessors(revision), session)
        # Go stops here. The key may have gone while we waited (deleted by hand, lease expired):
        # only a key that still exists with our create revision makes us leader.
        mine = await self._range(raw_key)
        if not mine.kvs or mine.kvs[0].create_revision != revision:
            raise NotLeader(f"own key {key} vanished while waiting for predecessors")
        if not session.valid():
            raise SessionLost(f"session lost while campaigning: {session.lost_reason or 'deadline passed'}")
        return Term(key=key, fencing_token=revision, session=session)

    @staticmethod
    async def _race(awaitable: Any, session: LeaseSession) -> None:
        """Run `awaitable` unless the session is lost first (then raise `SessionLost`)."""
        work = asyncio.ensure_future(awaitable)
        lost = asyncio.ensure_future(session.lost.wait())
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(work, lost)
        if session.lost.is_set() or not work.done() or work.cancelled():
            raise SessionLost(f"session lost while campaigning: {session.lost_reason}")
        work.result()

    async def _wait_predecessors(self, revision: int) -> None:
        backoff = Backoff(0.05, 1.0)
        try:
            while revision > 1:
                raise_if_cancelling()
                try:
                    response = await self._first(newest=True, max_create_revision=revision - 1)
                    if not response.kvs:
                        return
                    predecessor = response.kvs[0].key
                    self.waiting_for = predecessor.decode(errors="replace")
                    await self._wait_delete(predecessor, response.header.revision + 1)
                    backoff.reset()
                except CompactedError:
                    continue  # re-read: the predecessor may be gone already
                except EtcdError as error:
                    log.debug("waiting for predecessors failed, retrying: %s", error)
                    await asyncio.sleep(backoff.next())
        finally:
            self.waiting_for = None

    async def _wait_delete(self, key: bytes, start_revision: int) -> None:
        watch = await self._watch(key, start_revision, kind=aetcd.EventKind.DELETE)
        try:
            async for event in watch:
                if event.kind == aetcd.EventKind.DELETE:
                    return
        except ETCD_FAILURES as error:
            raise translate(error) from error
        finally:
            await self._cancel_watch(watch)
        raise EtcdError("watch ended before the key was deleted")

    async def wait_deleted(self, key: str, create_revision: int) -> None:
        """Return once `key` no longer exists with `create_revision` (deleted, or deleted and
        re-created). Watches only that key; etcd errors and compaction are retried until the
        caller cancels."""
        raw_key = key.encode()
        start = create_revision + 1
        check = False
        backoff = Backoff(0.1, 2.0)
        while True:
            raise_if_cancelling()
            try:
                if check:
                    current = await self._range(raw_key)
                    if not current.kvs or current.kvs[0].create_revision != create_revision:
                        return
                    start = current.header.revision + 1
                    check = False
                await self._wait_delete(raw_key, start)
                return
            except CompactedError:
                check = True
            except EtcdError as error:
                log.debug("watching %s failed, retrying: %s", key, error)
                check = True
                await asyncio.sleep(backoff.next())

    # -- leader's operations --------------------------------------------------------------------

    async def _proclaim(self, raw_key: bytes, revision: int, data: bytes, lease_id: int) -> None:
        response = await self._txn(
            [_create_equals(raw_key, revision)],
            [rpc.RequestOp(request_put=rpc.PutRequest(key=raw_key, value=data, lease=lease_id))],
        )
        if not response.succeeded:
            raise NotLeader(f"{raw_key.decode(errors='replace')} no longer has create revision {revision}")

    async def proclaim(self, term: Term, value: str | bytes) -> None:
        """Change the leader's value without a new election (guarded by the create revision)."""
        if not term.valid():
            raise NotLeader("term is not valid")
        try:
            await self._proclaim(term.key.encode(), term.fencing_token, _to_bytes(value), term._lease_session.lease_id)
        except NotLeader:
            term._end("key lost")
            raise

    async def resign(self, term: Term) -> bool:
        """End `term` locally, then delete its key if it still has the term's create revision.

        The local end comes first, so this replica stops acting before a successor can be
        elected. True if the key was deleted, False if it was already gone or replaced.
        Raises `EtcdError` when etcd does not answer (the lease then expires by itself).
        """
        term._end("resigned")
        raw_key = term.key.encode()
        response = await self._txn(
            [_create_equals(raw_key, term.fencing_token)],
            [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=raw_key))],
        )
        return bool(response.succeeded)

    # -- observers -------------------------------------------------------------------------------

    async def _leader_at(self) -> tuple[LeaderInfo | None, int]:
        response = await self._first(newest=False)
        if not response.kvs:
            return None, response.header.revision
        kv = response.kvs[0]
        info = LeaderInfo(kv.key.decode(errors="replace"), kv.value.decode(errors="replace"), kv.create_revision)
        return info, response.header.revision

    async def leader(self) -> LeaderInfo | None:
        """The current leader (oldest key under the prefix), or None. Raises `EtcdError`."""
        info, _ = await self._leader_at()
        return info

    async def observe(self) -> AsyncIterator[LeaderInfo | None]:
        """Yield the leader on every change: a `LeaderInfo`, or None when there is no leader or
        it cannot be known (etcd unreachable). Never ends by itself: errors are retried with
        backoff, a compacted watch is resumed from a fresh read (aetcd raises RevisionCompactedError for it)."""
        last: LeaderInfo | None = _UNSET
        backoff = Backoff(0.1, 2.0)
        while True:
            raise_if_cancelling()
            watch: aetcd.Watch | None = None
            try:
                info, revision = await self._leader_at()
                if info != last:
                    last = info
                    yield info
                if info is None:
                    # no leader: wait for any key to appear under the prefix, then re-read
                    watch = await self._watch(
                        self._key_prefix, revision + 1, range_end=self._range_end, kind=aetcd.EventKind.PUT
                    )
                    async for _event in watch:
                        break
                    else:
                        raise EtcdError("watch ended")
                else:
                    # follow the leader's key: value changes are yielded, its deletion re-reads
                    watch = await self._watch(info.key.encode(), revision + 1)
                    deleted = False
                    async for event in watch:
                        if event.kind == aetcd.EventKind.DELETE:
                            deleted = True
                            break
                        update = LeaderInfo(info.key, event.kv.value.decode(errors="replace"), info.create_revision)
                        if update != last:
                            last = update
                            yield update
                    if not deleted:
                        raise EtcdError("watch ended")
                backoff.reset()
            except ETCD_FAILURES as error:
                problem = translate(error)
                if isinstance(problem, CompactedError):
                    continue
                log.debug("observing %s failed, retrying: %s", self.prefix, problem)
                if last is not None:
                    last = None
                    yield None
                await asyncio.sleep(backoff.next())
            finally:
                if watch is not None:
                    await self._cancel_watch(watch)
