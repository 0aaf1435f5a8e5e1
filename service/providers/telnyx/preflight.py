"""`reminders check` for Telnyx Call Control: the API key reads the Call Control application
TELNYX_CONNECTION_ID names (`GET /v2/call_control_applications/{id}`, a read that creates nothing)
and the application can place the service's calls, TELNYX_PUBLIC_KEY is an Ed25519 public key, and
PUBLIC_URL's events route refuses an unsigned event with the service's 403."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from service.config import Settings
from service.providers import preflight as check
from service.providers.preflight import CheckLine
from service.providers.telnyx.rest import EVENTS_PATH
from service.providers.telnyx.signature import decode_public_key

__all__ = ["application_line", "run", "signature_line"]


def signature_line(settings: Settings) -> CheckLine:
    """TELNYX_PUBLIC_KEY verifies every event: it must decode to an Ed25519 public key (32 bytes)."""
    assert settings.telnyx_public_key is not None
    try:
        Ed25519PublicKey.from_public_bytes(decode_public_key(settings.telnyx_public_key))
    except ValueError as error:
        return check.failed("signature", "TELNYX_PUBLIC_KEY",
                            f"is not the account's base64 Ed25519 public key ({error}): "
                            "every event would be refused (403)")
    return check.passed("signature", "TELNYX_PUBLIC_KEY decodes to a 32-byte Ed25519 public key")


def _problem(application: dict[str, Any]) -> str | None:
    """What keeps the application from placing the service's calls, if anything."""
    if application.get("active") is False:
        return "is not active: its Dials are refused (Portal → the application → Active)"
    outbound = application.get("outbound") if isinstance(application.get("outbound"), dict) else {}
    if not outbound.get("outbound_voice_profile_id"):
        return "has no outbound voice profile: its Dials are refused (Portal → the application → Outbound)"
    if str(application.get("webhook_api_version") or "2") != "2":
        return "sends API v1 webhooks; the service reads API v2 events (Portal → the application → Webhook API version)"
    return None


async def application_line(settings: Settings, transport: httpx.AsyncBaseTransport) -> CheckLine:
    """The Call Control application, read with the service's API key."""
    assert settings.telnyx_api_key and settings.telnyx_connection_id and settings.public_url
    app_id = settings.telnyx_connection_id
    url = f"{settings.telnyx_api_url}/v2/call_control_applications/{app_id}"
    headers = {"Authorization": f"Bearer {settings.telnyx_api_key.get_secret_value()}"}
    try:
        response = await check.get(transport, url, headers, settings.telephony_timeout)
    except (httpx.HTTPError, TimeoutError) as error:
        return check.failed("provider", "TELNYX_API_URL", f"GET {url} got no answer: {check.unreachable(error)}")
    status = response.status_code
    if status in (401, 403):
        return check.failed("provider", "TELNYX_API_KEY",
                            f"Telnyx refused the API key ({status}): TELNYX_API_KEY is wrong or revoked "
                            "(Portal → API Keys)")
    if status in (404, 422):
        return check.failed("provider", "TELNYX_CONNECTION_ID", f"no Call Control application {app_id} in this account "
                                                          f"({status}; Portal → Voice → Programmable Voice)")
    if status != 200:
        return check.failed("provider", "TELNYX_API_URL", f"GET {url} answered HTTP {status}")
    data = check.json_body(response).get("data")
    application = data if isinstance(data, dict) else {}
    problem = _problem(application)
    name = application.get("application_name") or "(no name)"
    if problem is not None:
        return check.failed("provider", "TELNYX_CONNECTION_ID", f"Call Control application {app_id} {name!r} {problem}")
    events = settings.public_url + EVENTS_PATH
    hook = application.get("webhook_event_url")
    portal = ("its webhook URL is PUBLIC_URL's" if hook == events
              else f"its webhook URL is {hook or 'unset'}, not {events} (each Dial names its own)")
    return check.passed("provider", f"Call Control application {app_id} {name!r} accepted the API key: active, "
                                    f"outbound voice profile set, API v2 webhooks; {portal}")


async def run(settings: Settings, transport: httpx.AsyncBaseTransport | None = None, *,
              skip: frozenset[str] = frozenset()) -> list[CheckLine]:
    """The provider's lines: credentials, signature settings, PUBLIC_URL (`skip`: names not checked)."""
    async with check.owned_transport(transport) as http:
        application, reachable = await asyncio.gather(
            check.maybe("provider", skip, application_line(settings, http)),
            check.maybe("public_url", skip,
                        check.public_url_line(settings, EVENTS_PATH, http, settings.telephony_timeout)),
        )
    signature = check.skipped("signature") if "signature" in skip else signature_line(settings)
    return [application, signature, reachable]
