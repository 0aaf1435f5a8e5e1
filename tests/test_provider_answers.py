"""Every real-provider adapter reads an answer the way the generic client does (issue 12): at
most MAX_RESPONSE_BYTES, uncompressed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import respx

from service.providers.telnyx.rest import TelnyxProvider
from service.providers.twilio.rest import TwilioProvider
from service.telephony.http import MAX_RESPONSE_BYTES
from service.telephony.provider import CallSpec, CreateKind

pytestmark = pytest.mark.anyio

SPEC = CallSpec(to="+14155552671", from_="+15550000000", reminder_id="rem-1", appointment_id="app-1",
                attempt_id="att-1", message="not sent")


class Endless(httpx.AsyncByteStream):
    """An answer of 1 MiB in 4 KiB chunks that counts what the client pulled."""

    def __init__(self) -> None:
        self.served = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(256):
            self.served += 4096
            yield b" " * 4096


def twilio(transport: httpx.AsyncBaseTransport) -> tuple[TwilioProvider, str]:
    provider = TwilioProvider(api_url="https://api.twilio.test", account_sid="AC" + "0" * 32, auth_token="t",
                              public_url="https://reminders.example.test", transport=transport)
    return provider, f"https://api.twilio.test/2010-04-01/Accounts/AC{'0' * 32}/Calls.json"


def telnyx(transport: httpx.AsyncBaseTransport) -> tuple[TelnyxProvider, str]:
    provider = TelnyxProvider(api_url="https://api.telnyx.test", api_key="KEY", connection_id="conn",
                              public_url="https://reminders.example.test", transport=transport)
    return provider, "https://api.telnyx.test/v2/calls"


@pytest.mark.parametrize("make", [twilio, telnyx], ids=["twilio", "telnyx"])
async def test_a_huge_answer_is_read_only_up_to_the_cap_and_never_compressed(make: Callable) -> None:
    router = respx.MockRouter(assert_all_called=False)
    provider, calls_url = make(httpx.MockTransport(router.async_handler))
    body = Endless()
    route = router.post(calls_url).mock(return_value=httpx.Response(201, stream=body))
    result = await provider.create_call(SPEC)
    await provider.aclose()

    assert route.calls.last.request.headers["Accept-Encoding"] == "identity"
    assert body.served <= MAX_RESPONSE_BYTES + 4096  # stopped at the cap, not at 1 MiB
    assert result.kind is CreateKind.IN_DOUBT  # a 201 whose answer names no call: not repeated blindly
