"""`reminders check` for the generic provider: TELEPHONY_URL answers an authenticated read that
creates nothing (`GET /v1/calls`). The contract does not require that listing (docs/DESIGN.md,
"The generic provider"): any answer but a refusal of the token or a server error means the
provider is reachable, and then the token is first tried by a call. No webhooks, no PUBLIC_URL."""

from __future__ import annotations

import httpx

from service.config import Settings
from service.providers.preflight import CheckLine, failed, get, maybe, owned_transport, passed, unreachable

__all__ = ["provider_line", "run"]


async def provider_line(settings: Settings, transport: httpx.AsyncBaseTransport) -> CheckLine:
    url = f"{settings.telephony_url}/v1/calls"
    token = settings.telephony_token.get_secret_value() if settings.telephony_token else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = await get(transport, url, headers, settings.telephony_timeout)
    except (httpx.HTTPError, TimeoutError) as error:
        return failed("provider", "TELEPHONY_URL", f"GET {url} got no answer: {unreachable(error)}")
    status = response.status_code
    if status in (401, 403):
        return failed("provider", "TELEPHONY_TOKEN", f"the provider refused the token ({status})")
    if status >= 500:
        return failed("provider", "TELEPHONY_URL", f"GET {url} answered HTTP {status}")
    if 200 <= status < 300:
        return passed("provider", f"GET {url} answered {status}" + (" with the token" if token else ""))
    return passed("provider", f"{settings.telephony_url} is reachable (GET /v1/calls answered {status}: the token is "
                              "first tried by a call)")


async def run(settings: Settings, transport: httpx.AsyncBaseTransport | None = None, *,
              skip: frozenset[str] = frozenset()) -> list[CheckLine]:
    async with owned_transport(transport) as http:
        return [await maybe("provider", skip, provider_line(settings, http))]
