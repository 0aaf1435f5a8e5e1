"""What the providers' webhook routes share: a database budget for a request the provider waits
on, the words of reminders planned before wording was stored, and ending a bound reminder's other
calls after the answer is sent."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from service.ledger.calls import Fallback
from service.reminders import MessageTemplates, Wording

__all__ = ["call_after_confirmation", "cancel_calls", "fallback_wording", "with_retries"]

log = logging.getLogger(__name__)

# A try begun past the budget still gets this long (seconds).
_MIN_TRY = 2.0


async def with_retries(work: Callable[[], Awaitable[Any]], budget: float, what: str) -> Any:
    """`work()`, tried again after a failure (the database down or failing over) until `budget`
    seconds have passed; the last failure is raised."""
    deadline = time.monotonic() + budget
    delay = 0.1
    while True:
        try:
            # Every try gets a fair chance, even one begun past the deadline (a process frozen
            # while it held the request resumes late: trying beats hanging up unheard).
            async with asyncio.timeout(max(_MIN_TRY, deadline - time.monotonic())):
                return await work()
        except Exception as error:
            if time.monotonic() + delay >= deadline:
                raise
            log.info("%s: %s, trying again", what, type(error).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def call_after_confirmation(request: Request) -> bool:
    """CALL_AFTER_CONFIRMATION: a confirmed appointment's later reminders still call."""
    settings = getattr(request.app.state, "settings", None)
    return bool(getattr(settings, "call_after_confirmation", False))


def fallback_wording(request: Request) -> Fallback:
    """The words for a reminder planned before wording was stored: rendered now, as then."""
    templates: MessageTemplates = getattr(request.app.state, "templates", None) or MessageTemplates.parse(None)

    def wording(row: Any) -> Wording:
        language = row.language if templates.supports(row.language) else templates.default_language
        return templates.render(language, row.customer_name, row.starts_at, row.timezone)

    return wording


async def cancel_calls(request: Request, call_ids: list[str]) -> None:
    """End calls of a reminder already bound to another call (run after the response is sent)."""
    provider: Any = request.app.state.provider
    for call_id in call_ids:
        done = await provider.cancel(call_id)
        log.info("ended call %s of a reminder bound to another call: %s", call_id, done)
