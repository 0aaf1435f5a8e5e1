"""The HTTP plumbing every provider adapter shares: the one guarded POST a create goes through
(`may_send` asked as the body is written), answers read capped, pooled transports, error texts
with phone numbers masked, Retry-After. Knows no provider's format and no database.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime

import httpx
from httpx_aiohttp import AiohttpTransport

from service.privacy import scrub, strip_control
from service.telephony.provider import CreateKind, CreateResult, TelephonyError

__all__ = [
    "ANSWER_HEADERS",
    "HttpAdapter",
    "MAX_RESPONSE_BYTES",
    "MAX_CALL_ID_LEN",
    "SendRefused",
    "describe_failure",
    "error_text",
    "parse_retry_after",
    "pooled_transport",
    "post_guarded",
    "read_capped",
    "refused_create",
    "require_http_url",
    "send_capped",
    "usable_call_id",
]

logger = logging.getLogger(__name__)

_MAX_ERROR_LEN = 160
# The provider's answer is read up to this many bytes: a call's JSON is a few hundred.
MAX_RESPONSE_BYTES = 64 * 1024
# A call id is stored (String(128)) and sent back to the provider: bounded, printable, no spaces.
MAX_CALL_ID_LEN = 128
_CALL_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_CALL_ID_LEN}}}")
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


class SendRefused(TelephonyError):
    """`may_send` refused as the request was about to be written: nothing left this process."""


class _NotSent(TelephonyError):
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






class HttpAdapter:
    """What the REST adapters of real providers share: requests go straight to a pooled transport
    (httpx.AsyncClient would log every request URL at INFO, and a listing's URL carries the
    callee's number), each answer read up to MAX_RESPONSE_BYTES; the caller holds the deadline."""

    def __init__(self, *, timeout: float = 10.0, max_connections: int = 20,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """`timeout` bounds each request as a whole; `transport` replaces the aiohttp-backed one
        (tests hand in respx's router or a provider-shaped fake)."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._timeout = timeout
        self._transport = transport if transport is not None else pooled_transport(max_connections)

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _send_request(self, request: httpx.Request) -> httpx.Response:
        return await send_capped(self._transport, request)


def refused_create(response: httpx.Response, error: str, *, default_retry_after: float) -> CreateResult:
    """A create answered with a non-2xx status: 429 was not processed (NOT_CREATED, after
    Retry-After or `default_retry_after`); 5xx and 408 may have created the call (IN_DOUBT); any
    other status will not succeed if repeated (REJECTED)."""
    status = response.status_code
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return CreateResult(CreateKind.NOT_CREATED, status_code=status, error=error,
                            retry_after=default_retry_after if retry_after is None else retry_after)
    if status >= 500 or status == 408:
        return CreateResult(CreateKind.IN_DOUBT, status_code=status, error=error)
    return CreateResult(CreateKind.REJECTED, status_code=status, error=error)
