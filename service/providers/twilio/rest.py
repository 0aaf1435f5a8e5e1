"""Twilio's Programmable Voice REST API (also SignalWire's compatibility API) as a `Provider`.

Calls are placed with an httpx form POST under HTTP Basic auth, one deadline per request and no
retry: Twilio has no idempotency key, so a repeated create is a second call. The stamp travels as
query parameters on `Url` and `StatusCallback`, which Twilio sends back unchanged. Nothing here
knows the database.
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

from service.privacy import mask_phone
from service.telephony.http import (
    ANSWER_HEADERS,
    HttpAdapter,
    SendRefused,
    describe_failure,
    error_text,
    post_guarded,
    refused_create,
    require_http_url,
)
from service.telephony.provider import LIVE_STATUSES, CallSpec, CreateKind, CreateResult, LiveCall, ProviderUnavailable
from service.telephony.webhook import WEBHOOK_PREFIX

__all__ = ["STATUS_CALLBACK_EVENTS", "STATUS_OVERRIDES", "VOICE_OVERRIDES", "TwilioProvider", "WEBHOOK_PATHS"]

log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
STATUS_CALLBACK_EVENTS = ("initiated", "ringing", "answered", "completed")
# The routes Twilio calls, under PUBLIC_URL (the webhooks package serves them).
WEBHOOK_PATHS = {route: f"{WEBHOOK_PREFIX}/twilio/{route}" for route in ("voice", "status", "gather", "incoming")}
# Twilio's webhook connection overrides (docs: "Webhooks connection overrides"): a voice request
# that gets no first byte within 6 s fails over to FallbackUrl (another replica) well inside the
# callee's patience; a status event is retried on 5xx and timeouts (to any replica), within 15 s.
VOICE_OVERRIDES = "#rt=6000"
STATUS_OVERRIDES = "#rc=3&rp=5xx,ct,rt&rt=4000&tt=15000"
# Twilio answers 429 (error 20429) without Retry-After at times: wait this long then.
DEFAULT_RETRY_AFTER = 1.0


class TwilioProvider(HttpAdapter):
    """`Provider` for Twilio's Calls resource.

    `api_url` may carry a path prefix (SignalWire: `https://<space>.signalwire.com/api/laml`).
    `public_url` is where Twilio reaches this service's webhooks (may carry a path prefix).
    `timeout`, `max_connections` and `transport` go to `HttpAdapter`.
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
        machine_detection: bool = False,
        connection_overrides: bool = True,
        **http: Any,
    ) -> None:
        super().__init__(**http)  # timeout, max_connections, transport
        self._connection_overrides = connection_overrides
        if not account_sid or not auth_token:
            raise ValueError("account_sid and auth_token are required")
        require_http_url("api_url", api_url)
        require_http_url("public_url", public_url)
        self._account = f"{api_url.rstrip('/')}/{API_VERSION}/Accounts/{account_sid}"
        self._public_url = public_url.rstrip("/")
        self._machine_detection = machine_detection
        credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()
        self._headers = {"Authorization": f"Basic {credentials}", **ANSWER_HEADERS}

    @property
    def calls_url(self) -> str:
        return f"{self._account}/Calls.json"

    def webhook_url(self, route: str, query: Mapping[str, str]) -> str:
        """PUBLIC_URL + the route's path + the stamp's query: the URL Twilio calls and signs."""
        return f"{self._public_url}{WEBHOOK_PATHS[route]}?{urlencode(dict(query))}"

    def create_form(self, spec: CallSpec) -> list[tuple[str, str]]:
        """The form fields of a create (a list: `StatusCallbackEvent` is repeated, one per event)."""
        stamp = spec.stamp.query()
        voice = self.webhook_url("voice", stamp)
        form = [
            ("To", spec.to),
            ("From", spec.from_),
            ("Url", voice + self._overrides(VOICE_OVERRIDES)),
            ("Method", "POST"),
            # another replica answers when this one fails or stalls: the bound call's words again
            ("FallbackUrl", voice),
            ("FallbackMethod", "POST"),
            ("StatusCallback", self.webhook_url("status", stamp) + self._overrides(STATUS_OVERRIDES)),
            ("StatusCallbackMethod", "POST"),
            *(("StatusCallbackEvent", event) for event in STATUS_CALLBACK_EVENTS),
        ]
        if self._machine_detection:
            # a machine's voice request comes once its greeting is over: the voicemail after the beep
            form.append(("MachineDetection", "DetectMessageEnd"))
        return form

    def _overrides(self, fragment: str) -> str:
        """Twilio's connection overrides (a URL fragment, outside the signature); SignalWire
        documents none of them."""
        return fragment if self._connection_overrides else ""

    async def create_call(self, spec: CallSpec, *, may_send: Callable[[], bool] | None = None) -> CreateResult:
        """POST one call; 201 → CREATED, 429 → NOT_CREATED, other 4xx → REJECTED, anything
        unknown (5xx, timeout, lost connection) → IN_DOUBT."""
        body = urlencode(self.create_form(spec)).encode()
        headers = {**self._headers, "Content-Type": "application/x-www-form-urlencoded"}
        try:
            response = await post_guarded(self._send_request, self.calls_url, headers, body, may_send=may_send,
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
                    response = await self._send_request(httpx.Request(
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

    async def call_state(self, call_id: str) -> str | None:
        """`GET Calls/{sid}.json`'s `status` (queued, ringing, in-progress, completed, busy, failed,
        no-answer, canceled); None when Twilio cannot be asked now."""
        _check_sid(call_id)
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._send_request(httpx.Request("GET", f"{self._account}/Calls/{call_id}.json",
                                                                  headers=self._headers))
            status = response.json().get("status") if response.status_code == 200 else None
        except (httpx.HTTPError, TimeoutError, ValueError, AttributeError):
            return None
        return status if isinstance(status, str) and len(status) <= 32 else None

    async def cancel(self, call_id: str) -> bool:
        """POST Calls/{sid}.json `Status=canceled`: ends a queued or ringing call (no effect later)."""
        return await self._update(call_id, "canceled")

    async def hang_up(self, call_id: str) -> bool:
        """POST Calls/{sid}.json `Status=completed`: ends a call in progress."""
        return await self._update(call_id, "completed")

    async def _update(self, call_id: str, status: str) -> bool:
        _check_sid(call_id)
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._send_request(httpx.Request(
                    "POST", f"{self._account}/Calls/{call_id}.json", data={"Status": status}, headers=self._headers,
                ))
        except (httpx.HTTPError, TimeoutError) as error:
            log.warning("twilio: setting call %s to %s failed: %s", call_id, status, type(error).__name__)
            return False
        if response.status_code >= 300:
            log.info("twilio: setting call %s to %s answered HTTP %d", call_id, status, response.status_code)
        return response.status_code < 300



def _check_sid(call_id: str) -> None:
    """A call sid goes into a URL path: letters, digits and dashes only (SignalWire's are UUIDs)."""
    if not call_id or len(call_id) > 64 or not call_id.replace("-", "").isalnum():
        raise ValueError("not a call sid")


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
    return refused_create(response, error, default_retry_after=DEFAULT_RETRY_AFTER)


