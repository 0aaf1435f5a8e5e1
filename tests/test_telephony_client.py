"""HttpTelephonyClient against a provider mocked with respx: request shape and outcome classes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import respx
from httpx_aiohttp import AiohttpTransport

from service.privacy import mask_phone
from service.providers.generic.client import CallOutcome, CallRequest, HttpTelephonyClient, OutcomeKind, TelephonyClient
from service.telephony.http import parse_retry_after

BASE = "http://provider.test"
URL = f"{BASE}/v1/calls"
TO = "+15551234567"
FROM = "+15550000000"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_request(**overrides: str) -> CallRequest:
    fields = {
        "to": TO,
        "from_": FROM,
        "message": "Reminder: dentist tomorrow at 10:00",
        "appointment_id": "appt-1",
        "reminder_id": "rem-1",
        "idempotency_key": "reminder-rem-1",
    }
    fields.update(overrides)
    return CallRequest(**fields)


@pytest.fixture
def mock() -> respx.MockRouter:
    # The client sends through its transport, not httpx.AsyncClient, so respx is handed to it as
    # one (its patching mockers target httpcore or AsyncClient, which this path never uses).
    return respx.MockRouter(assert_all_called=False)


def mocked(router: respx.MockRouter, base_url: str = BASE, **options: object) -> HttpTelephonyClient:
    return HttpTelephonyClient(base_url, transport=httpx.MockTransport(router.async_handler), **options)


@pytest.fixture
async def client(mock: respx.MockRouter) -> AsyncIterator[HttpTelephonyClient]:
    c = mocked(mock, token="s3cret", timeout=5.0)
    yield c
    await c.aclose()


def created(call_id: str = "call_abc") -> httpx.Response:
    return httpx.Response(
        201,
        json={"id": call_id, "status": "queued", "to": TO, "from": FROM, "created_at": "now"},
    )


def assert_clean(outcome: CallOutcome) -> None:
    assert outcome.error is None or TO not in outcome.error


# --- the default transport is aiohttp; respx serves as an injected one ------------------------


@pytest.mark.anyio
async def test_default_transport_is_aiohttp() -> None:
    async with HttpTelephonyClient(BASE, max_connections=7) as c:
        assert isinstance(c.transport, AiohttpTransport)
        assert c.transport.limits.max_connections == 7
        assert isinstance(c, TelephonyClient)


@pytest.mark.anyio
async def test_respx_intercepts_the_injected_transport(
    client: HttpTelephonyClient, mock: respx.MockRouter
) -> None:
    route = mock.post(URL).mock(return_value=created())
    outcome = await client.place_call(make_request())
    assert route.call_count == 1
    assert outcome == CallOutcome(OutcomeKind.SENT, call_id="call_abc", status_code=201)


@pytest.mark.anyio
async def test_may_send_refusal_sends_nothing(
    client: HttpTelephonyClient, mock: respx.MockRouter
) -> None:
    route = mock.post(URL).mock(return_value=created())
    asked: list[bool] = []

    def refuse() -> bool:
        asked.append(False)
        return False

    outcome = await client.place_call(make_request(), may_send=refuse)
    assert outcome.kind is OutcomeKind.NOT_SENT
    assert asked == [False]
    assert route.call_count == 0
    allowed = await client.place_call(make_request(), may_send=lambda: True)
    assert allowed.kind is OutcomeKind.SENT
    assert json.loads(route.calls.last.request.content)["to"] == TO


# --- request shape ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_request_body_headers_and_same_key_on_every_attempt(
    client: HttpTelephonyClient, mock: respx.MockRouter
) -> None:
    route = mock.post(URL).mock(
        side_effect=[httpx.Response(503), httpx.ReadTimeout("slow"), created()]
    )
    request = make_request()
    kinds = [(await client.place_call(request)).kind for _ in range(3)]
    assert kinds == [OutcomeKind.TRANSIENT, OutcomeKind.TRANSIENT, OutcomeKind.SENT]
    assert route.call_count == 3
    for call in route.calls:
        sent = call.request
        assert sent.method == "POST"
        assert sent.headers["Idempotency-Key"] == "reminder-rem-1"
        assert sent.headers["Authorization"] == "Bearer s3cret"
        assert sent.headers["Content-Type"] == "application/json"
        assert json.loads(sent.content) == {
            "to": TO,
            "from": FROM,
            "message": "Reminder: dentist tomorrow at 10:00",
            "metadata": {"appointment_id": "appt-1", "reminder_id": "rem-1"},
        }


@pytest.mark.anyio
async def test_no_authorization_header_without_token(mock: respx.MockRouter) -> None:
    route = mock.post(URL).mock(return_value=created())
    async with mocked(mock) as c:
        await c.place_call(make_request())
    assert "Authorization" not in route.calls.last.request.headers


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://provider.test", "http://provider.test/v1/calls"),
        ("http://provider.test/", "http://provider.test/v1/calls"),
        ("http://provider.test/replica-a", "http://provider.test/replica-a/v1/calls"),
        ("http://provider.test/replica-a/", "http://provider.test/replica-a/v1/calls"),
        ("https://provider.test:8443/a/b", "https://provider.test:8443/a/b/v1/calls"),
    ],
)
async def test_path_prefix_in_base_url(
    mock: respx.MockRouter, base_url: str, expected: str
) -> None:
    route = mock.post(expected).mock(return_value=created())
    async with mocked(mock, base_url) as c:
        assert c.calls_url == expected
        outcome = await c.place_call(make_request())
    assert outcome.kind is OutcomeKind.SENT
    assert str(route.calls.last.request.url) == expected


def test_bad_base_url_is_rejected() -> None:
    with pytest.raises(ValueError):
        HttpTelephonyClient("provider.test/v1")


def test_empty_idempotency_key_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        make_request(idempotency_key="")


# --- outcome classes --------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("status", [200, 201])
async def test_replay_is_sent_and_flagged(
    client: HttpTelephonyClient, mock: respx.MockRouter, status: int
) -> None:
    mock.post(URL).mock(
        return_value=httpx.Response(
            status,
            json={"id": "call_1", "status": "queued"},
            headers={"Idempotent-Replayed": "true"},
        )
    )
    outcome = await client.place_call(make_request())
    assert outcome == CallOutcome(
        OutcomeKind.SENT, call_id="call_1", status_code=status, replayed=True
    )


@pytest.mark.anyio
async def test_in_progress_409_is_transient(
    client: HttpTelephonyClient, mock: respx.MockRouter
) -> None:
    mock.post(URL).mock(return_value=httpx.Response(409, json={"error": "in progress"}))
    outcome = await client.place_call(make_request())
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.status_code == 409
    assert outcome.error == "HTTP 409: in progress"
    assert outcome.call_id is None


@pytest.mark.anyio
@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_in_seconds(
    client: HttpTelephonyClient, mock: respx.MockRouter, status: int
) -> None:
    mock.post(URL).mock(return_value=httpx.Response(status, headers={"Retry-After": "7"}))
    outcome = await client.place_call(make_request())
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.status_code == status
    assert outcome.retry_after == 7.0


@pytest.mark.anyio
async def test_retry_after_as_http_date(
    client: HttpTelephonyClient, mock: respx.MockRouter
) -> None:
    when = datetime.now(UTC) + timedelta(hours=1)
    mock.post(URL).mock(
        return_value=httpx.Response(
            429, headers={"Retry-After": format_datetime(when, usegmt=True)}
        )
    )
    outcome = await client.place_call(make_request())
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.retry_after is not None
    assert 0 < outcome.retry_after <= 3600


def test_parse_retry_after() -> None:
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    epoch = datetime(2015, 10, 21, 7, 28, tzinfo=UTC).timestamp()
    assert parse_retry_after(date, now=epoch - 90) == 90.0
    assert parse_retry_after(date, now=epoch + 90) == 0.0  # in the past: retry now
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    for bad in (None, "", "-5", "soon", "1e3", "Wed, 99 Foo 2015"):
        assert parse_retry_after(bad) is None


@pytest.mark.anyio
@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_server_errors_are_transient(
    client: HttpTelephonyClient, mock: respx.MockRouter, status: int
) -> None:
    mock.post(URL).mock(return_value=httpx.Response(status, text="<html>oops</html>"))
    outcome = await client.place_call(make_request())
    assert outcome == CallOutcome(OutcomeKind.TRANSIENT, status_code=status, error=f"HTTP {status}")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.PoolTimeout("pool"),
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("server disconnected"),
        httpx.ReadError("reset by peer"),
    ],
)
async def test_network_failures_are_transient_without_status(
    client: HttpTelephonyClient, mock: respx.MockRouter, exc: Exception
) -> None:
    mock.post(URL).mock(side_effect=exc)
    outcome = await client.place_call(make_request())
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.status_code is None
    assert outcome.call_id is None
    assert outcome.error and type(exc).__name__ in outcome.error
    assert outcome.error.startswith(
        "timeout" if isinstance(exc, httpx.TimeoutException) else "network"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_client_errors_are_permanent(
    client: HttpTelephonyClient, mock: respx.MockRouter, status: int
) -> None:
    mock.post(URL).mock(return_value=httpx.Response(status, json={"error": f"invalid number {TO}"}))
    outcome = await client.place_call(make_request())
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.status_code == status
    assert outcome.error is not None and outcome.error.startswith(f"HTTP {status}: invalid number")
    assert outcome.retry_after is None
    assert_clean(outcome)
    assert mask_phone(TO) in outcome.error


@pytest.mark.anyio
@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(201, json={"status": "queued"}),
        httpx.Response(201, json={"id": ""}),
        httpx.Response(201, json={"id": 42}),
        httpx.Response(200, json=["call_1"]),
        httpx.Response(201, text="created"),
        httpx.Response(204),
    ],
)
async def test_success_without_call_id_is_permanent(
    client: HttpTelephonyClient, mock: respx.MockRouter, response: httpx.Response
) -> None:
    mock.post(URL).mock(return_value=response)
    outcome = await client.place_call(make_request())
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.call_id is None
    assert outcome.status_code == response.status_code


@pytest.mark.anyio
async def test_redirect_is_not_followed(
    client: HttpTelephonyClient, mock: respx.MockRouter
) -> None:
    mock.post(URL).mock(return_value=httpx.Response(307, headers={"Location": f"{BASE}/x"}))
    outcome = await client.place_call(make_request())
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.status_code == 307


# --- deadline and cancellation (a transport that never answers) -------------------------------


class NeverAnswers(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.mark.anyio
async def test_whole_request_deadline_gives_transient_timeout() -> None:
    async with HttpTelephonyClient(BASE, timeout=0.05, transport=NeverAnswers()) as c:
        outcome = await c.place_call(make_request())
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.status_code is None
    assert outcome.error is not None and outcome.error.startswith("timeout")


@pytest.mark.anyio
async def test_cancellation_propagates() -> None:
    transport = NeverAnswers()
    async with HttpTelephonyClient(BASE, timeout=60, transport=transport) as c:
        task = asyncio.create_task(c.place_call(make_request()))
        await transport.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- phone numbers never leak -----------------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    ["+15551234567", "+447911123456", "+4930123456", "+12", "+1", "5551234", "12", "1"],
)
def test_mask_phone_never_returns_the_full_number(number: str) -> None:
    masked = mask_phone(number)
    assert masked != number
    assert len(masked) == len(number)
    assert "*" in masked


def test_mask_phone_shape() -> None:
    assert mask_phone("+15551234567") == "+1555*****67"
    assert mask_phone("+447911123456") == "+4479******56"


def test_request_repr_masks_numbers() -> None:
    text = repr(make_request())
    assert TO not in text and FROM not in text
    assert mask_phone(TO) in text


@pytest.mark.anyio
async def test_network_error_text_is_masked(
    client: HttpTelephonyClient, mock: respx.MockRouter
) -> None:
    mock.post(URL).mock(side_effect=httpx.ConnectError(f"cannot dial {TO} via 5550000000"))
    outcome = await client.place_call(make_request())
    assert outcome.error is not None
    assert TO not in outcome.error and "5550000000" not in outcome.error
