"""Twilio's Programmable Voice REST API (also SignalWire's compatibility API) as a `Provider`,
the webhook signature check, and the TwiML the webhooks answer with.

Calls are placed with an httpx form POST under HTTP Basic auth, one deadline per request and no
retry: Twilio has no idempotency key, so a repeated create is a second call. The stamp travels as
query parameters on `Url` and `StatusCallback`, which Twilio sends back unchanged.

The signature (`X-Twilio-Signature`) and the TwiML come from the `twilio` library: its
`RequestValidator` knows the edge cases of the scheme (ports, repeated parameters), its
`VoiceResponse` escapes the spoken text. Nothing here knows the database.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import httpx
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from service.privacy import mask_phone

from .client import (
    ANSWER_HEADERS,
    SendRefused,
    describe_failure,
    error_text,
    parse_retry_after,
    pooled_transport,
    post_guarded,
    require_http_url,
    send_capped,
)
from .provider import LIVE_STATUSES, CallSpec, CreateKind, CreateResult, LiveCall, ProviderUnavailable

__all__ = [
    "STATUS_CALLBACK_EVENTS",
    "SIGNATURE_HEADER",
    "TwilioProvider",
    "TwilioSignature",
    "WEBHOOK_PATHS",
    "gather_twiml",
    "hangup_twiml",
    "say_twiml",
]

log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
SIGNATURE_HEADER = "X-Twilio-Signature"
STATUS_CALLBACK_EVENTS = ("initiated", "ringing", "answered", "completed")
# The routes Twilio calls, under PUBLIC_URL (the webhooks package serves them).
WEBHOOK_PATHS = {
    "voice": "/telephony/twilio/voice",
    "status": "/telephony/twilio/status",
    "gather": "/telephony/twilio/gather",
}
# Twilio answers 429 (error 20429) without Retry-After at times: wait this long then.
DEFAULT_RETRY_AFTER = 1.0


class TwilioProvider:
    """`Provider` for Twilio's Calls resource.

    `api_url` may carry a path prefix (SignalWire: `https://<space>.signalwire.com/api/laml`).
    `public_url` is where Twilio reaches this service's webhooks (may carry a path prefix).
    `timeout` bounds each request as a whole. `transport` replaces the aiohttp-backed one (tests
    hand in respx's router or the Twilio-shaped fake).
    """

    name = "twilio"
    dedupes_creation = False

    def __init__(
        self,
        *,
        api_url: str,
        account_sid: str,
        auth_token: str,
        public_url: str,
        timeout: float = 10.0,
        max_connections: int = 20,
        transport: httpx.AsyncBaseTransport | None = None,
        machine_detection: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if not account_sid or not auth_token:
            raise ValueError("account_sid and auth_token are required")
        require_http_url("api_url", api_url)
        require_http_url("public_url", public_url)
        self._account = f"{api_url.rstrip('/')}/{API_VERSION}/Accounts/{account_sid}"
        self._public_url = public_url.rstrip("/")
        self._timeout = timeout
        self._machine_detection = machine_detection
        credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()
        self._headers = {"Authorization": f"Basic {credentials}", **ANSWER_HEADERS}
        # Requests go straight to the transport, as the generic client's do: httpx.AsyncClient
        # would log every request URL at INFO, and a listing's URL carries the callee's number.
        self._transport = transport if transport is not None else pooled_transport(max_connections)

    @property
    def calls_url(self) -> str:
        return f"{self._account}/Calls.json"

    def webhook_url(self, route: str, query: Mapping[str, str]) -> str:
        """PUBLIC_URL + the route's path + the stamp's query: the URL Twilio calls and signs."""
        return f"{self._public_url}{WEBHOOK_PATHS[route]}?{urlencode(dict(query))}"

    def create_form(self, spec: CallSpec) -> list[tuple[str, str]]:
        """The form fields of a create (a list: `StatusCallbackEvent` is repeated, one per event)."""
        stamp = spec.stamp.query()
        form = [
            ("To", spec.to),
            ("From", spec.from_),
            ("Url", self.webhook_url("voice", stamp)),
            ("Method", "POST"),
            ("StatusCallback", self.webhook_url("status", stamp)),
            ("StatusCallbackMethod", "POST"),
            *(("StatusCallbackEvent", event) for event in STATUS_CALLBACK_EVENTS),
        ]
        if self._machine_detection:
            form.append(("MachineDetection", "Enable"))
        return form

    async def create_call(self, spec: CallSpec, *, may_send: Callable[[], bool] | None = None) -> CreateResult:
        """POST one call; 201 → CREATED, 429 → NOT_CREATED, other 4xx → REJECTED, anything
        unknown (5xx, timeout, lost connection) → IN_DOUBT."""
        body = urlencode(self.create_form(spec)).encode()
        headers = {**self._headers, "Content-Type": "application/x-www-form-urlencoded"}
        try:
            response = await post_guarded(self._send, self.calls_url, headers, body, may_send=may_send,
                                          timeout=self._timeout)
        except SendRefused:
            return CreateResult(CreateKind.NOT_SENT, error="not sent: the sender may no longer send")
        except (httpx.HTTPError, TimeoutError) as error:
            return CreateResult(CreateKind.IN_DOUBT, error=describe_failure(error, spec.to))
        result = _classify_create(response, spec)
        log.debug("twilio create to %s (attempt %s): %s %s", mask_phone(spec.to), spec.attempt_id,
                  result.kind, result.status_code)
        return result

    async def live_calls(self, to: str) -> list[LiveCall]:
        """GET Calls.json by `To` and each live `Status` (Twilio filters one status per request)."""
        calls: list[LiveCall] = []
        try:
            async with asyncio.timeout(self._timeout):
                for status in LIVE_STATUSES:
                    response = await self._send(httpx.Request(
                        "GET", self.calls_url, params={"To": to, "Status": status, "PageSize": "100"},
                        headers=self._headers,
                    ))
                    if response.status_code != 200:
                        raise ProviderUnavailable(f"listing calls: HTTP {response.status_code}")
                    for item in response.json().get("calls") or []:
                        calls.append(
                            LiveCall(
                                call_id=str(item.get("sid")),
                                status=str(item.get("status")),
                                to=str(item.get("to")),
                                created_at=_rfc2822(item.get("date_created")),
                            )
                        )
        except ProviderUnavailable:
            raise
        except (httpx.HTTPError, TimeoutError, ValueError, AttributeError) as error:
            raise ProviderUnavailable(f"listing calls: {type(error).__name__}") from None
        return calls

    async def cancel(self, call_id: str) -> bool:
        """POST Calls/{sid}.json `Status=canceled`: ends a queued or ringing call (no effect later)."""
        return await self._update(call_id, "canceled")

    async def hang_up(self, call_id: str) -> bool:
        """POST Calls/{sid}.json `Status=completed`: ends a call in progress."""
        return await self._update(call_id, "completed")

    async def _update(self, call_id: str, status: str) -> bool:
        if not call_id.isalnum():
            raise ValueError("not a call sid")
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._send(httpx.Request(
                    "POST", f"{self._account}/Calls/{call_id}.json", data={"Status": status}, headers=self._headers,
                ))
        except (httpx.HTTPError, TimeoutError) as error:
            log.warning("twilio: setting call %s to %s failed: %s", call_id, status, type(error).__name__)
            return False
        if response.status_code >= 300:
            log.info("twilio: setting call %s to %s answered HTTP %d", call_id, status, response.status_code)
        return response.status_code < 300

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """One request through the transport, its body read up to MAX_RESPONSE_BYTES (the caller
        holds the deadline)."""
        return await send_capped(self._transport, request)


def _rfc2822(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else None


def _classify_create(response: httpx.Response, spec: CallSpec) -> CreateResult:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    if 200 <= status < 300:
        sid = body.get("sid")
        if isinstance(sid, str) and sid:
            return CreateResult(CreateKind.CREATED, call_id=sid, status_code=status)
        return CreateResult(CreateKind.IN_DOUBT, status_code=status, error=f"HTTP {status} without a call sid")
    message = body.get("message") if isinstance(body.get("message"), str) else None
    code = body.get("code")
    error = error_text(f"HTTP {status}" + (f" ({code})" if code else "") + (f": {message}" if message else ""), spec.to)
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return CreateResult(CreateKind.NOT_CREATED, status_code=status, error=error,
                            retry_after=DEFAULT_RETRY_AFTER if retry_after is None else retry_after)
    if status >= 500 or status == 408:
        return CreateResult(CreateKind.IN_DOUBT, status_code=status, error=error)
    return CreateResult(CreateKind.REJECTED, status_code=status, error=error)


class TwilioSignature:
    """Checks `X-Twilio-Signature` against PUBLIC_URL + path + query, not the URL the request
    arrived at (a proxy in front may have stripped a path prefix or changed host and scheme)."""

    def __init__(self, auth_token: str, public_url: str) -> None:
        self._validator = RequestValidator(auth_token)
        self._public_url = public_url.rstrip("/")

    def signed_url(self, path: str, query: str) -> str:
        return f"{self._public_url}{path}" + (f"?{query}" if query else "")

    def valid(self, path: str, query: str, params: Any, signature: str | None) -> bool:
        """`params`: the POST form (a multi-dict with `getlist`, or a plain mapping)."""
        if not signature:
            return False
        return bool(self._validator.validate(self.signed_url(path, query), params, signature))

    def sign(self, url: str, params: Any) -> str:
        """The signature Twilio would send for `url` and `params` (the fake and tests use it)."""
        return self._validator.compute_signature(url, params)


def say_twiml(message: str, *, language: str | None = None) -> str:
    """TwiML that speaks `message`, then hangs up."""
    response = VoiceResponse()
    if language:
        response.say(message, language=language)
    else:
        response.say(message)
    response.hangup()
    return str(response)


# How long <Gather> waits for the first digit after the words end.
GATHER_TIMEOUT_SECONDS = 8


def gather_twiml(text: str, *, language: str | None, action: str) -> str:
    """TwiML that speaks `text` while listening for one key, posting it to `action`; with no key
    pressed, Twilio goes on to the <Redirect>: the same `action` without `Digits`."""
    response = VoiceResponse()
    gather = response.gather(input="dtmf", num_digits=1, timeout=GATHER_TIMEOUT_SECONDS, action=action,
                             method="POST")
    if language:
        gather.say(text, language=language)
    else:
        gather.say(text)
    response.redirect(action, method="POST")
    return str(response)


def hangup_twiml() -> str:
    """TwiML that ends the call without a word."""
    response = VoiceResponse()
    response.hangup()
    return str(response)
