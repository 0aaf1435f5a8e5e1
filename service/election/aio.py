"""Small asyncio helpers for cancellation that really cancels (Python 3.11).

``asyncio.wait_for`` in 3.11 can swallow a cancellation that arrives just as the awaited
operation completes (fixed in 3.12), and aetcd uses it internally. Long-running loops therefore
check `raise_if_cancelling()` at their head, and owners stop tasks with `cancel_and_wait`, which
repeats the cancellation until the task is really done (bounded).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


def raise_if_cancelling() -> None:
    """Raise CancelledError if the current task was asked to cancel (and swallowed it)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None, timeout: float = 5.0) -> None:
    """Cancel `tasks` and wait until they are done, re-cancelling every 0.2 s, up to `timeout`."""
    pending = {task for task in tasks if task is not None and not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(0.2, max(0.0, deadline - loop.time())))
        if loop.time() >= deadline:
            break
    for task in pending:
        log.warning("task %r did not stop within %.1f s", task, timeout)
    for task in tasks:
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieve, so asyncio does not log "never retrieved"


async def close_quietly(client: Any, timeout: float = 2.0) -> None:
    """Close an aetcd client, ignoring errors, bounded by `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            await client.close()
    except Exception:  # noqa: BLE001 - closing is best effort
        pass
