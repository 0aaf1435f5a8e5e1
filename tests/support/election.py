"""Helpers shared by the election tests (no tests here).

Polling with a deadline is how the tests wait for a distributed state to converge; nothing
sleeps in place of synchronisation.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aetcd import rpc
from aetcd.utils import prefix_range_end

from service.election import ElectionConfig, Elector, Term, connect
from tests.support.waiting import poll_until

TTL = 3  # seconds: margin 1 s, keepalive every 1 s


@pytest.fixture(autouse=True)
async def grpc_events_of_closed_loops_ignored(anyio_backend: str) -> AsyncIterator[None]:
    """grpc.aio's completion-queue poller serves every event loop that ever used it and forwards
    a completion to the loop that started the call. Each test runs in a fresh loop, so the
    completion of a call cancelled as a previous test closed its channels can arrive after
    that loop closed: ``call_soon_threadsafe`` then raises "Event loop is closed" inside the
    current loop's callback, and anyio fails the current test for it (grpc/grpc#25364,
    #23377). Only that exact error is ignored; a single-loop process (the service) never sees
    it. Test modules import this fixture to activate it."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if (
            isinstance(error, RuntimeError)
            and str(error) == "Event loop is closed"
            and "PollerCompletionQueue" in repr(context.get("handle"))
        ):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    yield
    loop.set_exception_handler(previous)


def unique_prefix() -> str:
    return f"/test/election/{uuid.uuid4().hex}"


class Recorder:
    """Ordered log of (who, what, detail, monotonic time) from electors' callbacks."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any, float]] = []

    def add(self, who: str, what: str, detail: Any = None) -> None:
        self.events.append((who, what, detail, time.monotonic()))

    def index(self, who: str, what: str) -> int:
        for i, (w, kind, _, _) in enumerate(self.events):
            if w == who and kind == what:
                return i
        raise AssertionError(f"no event {who}/{what} in {self.events}")

    async def wait_for(self, who: str, what: str, timeout: float = 10) -> tuple[int, Any]:
        """Position and detail of the first `who`/`what` event, once it has been recorded."""
        await poll_until(lambda: any(e[:2] == (who, what) for e in self.events), timeout, f"{who} {what}")
        position = self.index(who, what)
        return position, self.events[position][2]

    def callbacks(self, who: str) -> dict[str, Any]:
        async def started(term: Term) -> None:
            self.add(who, "started", term.fencing_token)
            reason = await term.wait_ended()
            self.add(who, "ended", reason)

        async def stopped(term: Term) -> None:
            self.add(who, "stopped", term.reason)

        return {"on_started_leading": started, "on_stopped_leading": stopped}


def make_elector(endpoint: str, prefix: str, name: str, recorder: Recorder | None = None, **config: Any) -> Elector:
    recorder = recorder or Recorder()
    settings = {"lease_ttl": TTL, **config}
    return Elector(ElectionConfig((endpoint,), name=name, prefix=prefix, **settings), **recorder.callbacks(name))


@asynccontextmanager
async def running(*electors: Elector) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run the electors' loops for the block; shut them all down afterwards."""
    tasks = [asyncio.create_task(elector.run(), name=f"run-{elector.instance}") for elector in electors]
    try:
        yield tasks
    finally:
        await asyncio.gather(*(elector.shutdown(drain_timeout=1.0) for elector in electors), return_exceptions=True)
        done, pending = await asyncio.wait(tasks, timeout=10)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        assert not pending, "an elector's run() did not stop after shutdown()"


def single_leader(electors: list[Elector]) -> Elector | None:
    """The one leader all electors agree on, or None while they have not converged."""
    leaders = [e for e in electors if e.is_leader]
    if len(leaders) != 1:
        return None
    names = {e.leader_name for e in electors}
    if names != {leaders[0].instance}:
        return None
    return leaders[0]


async def keys_under(endpoint: str, prefix: str) -> list[tuple[str, str, int]]:
    """(key, value, create_revision) of every candidate key, oldest first."""
    client = connect(ElectionConfig((endpoint,), name="probe", lease_ttl=TTL))
    try:
        await client.connect()
        start = (prefix + "/").encode()
        response = await client.kvstub.Range(
            rpc.RangeRequest(
                key=start,
                range_end=prefix_range_end(start),
                sort_target=rpc.RangeRequest.CREATE,
                sort_order=rpc.RangeRequest.ASCEND,
            ),
            timeout=2,
        )
        return [(kv.key.decode(), kv.value.decode(), kv.create_revision) for kv in response.kvs]
    finally:
        await client.close()
