"""Waiting for a condition: a poll with a deadline, never a bare sleep."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

__all__ = ["eventually", "poll_until"]


async def poll_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """Evaluate `predicate` (sync or async) until truthy, and return that value; fail with `what`
    after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        await asyncio.sleep(interval)


async def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """`poll_until` every 20 ms, for a condition that needs no name."""
    return await poll_until(check, timeout, "the condition", interval=0.02)
