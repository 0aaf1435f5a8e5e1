"""The `generic` provider through the provider interface: today's client, outcomes renamed."""

from __future__ import annotations

import httpx
import pytest
import respx

from service.providers.generic.adapter import GenericProvider
from service.providers.generic.client import HttpTelephonyClient
from service.telephony.provider import CallSpec, CreateKind, Provider

pytestmark = pytest.mark.anyio

SPEC = CallSpec(to="+15551234567", from_="+15550000000", reminder_id="rem-1", appointment_id="app-1",
                attempt_id="att-1", message="Reminder", idempotency_key="reminder-rem-1")


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (httpx.Response(201, json={"id": "call_1", "status": "queued"}), CreateKind.CREATED),
        (httpx.Response(429, headers={"Retry-After": "2"}), CreateKind.NOT_CREATED),
        (httpx.Response(503), CreateKind.IN_DOUBT),
        (httpx.Response(409), CreateKind.IN_DOUBT),
        (httpx.Response(422, json={"error": "bad"}), CreateKind.REJECTED),
    ],
)
async def test_outcomes_map_onto_create_kinds(response: httpx.Response, kind: CreateKind) -> None:
    router = respx.MockRouter(assert_all_called=False)
    route = router.post("http://provider.test/v1/calls").mock(return_value=response)
    provider = GenericProvider(HttpTelephonyClient("http://provider.test",
                                                   transport=httpx.MockTransport(router.async_handler)))
    assert isinstance(provider, Provider) and provider.dedupes_creation
    result = await provider.create_call(SPEC)
    await provider.aclose()
    assert result.kind is kind
    request = route.calls.last.request
    assert request.headers["Idempotency-Key"] == "reminder-rem-1"
    assert b'"message":"Reminder"' in request.content
    if kind is CreateKind.NOT_CREATED:
        assert result.retry_after == 2.0
    if kind is CreateKind.CREATED:
        assert result.call_id == "call_1"


async def test_refused_send_is_not_sent() -> None:
    router = respx.MockRouter(assert_all_called=False)
    router.post("http://provider.test/v1/calls").mock(return_value=httpx.Response(201, json={"id": "c"}))
    provider = GenericProvider(HttpTelephonyClient("http://provider.test",
                                                   transport=httpx.MockTransport(router.async_handler)))
    assert (await provider.create_call(SPEC, may_send=lambda: False)).kind is CreateKind.NOT_SENT
    assert await provider.live_calls(SPEC.to) == [] and not await provider.cancel("c")
    await provider.aclose()
