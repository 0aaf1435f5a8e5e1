"""Client for the telephony provider API: places one call per request and classifies the outcome.

The client knows nothing of reminders' storage or leadership. It never retries and never sleeps:
it answers with a `CallOutcome` that tells the caller whether the call was placed, may be tried
again with the same idempotency key, or will never succeed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import httpx
from httpx_aiohttp import AiohttpTransport

from service.privacy import mask_phone, scrub, strip_control

__all__ = [
    "ANSWER_HEADERS",
    "MAX_RESPONSE_BYTES",
    "CallOutcome",
    "CallRequest",
    "HttpTelephonyClient",
    "OutcomeKind",
    "SendRefused",
    "TelephonyClient",
    "describe_failure",
    "error_text",
    "parse_retry_after",
    "pooled_transport",
    "post_guarded",
    "read_capped",
    "require_http_url",
    "send_capped",
    "usable_call_id",
]

logger = logging.getLogger(__name__)

_CALLS_PATH = "/v1/calls"
_USER_AGENT = "reminders-telephony-client"
_MAX_ERROR_LEN = 160
# The provider's answer is read up to this many bytes: a call's JSON is a few hundred.
MAX_RESPONSE_BYTES = 64 * 1024
# A call id is stored (String(128)) and sent back to the provider: bounded, printable, no spaces.
MAX_CALL_ID_LEN = 128
_CALL_ID = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_CALL_ID_LEN)
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def error_text(text: str, *numbers: str) -> str:
    """Short, single-line text with the given numbers and anything phone-like masked."""
    text = " ".join(strip_control(scrub(text, *numbers)).split())
    return text if len(text) <= _MAX_ERROR_LEN else text[: _MAX_ERROR_LEN - 1] + "…"


def usable_call_id(value: object) -> str | None:
    """`value` when it can serve as a call id (1-128 printable ASCII characters), else None."""
    return value if isinstance(value, str) and _CALL_ID.fullmatch(value) else None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT; RFC 850/asctime forms parse as naive
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass(frozen=True)
class CallRequest:
    """One call to place. `idempotency_key` identifies the reminder, identical for every attempt."""

    to: str
    from_: str
    message: str
    appointment_id: str
    reminder_id: str
    idempotency_key: str

    def __post_init__(self) -> None:
        if not self.idempotency_key:
            raise ValueError("CallRequest.idempotency_key must not be empty")

    def payload(self) -> dict[str, Any]:
        """The JSON body sent to the provider."""
        return {
            "to": self.to,
            "from": self.from_,
            "message": self.message,
            "metadata": {
                "appointment_id": self.appointment_id,
                "reminder_id": self.reminder_id,
            },
        }

    def __repr__(self) -> str:  # keep full numbers out of logs and tracebacks
        return (
            f"CallRequest(to={mask_phone(self.to)!r}, from_={mask_phone(self.from_)!r}, "
            f"appointment_id={self.appointment_id!r}, reminder_id={self.reminder_id!r}, "
            f"idempotency_key={self.idempotency_key!r})"
        )


class OutcomeKind(StrEnum):
    """How a call attempt ended, from the caller's point of view."""

    SENT = "sent"  # the provider accepted the call (possibly a replay of an earlier attempt)
    TRANSIENT = "transient"  # try again later with the same idempotency key
    PERMANENT = "permanent"  # trying again will not help
    NOT_SENT = "not_sent"  # `may_send` refused at the last moment: not a byte reached the provider


@dataclass(frozen=True)
class CallOutcome:
    """The classified result of one `place_call`."""

    kind: OutcomeKind
    call_id: str | None = None
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None
    replayed: bool = False


@runtime_checkable
class TelephonyClient(Protocol):
    """What the dispatcher needs from a telephony provider."""

    async def place_call(self, request: CallRequest, *, may_send: Callable[[], bool] | None = None) -> CallOutcome:
        """Place one call; never raises for HTTP or network failures.

        `may_send`, when given, is asked at the last moment before the request leaves; if it
        answers False nothing is sent and the outcome is NOT_SENT.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class HttpTelephonyClient:
    """`TelephonyClient` over the provider's HTTP API, on an httpx transport (httpx-aiohttp's by default).

    `timeout` bounds each `place_call` as a whole (connect, pool wait, send and read).
    `max_connections` caps concurrent connections to the provider.
    `transport` replaces the default aiohttp-backed one (tests pass respx's or an ASGI transport).

    Requests go straight to the transport, not through `httpx.AsyncClient`: the client's cookie
    jar, auth flow, redirect handling and URL merging cost more CPU per call than the transport
    itself and none of them applies to one POST to a fixed URL (BENCHMARKS.md).

    `place_call`'s `may_send` is asked in the task that writes the request, after the connection
    is set up, right before its first byte goes to the socket (the headers are buffered until
    then). A caller that checked its right to send and was then frozen (SIGSTOP, a long GC or VM
    pause) before the bytes left is caught there when it resumes; without it the request goes out
    on resume, event-loop iterations after the caller's own check.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        require_http_url("base_url", base_url)
        self._url = httpx.URL(base_url.rstrip("/") + _CALLS_PATH)
        self._timeout = timeout
        self._headers = {**ANSWER_HEADERS, "User-Agent": _USER_AGENT}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._transport = transport if transport is not None else pooled_transport(max_connections)

    @property
    def calls_url(self) -> str:
        """The URL calls are POSTed to."""
        return str(self._url)

    @property
    def transport(self) -> httpx.AsyncBaseTransport:
        """The httpx transport requests are sent through."""
        return self._transport

    async def __aenter__(self) -> HttpTelephonyClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._transport.aclose()

    async def place_call(self, request: CallRequest, *, may_send: Callable[[], bool] | None = None) -> CallOutcome:
        """POST one call and classify the answer; only cancellation and misuse raise."""
        # Serialised here, once, so every attempt of a key carries the same bytes.
        body = json.dumps(request.payload(), ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        headers = {**self._headers, "Idempotency-Key": request.idempotency_key, "Content-Type": "application/json"}
        try:
            # The one deadline of the call. No per-phase timeouts go to the transport: each would
            # be one more timer per call, and this one bounds them all.
            response = await post_guarded(functools.partial(send_capped, self._transport), self._url, headers, body,
                                          may_send=may_send, timeout=self._timeout)
        except SendRefused:
            outcome = CallOutcome(OutcomeKind.NOT_SENT, error="not sent: the sender may no longer send")
        except (httpx.HTTPError, TimeoutError) as exc:
            # HTTP errors without a response (e.g. an unreadable body) may have landed: transient.
            outcome = CallOutcome(OutcomeKind.TRANSIENT, error=describe_failure(exc, request.to, request.from_))
        else:
            outcome = _classify(response, request)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "call %s to %s: %s status=%s%s",
                request.idempotency_key,
                mask_phone(request.to),
                outcome.kind,
                outcome.status_code,
                " (replayed)" if outcome.replayed else "",
            )
        return outcome


async def read_capped(response: httpx.Response) -> httpx.Response:
    """The response with its body read up to MAX_RESPONSE_BYTES; reading stops past the cap.

    A longer body is cut at the cap (its JSON then does not parse: no call id, no error text) and
    the returned response carries `extensions["truncated"] = True`.
    """
    chunks: list[bytes] = []
    size = 0
    truncated = False
    try:
        already = response.content  # a transport that hands over a read response (tests' mocks)
    except httpx.ResponseNotRead:
        stream = response.aiter_raw()
    else:
        stream = _one(already)
    async for chunk in stream:
        if size + len(chunk) > MAX_RESPONSE_BYTES:
            chunks.append(chunk[: MAX_RESPONSE_BYTES - size])
            truncated = True
            break
        chunks.append(chunk)
        size += len(chunk)
    # Raw bytes as sent (we asked for identity); a Content-Encoding we did not ask for is not decoded.
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() != "content-encoding"]
    capped = httpx.Response(
        response.status_code, headers=headers, content=b"".join(chunks), request=response._request,
        extensions={**response.extensions, "truncated": truncated},
    )
    await response.aclose()
    return capped


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


# identity: a compressed answer could expand far past MAX_RESPONSE_BYTES once decoded
ANSWER_HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}


def require_http_url(what: str, url: str) -> None:
    """ValueError naming `what` unless `url` is an absolute http(s) URL."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{what} must be an absolute http(s) URL")


def pooled_transport(max_connections: int) -> httpx.AsyncBaseTransport:
    """The aiohttp transport the adapters send through. Idle connections are dropped before a
    server with a 5 s keep-alive (uvicorn's default) closes them, so a POST rarely lands on a
    connection being closed."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                          keepalive_expiry=4.0)
    return AiohttpTransport(limits=limits)


async def send_capped(transport: httpx.AsyncBaseTransport, request: httpx.Request) -> httpx.Response:
    """One request through `transport`, its answer read up to MAX_RESPONSE_BYTES and closed."""
    response = await transport.handle_async_request(request)
    try:
        return await read_capped(response)
    finally:
        await response.aclose()


class SendRefused(Exception):
    """`may_send` refused as the request was about to be written: nothing left this process."""


class _NotSent(Exception):
    """Raised inside the request body when `may_send` refuses: the request never leaves."""


async def post_guarded(
    send: Callable[[httpx.Request], Awaitable[httpx.Response]],
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    may_send: Callable[[], bool] | None,
    timeout: float,
) -> httpx.Response:
    """POST `body` to `url` through `send`, all within `timeout`, asking `may_send` at the last
    moment: when the transport starts writing the body, once it holds a connection. A sender
    that lost its right to send while it connected (a deposed leader) sends nothing.

    Raises SendRefused when `may_send` refused (certainly not sent), httpx.HTTPError or
    TimeoutError when the request may or may not have arrived; returns the answer otherwise."""
    refused = False

    async def last_moment() -> AsyncIterator[bytes]:
        nonlocal refused
        if may_send is not None and not may_send():
            refused = True
            raise _NotSent("may_send refused")
        yield body

    request = httpx.Request("POST", url, headers={**headers, "Content-Length": str(len(body))},
                            content=body if may_send is None else last_moment())
    try:
        async with asyncio.timeout(timeout):
            return await send(request)
    except Exception:
        if refused:  # whatever the transport wrapped _NotSent in
            raise SendRefused from None
        raise


def describe_failure(exc: BaseException, *numbers: str) -> str:
    """ "timeout: <type>: <text>" or "network: <type>: <text>" for a request that got no answer,
    `numbers` and anything phone-like masked.

    httpx-aiohttp maps every aiohttp connection error (refused, server disconnected) to
    httpx.ConnectTimeout, so the aiohttp exception it wraps, when there is one, decides.
    """
    cause = exc.__cause__
    root = cause if cause is not None and type(cause).__module__.startswith("aiohttp") else exc
    what = "timeout" if isinstance(root, httpx.TimeoutException | TimeoutError) else "network"
    detail = str(root)
    text = f"{what}: {type(root).__name__}" + (f": {detail}" if detail else "")
    return error_text(text, *numbers)


def _body_error(response: httpx.Response) -> str | None:
    """The provider's own error text, if its JSON body carries one."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict):
        for field in ("error", "detail", "message"):
            value = body.get(field)
            if isinstance(value, str) and value:
                return value
    return None


def _classify(response: httpx.Response, request: CallRequest) -> CallOutcome:
    status = response.status_code
    replayed = response.headers.get("Idempotent-Replayed", "").strip().lower() == "true"

    if 200 <= status < 300:
        call_id = None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("id"), str) and body["id"]:
            call_id = body["id"]
            if usable_call_id(call_id) is None:
                # The provider accepted the call: it is sent, whatever its id looks like. The id
                # itself is refused (it could not be stored) and the refusal noted.
                return CallOutcome(
                    OutcomeKind.SENT,
                    status_code=status,
                    error=f"provider call id refused: {len(call_id)} characters, not 1-{MAX_CALL_ID_LEN} printable",
                    replayed=replayed,
                )
        if call_id is None:
            return CallOutcome(
                OutcomeKind.PERMANENT,
                status_code=status,
                error=f"HTTP {status}: response without a call id",
                replayed=replayed,
            )
        return CallOutcome(OutcomeKind.SENT, call_id=call_id, status_code=status, replayed=replayed)

    provider_error = _body_error(response)
    error = f"HTTP {status}" + (f": {provider_error}" if provider_error else "")
    if response.extensions.get("truncated"):
        error += f" (answer over {MAX_RESPONSE_BYTES} bytes, not read)"
    error = error_text(error, request.to, request.from_)
    # 409: the first request with this key is still running; 408: the provider gave up waiting.
    transient = status >= 500 or status in (408, 409, 429)
    if transient:
        return CallOutcome(
            OutcomeKind.TRANSIENT,
            status_code=status,
            error=error,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            replayed=replayed,
        )
    return CallOutcome(OutcomeKind.PERMANENT, status_code=status, error=error, replayed=replayed)
