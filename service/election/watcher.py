"""aetcd's watch stream, with watch creations that may be cancelled or time out safely.

One gRPC stream carries all of a client's watches. etcd answers each creation request on it with
one "created" answer, in order, naming no request, so aetcd 1.0 lets one creation be in flight at
a time and holds the stream's lock around it. Two of its paths break when a creation's caller
leaves early (Python 3.11, both measured with etcd paused):

* It waits for the answer with ``asyncio.wait_for``, which in 3.11 runs the wait in a task of its
  own; that task takes the lock back. A caller cancelled twice (`cancel_and_wait` re-cancels
  every 0.2 s) leaves before the lock is back and releases a hold of another task. That task's
  own release then fails ("Lock is not acquired"), the orphaned wait ends holding the lock, and
  every later watch on the client waits forever, uncancellable.
* A caller that leaves (cancelled, timed out) frees the in-flight slot at once, so the late
  answer to its request is taken for the next creation's: the next caller then watches the key
  the first one asked for, and its own answer is thrown away.

`Watcher` waits in the caller's task (``asyncio.timeout``), so a cancelled creation leaves only
with the lock in hand; and a creation left before its answer keeps the slot, marked abandoned,
until that answer comes (the watch it made is cancelled) or the stream ends. A creation refused
by etcd (permission denied) raises instead of returning a watch that never fires. The rest is
aetcd's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aetcd
from aetcd import exceptions
from aetcd.watcher import WatcherCallback

__all__ = ["Watcher"]


class _Creation(WatcherCallback):
    """A watch being created. `abandoned`: its caller left before etcd's answer came."""

    abandoned = False


class Watcher(aetcd.Watcher):
    """``aetcd.Watcher`` whose creations survive repeated cancellation and late answers."""

    async def add_callback(
        self,
        key: bytes,
        callback: Callable[..., Any],
        range_end: bytes | None = None,
        start_revision: int | None = None,
        progress_notify: bool = False,
        kind: aetcd.EventKind | None = None,
        prev_kv: bool = False,
        watch_id: int | None = None,
        fragment: bool = False,
    ) -> WatcherCallback:
        """Create a watch on the stream and route its events to `callback` (aetcd's contract)."""
        async with self._lock:
            await self._wait_for_slot()
            creation = _Creation(callback)
            creation.prev_kv = prev_kv
            self._new_callback = creation
            try:
                await self._enqueue_watch_create(
                    key,
                    range_end=range_end,
                    start_revision=start_revision,
                    progress_notify=progress_notify,
                    kind=kind,
                    prev_kv=prev_kv,
                    watch_id=watch_id,
                    fragment=fragment,
                )
            except BaseException:
                self._free_slot()  # not queued: no answer will come
                raise
            try:
                async with asyncio.timeout(self._timeout):
                    while creation.watch_id is None and creation.error is None:
                        await self._new_callback_ready.wait()
            except BaseException as error:
                if creation.watch_id is None and creation.error is None:
                    creation.abandoned = True  # its answer frees the slot (`_handle_response`)
                else:
                    self._free_slot()
                    if creation.watch_id is not None:
                        self._drop(creation.watch_id)
                if isinstance(error, TimeoutError):
                    raise exceptions.WatchTimeoutError from None
                raise
            self._free_slot()
            if creation.error is not None:
                raise creation.error
            return creation

    async def _wait_for_slot(self) -> None:
        """Wait (lock held) until no other creation is in flight on the stream; leave with a
        stream running."""
        while True:
            await self.setup()  # a stream must run: for the answer awaited, then for ours
            pending = self._new_callback
            if pending is None:
                return
            if pending.abandoned and pending.error is not None:
                self._new_callback = None  # the stream it was sent on ended: no answer will come
                return
            await self._new_callback_ready.wait()

    def _free_slot(self) -> None:
        self._new_callback = None
        self._new_callback_ready.notify_all()

    def _drop(self, watch_id: int) -> None:
        """Forget a watch nobody reads and ask etcd to cancel it (best effort: a full queue
        leaves it to the stream's end; its events are ignored meanwhile)."""
        self._callbacks.pop(watch_id, None)
        try:
            self._request_queue.put_nowait(self._build_watch_cancel_request(watch_id))
        except asyncio.QueueFull:
            pass

    async def _handle_response(self, response: Any) -> None:
        if not response.created:
            await super()._handle_response(response)
            return
        async with self._lock:  # one section: the slot cannot change between reading and settling it
            creation = self._new_callback
            if creation is None or creation.abandoned:
                if creation is not None:
                    self._free_slot()
                if not response.canceled:
                    await self._enqueue_watch_cancel(watch_id=response.watch_id)
                return
            if response.compact_revision != 0:
                creation.error = exceptions.RevisionCompactedError(response.compact_revision)
            elif response.canceled:
                creation.error = exceptions.ClientError(f"etcd refused the watch: {response.cancel_reason}")
            else:
                self._callbacks[response.watch_id] = creation
                creation.watch_id = response.watch_id
            self._new_callback_ready.notify_all()
