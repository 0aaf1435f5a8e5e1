"""The `generic` provider (the JSON API with an `Idempotency-Key`, docs/DESIGN.md) as a `Provider`.

It wraps `HttpTelephonyClient` unchanged. The provider collapses repeated creates with one key,
so an in-doubt create may simply be sent again with the same key (`dedupes_creation`); it has no
listing or cancelling of calls, and the message travels with the create.
"""

from __future__ import annotations

from collections.abc import Callable

from service.providers.generic.client import CallOutcome, CallRequest, OutcomeKind, TelephonyClient
from service.telephony.provider import CallSpec, CreateKind, CreateResult, LiveCall

__all__ = ["GenericProvider", "result_of"]


def result_of(outcome: CallOutcome) -> CreateResult:
    """The client's outcome in the provider interface's terms."""
    if outcome.kind is OutcomeKind.SENT:
        kind = CreateKind.CREATED
    elif outcome.kind is OutcomeKind.NOT_SENT:
        kind = CreateKind.NOT_SENT
    elif outcome.kind is OutcomeKind.PERMANENT:
        kind = CreateKind.REJECTED
    elif outcome.status_code == 429:
        kind = CreateKind.NOT_CREATED
    else:  # 5xx, 408, 409, timeouts, lost connections: the key makes a repeat safe
        kind = CreateKind.IN_DOUBT
    return CreateResult(kind, call_id=outcome.call_id, status_code=outcome.status_code, error=outcome.error,
                        retry_after=outcome.retry_after)


class GenericProvider:
    """`Provider` over a `TelephonyClient` (`HttpTelephonyClient`, or a test's stand-in)."""

    name = "generic"
    dedupes_creation = True

    def __init__(self, client: TelephonyClient) -> None:
        self.client = client

    async def create_call(self, spec: CallSpec, *, may_send: Callable[[], bool] | None = None) -> CreateResult:
        request = CallRequest(
            to=spec.to,
            from_=spec.from_,
            message=spec.message,
            appointment_id=spec.appointment_id,
            reminder_id=spec.reminder_id,
            idempotency_key=spec.idempotency_key,
        )
        return result_of(await self.client.place_call(request, may_send=may_send))

    async def live_calls(self, to: str) -> list[LiveCall]:
        """Never needed: an in-doubt create is repeated with its key, not reconciled."""
        return []

    async def cancel(self, call_id: str) -> bool:
        return False

    async def call_state(self, call_id: str) -> str | None:
        """The generic API has no call state to read: its calls are final once accepted."""
        return None

    async def aclose(self) -> None:
        await self.client.aclose()
