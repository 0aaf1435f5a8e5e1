"""The generic provider's HTTP API client (docs/DESIGN.md, "The generic provider"): places one call
per request with the reminder's `Idempotency-Key` and classifies the answer.

It never retries and never sleeps: it answers with a `CallOutcome` that tells the caller whether
the call was placed, may be tried again with the same idempotency key, or will never succeed.
Nothing here knows the database, reminders' storage or leadership.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import httpx

from service.privacy import mask_phone
from service.telephony.http import (
    ANSWER_HEADERS,
    MAX_CALL_ID_LEN,
    MAX_RESPONSE_BYTES,
    SendRefused,
    describe_failure,
    error_text,
    parse_retry_after,
    pooled_transport,
    post_guarded,
    require_http_url,
    send_capped,
    usable_call_id,
)

__all__ = ["CallOutcome", "CallRequest", "HttpTelephonyClient", "OutcomeKind", "TelephonyClient"]

logger = logging.getLogger(__name__)


_CALLS_PATH = "/v1/calls"


_USER_AGENT = "reminders-telephony-client"


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
