"""What the providers' webhook routes share: a database budget for a request the provider waits
on, the words of reminders planned before wording was stored, ending a bound reminder's other
calls after the answer is sent, and counting and logging refused signatures."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from service import metrics
from service.ledger.calls import Fallback
from service.metrics import WEBHOOK_SIGNATURE_FAILURES
from service.reminders import MessageTemplates, Wording
from service.telephony.webhook import SignatureFailure

__all__ = [
    "REFUSAL_LOG_INTERVAL", "WEBHOOK_PROVIDERS", "SignatureRefusals", "call_after_confirmation", "cancel_calls",
    "fallback_wording", "signature_refused", "with_retries",
]

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


# At most one warning per provider this often (seconds) about refused signatures.
REFUSAL_LOG_INTERVAL = 60.0
# The providers with webhooks (tests/test_webhook_edges.py keeps it equal to service.providers'); each
# of their reasons exports 0 from the start (service.metrics.LABEL_VALUES): increase() and the alert
# see a replica's first refusal, not only its second.
WEBHOOK_PROVIDERS = metrics.WEBHOOK_PROVIDERS


class SignatureRefusals:
    """Counts webhook requests refused for their signature (reminders_webhook_signature_failures_total)
    and warns of them at most once per `interval` seconds per provider, on the monotonic clock: a
    flood of forged requests must not flood the log. A warning says how many were refused since the
    one before it."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval, self._clock = interval, clock
        self._warned: dict[str, float] = {}  # provider → when its last warning was logged
        self._quiet: dict[str, int] = {}  # provider → refusals since, not logged

    def refused(self, provider: str, reason: SignatureFailure, message: str) -> None:
        WEBHOOK_SIGNATURE_FAILURES.labels(provider, reason.value).inc()
        now, last = self._clock(), self._warned.get(provider)
        if last is not None and now - last < self._interval:
            self._quiet[provider] = self._quiet.get(provider, 0) + 1
            return
        self._warned[provider], quiet = now, self._quiet.pop(provider, 0)
        since = f"; {quiet} more refused in the {now - last:.0f} s since the last warning" if quiet else ""
        log.warning("%s (%s)%s", message, reason.value, since)


# For apps whose provider package did not install one of their own (tests' rigs).
_REFUSALS = SignatureRefusals()


def signature_refused(request: Request, provider: str, reason: SignatureFailure, message: str) -> None:
    """Count and (rate-limited) log one request refused for its signature."""
    refusals = getattr(request.app.state, "signature_refusals", None) or _REFUSALS
    refusals.refused(provider, reason, message)
