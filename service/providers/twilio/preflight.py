"""`reminders check` for Twilio (and SignalWire's compatibility API): the account accepts the
credentials (`GET /2010-04-01/Accounts/{sid}.json`, a read that creates nothing), the auth token
has Twilio's shape (it signs every webhook), and PUBLIC_URL's status route refuses an unsigned
request with the service's 403."""

from __future__ import annotations

import asyncio
import base64
import re
from urllib.parse import urlsplit

import httpx

from service.config import Settings
from service.providers.preflight import (
    CheckLine,
    failed,
    get,
    json_body,
    maybe,
    owned_transport,
    passed,
    public_url_line,
    skipped,
    unreachable,
)
from service.providers.twilio.rest import API_VERSION, WEBHOOK_PATHS

__all__ = ["account_line", "run", "signature_line"]

# Twilio's auth tokens: 32 hexadecimal characters. SignalWire's API tokens (PT…) are another shape.
_AUTH_TOKEN = re.compile(r"[0-9a-fA-F]{32}")


def _signalwire(settings: Settings) -> bool:
    host = urlsplit(settings.twilio_api_url).hostname or ""
    return host == "signalwire.com" or host.endswith(".signalwire.com")


def signature_line(settings: Settings) -> CheckLine:
    """TWILIO_AUTH_TOKEN signs every webhook: a token of the wrong shape (a character lost or a
    newline pasted with it) gets every webhook refused (403), and no call speaks."""
    assert settings.twilio_auth_token is not None
    token = settings.twilio_auth_token.get_secret_value()
    if token != token.strip():
        return failed("signature", "TWILIO_AUTH_TOKEN", "has spaces or a newline around it: every webhook signature "
                                                        "would be refused (403) and no call would speak")
    if _signalwire(settings):
        return passed("signature", "TWILIO_AUTH_TOKEN: a SignalWire API token (its shape is not checked)")
    if not _AUTH_TOKEN.fullmatch(token):
        return failed("signature", "TWILIO_AUTH_TOKEN", f"is {len(token)} characters, not Twilio's 32 hexadecimal "
                                                        "ones (Console → Account info → Auth Token): every webhook "
                                                        "signature would be refused (403)")
    return passed("signature", "TWILIO_AUTH_TOKEN has the shape of a Twilio auth token (32 hexadecimal characters)")


async def account_line(settings: Settings, transport: httpx.AsyncBaseTransport) -> CheckLine:
    """The account resource, read with the service's Basic credentials."""
    assert settings.twilio_account_sid and settings.twilio_auth_token
    sid = settings.twilio_account_sid
    url = f"{settings.twilio_api_url}/{API_VERSION}/Accounts/{sid}.json"
    credentials = base64.b64encode(f"{sid}:{settings.twilio_auth_token.get_secret_value()}".encode()).decode()
    try:
        response = await get(transport, url, {"Authorization": f"Basic {credentials}"}, settings.telephony_timeout)
    except (httpx.HTTPError, TimeoutError) as error:
        return failed("provider", "TWILIO_API_URL", f"GET {url} got no answer: {unreachable(error)}")
    body = json_body(response)
    code = f", error {body['code']}" if isinstance(body.get("code"), int) else ""
    status = response.status_code
    if status == 401:
        return failed("provider", "TWILIO_AUTH_TOKEN", f"Twilio refused the credentials of account {sid} (401{code}): "
                                                       "TWILIO_AUTH_TOKEN (or TWILIO_ACCOUNT_SID) is wrong")
    if status == 404:
        return failed("provider", "TWILIO_ACCOUNT_SID", f"no account {sid} there (404{code})")
    if status != 200:
        return failed("provider", "TWILIO_API_URL", f"GET {url} answered HTTP {status}{code}")
    state, kind = body.get("status"), body.get("type")
    if state != "active":
        return failed("provider", "TWILIO_ACCOUNT_SID", f"account {sid} is {state}: it places no calls")
    trial = " (a trial account: it calls verified numbers only, after a trial notice)" if kind == "Trial" else ""
    return passed("provider", f"account {sid} accepted the credentials: status active, type {kind}{trial}")


async def run(settings: Settings, transport: httpx.AsyncBaseTransport | None = None, *,
              skip: frozenset[str] = frozenset()) -> list[CheckLine]:
    """The provider's lines: credentials, signature settings, PUBLIC_URL (`skip`: names not checked)."""
    async with owned_transport(transport) as http:
        account, reachable = await asyncio.gather(
            maybe("provider", skip, account_line(settings, http)),
            maybe("public_url", skip, public_url_line(settings, WEBHOOK_PATHS["status"], http,
                                                      settings.telephony_timeout)),
        )
    signature = skipped("signature") if "signature" in skip else signature_line(settings)
    return [account, signature, reachable]
