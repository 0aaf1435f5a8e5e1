"""The Telnyx adapter's wire format (respx), its classification of answers, the event envelope,
and the Ed25519 signature from a fixed key pair."""

from __future__ import annotations

import base64
import json
import logging

import httpx
import pytest
import respx

from reminders_fakes.telnyx import TEST_PUBLIC_KEY, TEST_SIGNING_SEED, sign
from service.providers.telnyx.events import parse_event
from service.providers.telnyx.rest import TelnyxProvider
from service.providers.telnyx.signature import TelnyxSignature
from service.telephony.provider import CallSpec, CreateKind, ProviderUnavailable, Stamp

pytestmark = pytest.mark.anyio

API = "https://api.telnyx.test/base"
SPEC = CallSpec(to="+14155552671", from_="+15550000000", reminder_id="r-1", appointment_id="ap-1", attempt_id="a-1")
# A fixed key pair (the fake's test seed): Ed25519 is deterministic, so this signature is a vector.
TIMESTAMP = "1700000000"
BODY = b'{"data":{"event_type":"call.initiated"}}'
SIGNATURE = "5GPDO05ZUz31EEYtPbKkdRHh15XB2EUAjjH2qKXJw5y5a/eLTRpZO32WC0nCyuGMw289GwU2pyJtTIIZzd0nAw=="


@pytest.fixture
def respx_mock() -> respx.MockRouter:
    return respx.MockRouter(assert_all_called=False)


def provider(router: respx.MockRouter) -> TelnyxProvider:
    """The adapter with respx's router as its transport (it sends straight to the transport)."""
    return TelnyxProvider(api_url=API, api_key="KEY123", connection_id="conn-7",
                          public_url="https://reminders.example.test/edge",
                          transport=httpx.MockTransport(router.async_handler))


def test_the_fixed_key_pair_and_its_signature() -> None:
    assert TEST_PUBLIC_KEY == "TEOGIenjzbRe88YC4dt6pniu32iXCHUW9VJoIk1MO0s="
    assert sign(TEST_SIGNING_SEED, TIMESTAMP, BODY) == SIGNATURE
    check = TelnyxSignature(TEST_PUBLIC_KEY)
    now = float(TIMESTAMP) + 10
    assert check.valid(BODY, SIGNATURE, TIMESTAMP, now=now)
    assert not check.valid(BODY + b" ", SIGNATURE, TIMESTAMP, now=now)  # the raw body, byte for byte
    assert not check.valid(BODY, SIGNATURE, "1700000001", now=now)  # the timestamp is signed too
    assert not check.valid(BODY, SIGNATURE, TIMESTAMP, now=float(TIMESTAMP) + 301)  # stale
    assert check.valid(BODY, SIGNATURE, TIMESTAMP, now=float(TIMESTAMP) + 299)
    assert not check.valid(BODY, SIGNATURE, TIMESTAMP, now=float(TIMESTAMP) - 301)  # from the future
    for signature, timestamp in ((None, TIMESTAMP), (SIGNATURE, None), ("not base64!", TIMESTAMP),
                                 (base64.b64encode(b"x" * 63).decode(), TIMESTAMP), (SIGNATURE, "17e8")):
        assert not check.valid(BODY, signature, timestamp, now=now)
    other = base64.b64encode(bytes(32)).decode()
    assert not TelnyxSignature(other).valid(BODY, SIGNATURE, TIMESTAMP, now=now)
    with pytest.raises(ValueError, match="32 bytes"):
        TelnyxSignature(base64.b64encode(b"short").decode())


async def test_dial_wire_format(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(f"{API}/v2/calls").mock(return_value=httpx.Response(
        200, json={"data": {"call_control_id": "v3:abc", "call_leg_id": "l", "call_session_id": "s",
                            "is_alive": False, "record_type": "call"}}))
    telnyx = provider(respx_mock)
    result = await telnyx.create_call(SPEC)
    await telnyx.aclose()
    assert result.kind is CreateKind.CREATED and result.call_id == "v3:abc"
    request = route.calls.last.request
    assert request.headers["Authorization"] == "Bearer KEY123"
    assert request.headers["Content-Type"] == "application/json"
    body = json.loads(request.content)
    assert body == {
        "connection_id": "conn-7", "to": "+14155552671", "from": "+15550000000",
        "webhook_url": "https://reminders.example.test/edge/telephony/telnyx/events", "webhook_url_method": "POST",
        "client_state": Stamp("r-1", "a-1").encode(), "command_id": "a-1",
    }
    assert Stamp.decode(body["client_state"]) == Stamp("r-1", "a-1")
    detecting = TelnyxProvider(api_url=API, api_key="K", connection_id="conn-7", public_url="https://x.test",
                               transport=httpx.MockTransport(respx_mock.async_handler), machine_detection=True)
    assert detecting.dial_body(SPEC)["answering_machine_detection"] == "detect_beep"  # a voicemail after the beep
    # the detection's bound, which the sweep's greeting of a call with no result counts on
    assert detecting.dial_body(SPEC)["answering_machine_detection_config"] == {"total_analysis_time_millis": 3500}
    await detecting.aclose()
    assert base64.b64decode(body["client_state"]) == b'["r-1","a-1"]'


@pytest.mark.parametrize(
    ("response", "kind", "retry_after"),
    [
        (httpx.Response(429, json={"errors": [{"code": "90103", "title": "Dial rate limit exceeded"}]}),
         CreateKind.NOT_CREATED, 1.0),
        (httpx.Response(429, headers={"Retry-After": "3"}, json={"errors": [{"code": "90103"}]}),
         CreateKind.NOT_CREATED, 3.0),
        (httpx.Response(500, json={"errors": [{"code": "10007"}]}), CreateKind.IN_DOUBT, None),
        (httpx.Response(503, text="busy"), CreateKind.IN_DOUBT, None),
        (httpx.Response(200, json={"data": {}}), CreateKind.IN_DOUBT, None),
        (httpx.Response(422, json={"errors": [{"code": "10016", "title": "Invalid 'to' +14155552671"}]}),
         CreateKind.REJECTED, None),
        (httpx.Response(401, json={"errors": [{"code": "10009"}]}), CreateKind.REJECTED, None),
    ],
)
async def test_dial_answers_are_classified(respx_mock: respx.MockRouter, response: httpx.Response, kind: CreateKind,
                                           retry_after: float | None) -> None:
    respx_mock.post(f"{API}/v2/calls").mock(return_value=response)
    telnyx = provider(respx_mock)
    result = await telnyx.create_call(SPEC)
    await telnyx.aclose()
    assert result.kind is kind and result.retry_after == retry_after
    assert "4155552671" not in (result.error or "")  # the number never lands in an error text


async def test_a_timeout_is_in_doubt_and_a_refusal_sends_nothing(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(f"{API}/v2/calls").mock(side_effect=httpx.ReadTimeout("slow"))
    telnyx = provider(respx_mock)
    assert (await telnyx.create_call(SPEC)).kind is CreateKind.IN_DOUBT
    assert (await telnyx.create_call(SPEC, may_send=lambda: False)).kind is CreateKind.NOT_SENT
    await telnyx.aclose()
    assert route.call_count == 1


async def test_commands_wire_format(respx_mock: respx.MockRouter) -> None:
    speak = respx_mock.post(f"{API}/v2/calls/v3:abc/actions/speak").mock(return_value=httpx.Response(200, json={}))
    hangup = respx_mock.post(f"{API}/v2/calls/v3:abc/actions/hangup").mock(return_value=httpx.Response(
        422, json={"errors": [{"code": "90018", "title": "Call has already ended"}]}))
    gather = respx_mock.post(f"{API}/v2/calls/v3:abc/actions/gather_using_speak").mock(
        return_value=httpx.Response(200, json={}))
    telnyx = provider(respx_mock)
    stamp = Stamp("r-1", "a-1")
    assert await telnyx.speak("v3:abc", "Hello", command_id="speak-a-1", stamp=stamp)
    assert await telnyx.hang_up("v3:abc", command_id="h-1")  # already ended: done
    assert await telnyx.gather_using_speak("v3:abc", "Press 1", command_id="g-1", stamp=stamp)
    await telnyx.aclose()
    assert json.loads(speak.calls.last.request.content) == {
        "payload": "Hello", "payload_type": "text", "voice": "female", "language": "en-US",
        "command_id": "speak-a-1", "client_state": stamp.encode()}
    assert json.loads(hangup.calls.last.request.content) == {"command_id": "h-1"}
    gathered = json.loads(gather.calls.last.request.content)
    assert gathered["valid_digits"] == "0123456789*#" and gathered["maximum_digits"] == 1  # any key: 1, 2 or "again"
    assert gathered["client_state"] == stamp.encode()


async def test_speak_to_an_ended_call_is_done_and_other_refusals_are_not(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(f"{API}/v2/calls/v3:abc/actions/speak")
    telnyx = provider(respx_mock)
    route.mock(return_value=httpx.Response(422, json={"errors": [{"code": "90018"}]}))
    assert await telnyx.speak("v3:abc", "Hello", command_id="s", stamp=Stamp("r", "a"))  # over: nothing more to do
    for refusal in (httpx.Response(422, json={"errors": [{"code": "90034"}]}), httpx.Response(503)):
        route.mock(return_value=refusal)
        assert not await telnyx.speak("v3:abc", "Hello", command_id="s", stamp=Stamp("r", "a"))
    route.mock(side_effect=httpx.ConnectError("down"))
    assert not await telnyx.speak("v3:abc", "Hello", command_id="s", stamp=Stamp("r", "a"))
    await telnyx.aclose()


async def test_active_calls_follow_the_cursor_and_keep_only_stamped_calls(respx_mock: respx.MockRouter) -> None:
    ours, other = Stamp("r-1", "a-1").encode(), base64.b64encode(b"not ours").decode()
    url = f"{API}/v2/connections/conn-7/active_calls"
    respx_mock.get(url, params={"page[after]": "c2"}).mock(return_value=httpx.Response(200, json={
        "data": [{"call_control_id": "v3:2", "client_state": ours}], "meta": {"cursors": {"after": None}}}))
    first = respx_mock.get(url).mock(return_value=httpx.Response(200, json={
        "data": [{"call_control_id": "v3:1", "client_state": other}, {"call_control_id": "v3:0", "client_state": None}],
        "meta": {"cursors": {"after": "c2"}}}))
    telnyx = provider(respx_mock)
    calls = await telnyx.live_calls("+14155552671")
    await telnyx.aclose()
    assert [(c.call_id, c.stamp) for c in calls] == [("v3:2", Stamp("r-1", "a-1"))]
    assert first.calls[0].request.url.params["page[size]"] == "250"


async def test_an_unlistable_connection_is_unavailable(respx_mock: respx.MockRouter) -> None:
    respx_mock.get(f"{API}/v2/connections/conn-7/active_calls").mock(return_value=httpx.Response(502))
    telnyx = provider(respx_mock)
    with pytest.raises(ProviderUnavailable):
        await telnyx.live_calls("+14155552671")
    await telnyx.aclose()


def test_the_event_envelope() -> None:
    body = json.dumps({"data": {
        "event_type": "call.answered", "id": "e-1", "occurred_at": "2026-11-30T10:00:00.123456Z",
        "record_type": "event",
        "payload": {"call_control_id": "v3:abc", "client_state": Stamp("r-1", "a-1").encode(), "to": "+1"}},
        "meta": {"attempt": 1}}).encode()
    event = parse_event(body)
    assert event is not None and event.event_type == "call.answered" and event.call_id == "v3:abc"
    assert event.stamp == Stamp("r-1", "a-1") and event.occurred_at.microsecond == 123456
    later = parse_event(body.replace(b"00.123456Z", b"00.123457Z"))
    assert later is not None and later.order == event.order + 1
    assert parse_event(b"not json") is None and parse_event(b'{"data": {}}') is None
    foreign = parse_event(body.replace(Stamp("r-1", "a-1").encode().encode(), b"aGVsbG8="))
    assert foreign is not None and foreign.stamp is None


async def test_no_request_url_reaches_the_logs(respx_mock: respx.MockRouter, caplog: pytest.LogCaptureFixture) -> None:
    dialled = httpx.Response(200, json={"data": {"call_control_id": "v3:x"}})
    respx_mock.post(f"{API}/v2/calls").mock(return_value=dialled)
    telnyx = provider(respx_mock)
    with caplog.at_level(logging.DEBUG):
        await telnyx.create_call(SPEC)
    await telnyx.aclose()
    assert "4155552671" not in caplog.text and "KEY123" not in caplog.text
