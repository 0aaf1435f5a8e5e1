"""The Twilio adapter against respx: the wire format (form fields, Basic auth), result classes,
listing and cancelling; the webhook signature with Twilio's documented vector; the TwiML."""

from __future__ import annotations

import asyncio
import base64
import logging
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest
import respx

from service.providers.twilio.rest import STATUS_CALLBACK_EVENTS, TwilioProvider
from service.providers.twilio.signature import TwilioSignature
from service.providers.twilio.twiml import hangup_twiml, say_twiml
from service.telephony.provider import CallSpec, CreateKind, Provider, ProviderUnavailable, Stamp

pytestmark = pytest.mark.anyio

API = "https://api.twilio.test"
SID = "AC" + "1" * 32
TOKEN = "secret-token"
PUBLIC = "https://reminders.example.com/prefix"
CALLS = f"{API}/2010-04-01/Accounts/{SID}/Calls.json"
TO = "+14155552671"
FROM = "+15550000000"
SPEC = CallSpec(to=TO, from_=FROM, reminder_id="rem-1", appointment_id="app-1", attempt_id="att-1",
                message="never sent to Twilio")


@pytest.fixture
def router() -> respx.MockRouter:
    return respx.MockRouter(assert_all_called=False)


def provider_for(router: respx.MockRouter, *, api: str = API, timeout: float = 5.0) -> TwilioProvider:
    return TwilioProvider(api_url=api, account_sid=SID, auth_token=TOKEN, public_url=PUBLIC, timeout=timeout,
                          transport=httpx.MockTransport(router.async_handler))


def created(sid: str = "CA" + "a" * 32) -> httpx.Response:
    return httpx.Response(201, json={"sid": sid, "status": "queued", "to": TO, "from": FROM})


async def test_create_is_a_form_post_with_basic_auth_and_the_stamp_on_both_urls(router: respx.MockRouter) -> None:
    route = router.post(CALLS).mock(return_value=created())
    provider = provider_for(router)
    assert isinstance(provider, Provider)
    result = await provider.create_call(SPEC)
    await provider.aclose()

    assert result.kind is CreateKind.CREATED and result.call_id == "CA" + "a" * 32
    request = route.calls.last.request
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    form = parse_qsl(request.content.decode(), keep_blank_values=True)
    fields = dict(form)
    assert fields["To"] == TO and fields["From"] == FROM
    assert fields["Method"] == "POST" and fields["StatusCallbackMethod"] == "POST"
    assert [v for k, v in form if k == "StatusCallbackEvent"] == list(STATUS_CALLBACK_EVENTS)
    callbacks = (("Url", "/prefix/telephony/twilio/voice"), ("StatusCallback", "/prefix/telephony/twilio/status"))
    for name, path in callbacks:
        url = urlsplit(fields[name])
        assert (url.scheme, url.netloc, url.path) == ("https", "reminders.example.com", path)
        assert Stamp.from_query({k: v[0] for k, v in parse_qs(url.query).items()}) == Stamp("rem-1", "att-1")
    assert "never sent" not in request.content.decode()  # the words come from the webhook
    assert "MachineDetection" not in fields


async def test_api_url_may_carry_a_path_prefix(router: respx.MockRouter) -> None:
    route = router.post(f"https://space.signalwire.test/api/laml/2010-04-01/Accounts/{SID}/Calls.json").mock(
        return_value=created()
    )
    provider = provider_for(router, api="https://space.signalwire.test/api/laml/")
    assert (await provider.create_call(SPEC)).kind is CreateKind.CREATED
    assert route.called
    await provider.aclose()


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (httpx.Response(429, json={"code": 20429, "message": "Too Many Requests"}, headers={"Retry-After": "3"}),
         CreateKind.NOT_CREATED),
        (httpx.Response(500, json={"code": 20500, "message": "Internal Server Error"}), CreateKind.IN_DOUBT),
        (httpx.Response(503), CreateKind.IN_DOUBT),
        (httpx.Response(201, json={"status": "queued"}), CreateKind.IN_DOUBT),
        (httpx.Response(400, json={"code": 21211, "message": f"Invalid 'To' Phone Number {TO}"}), CreateKind.REJECTED),
        (httpx.Response(401, json={"code": 20003, "message": "Authenticate"}), CreateKind.REJECTED),
    ],
)
async def test_create_results(router: respx.MockRouter, response: httpx.Response, kind: CreateKind) -> None:
    router.post(CALLS).mock(return_value=response)
    provider = provider_for(router)
    result = await provider.create_call(SPEC)
    await provider.aclose()
    assert result.kind is kind
    if response.status_code == 429:
        assert result.retry_after == 3.0
    if result.error:
        assert TO not in result.error  # numbers masked in what may be logged or stored


async def test_a_429_without_retry_after_still_waits(router: respx.MockRouter) -> None:
    router.post(CALLS).mock(return_value=httpx.Response(429, json={"code": 20429}))
    provider = provider_for(router)
    result = await provider.create_call(SPEC)
    await provider.aclose()
    assert result.kind is CreateKind.NOT_CREATED and result.retry_after and result.retry_after > 0


async def test_timeout_and_network_errors_are_in_doubt_and_never_retried(router: respx.MockRouter) -> None:
    received = []

    async def slow(request: httpx.Request) -> httpx.Response:
        received.append(request)
        await asyncio.sleep(5)
        return created()

    def reset(request: httpx.Request) -> httpx.Response:
        received.append(request)
        raise httpx.ReadError("connection reset")

    route = router.post(CALLS).mock(side_effect=slow)
    provider = provider_for(router, timeout=0.2)
    assert (await provider.create_call(SPEC)).kind is CreateKind.IN_DOUBT
    assert len(received) == 1
    route.mock(side_effect=reset)
    assert (await provider.create_call(SPEC)).kind is CreateKind.IN_DOUBT
    assert len(received) == 2
    await provider.aclose()


async def test_may_send_refusal_sends_nothing(router: respx.MockRouter) -> None:
    route = router.post(CALLS).mock(return_value=created())
    provider = provider_for(router)
    result = await provider.create_call(SPEC, may_send=lambda: False)
    assert result.kind is CreateKind.NOT_SENT
    assert not route.called or route.calls.last.response is None
    assert (await provider.create_call(SPEC, may_send=lambda: True)).kind is CreateKind.CREATED
    await provider.aclose()


async def test_live_calls_lists_by_to_and_each_live_status(router: respx.MockRouter) -> None:
    def listing(request: httpx.Request) -> httpx.Response:
        status = request.url.params["Status"]
        calls = [{"sid": f"CA{status.replace('-', '')}", "status": status, "to": TO,
                  "date_created": "Mon, 30 Nov 2026 10:00:00 +0000"}] if status != "ringing" else []
        return httpx.Response(200, json={"calls": calls})

    route = router.get(CALLS).mock(side_effect=listing)
    provider = provider_for(router)
    live = await provider.live_calls(TO)
    assert [(c.status, c.created_at.isoformat()) for c in live] == [
        ("queued", "2026-11-30T10:00:00+00:00"), ("in-progress", "2026-11-30T10:00:00+00:00")]
    assert [(c.request.url.params["To"], c.request.url.params["Status"]) for c in route.calls] == [
        (TO, "queued"), (TO, "ringing"), (TO, "in-progress")]
    route.mock(return_value=httpx.Response(503))
    with pytest.raises(ProviderUnavailable):
        await provider.live_calls(TO)
    await provider.aclose()


async def test_cancel_posts_status_canceled(router: respx.MockRouter) -> None:
    sid = "CA" + "b" * 32
    route = router.post(f"{API}/2010-04-01/Accounts/{SID}/Calls/{sid}.json").mock(
        return_value=httpx.Response(200, json={"sid": sid, "status": "canceled"})
    )
    provider = provider_for(router)
    assert await provider.cancel(sid)
    assert parse_qs(route.calls.last.request.content.decode()) == {"Status": ["canceled"]}
    assert await provider.hang_up(sid)
    assert parse_qs(route.calls.last.request.content.decode()) == {"Status": ["completed"]}
    route.mock(return_value=httpx.Response(404, json={"code": 20404}))
    assert not await provider.cancel(sid)
    await provider.aclose()


# Twilio's documented example (twilio-python's tests/unit/test_request_validator.py and the
# webhooks security page): token 12345, this URL and these parameters sign to this value.
DOC_TOKEN = "12345"
DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234",
              "From": "+14158675309", "To": "+18005551212"}
DOC_SIGNATURE = "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_signature_matches_twilios_documented_vector() -> None:
    signature = TwilioSignature(DOC_TOKEN, "https://mycompany.com")
    assert signature.sign(DOC_URL, DOC_PARAMS) == DOC_SIGNATURE
    assert signature.valid("/myapp.php", "foo=1&bar=2", DOC_PARAMS, DOC_SIGNATURE)


def test_signature_is_checked_against_public_url_not_the_arrival_url() -> None:
    # Behind a proxy that strips "/prefix", the request arrives at /myapp.php; Twilio signed the public URL.
    signature = TwilioSignature(DOC_TOKEN, "https://mycompany.com/prefix")
    signed = signature.sign("https://mycompany.com/prefix/myapp.php?foo=1&bar=2", DOC_PARAMS)
    assert signature.valid("/myapp.php", "foo=1&bar=2", DOC_PARAMS, signed)
    assert not signature.valid("/myapp.php", "foo=1&bar=2", DOC_PARAMS, DOC_SIGNATURE)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda p, q, s: (p, "foo=1&bar=3", DOC_PARAMS, s),  # query changed
        lambda p, q, s: (p, q, {**DOC_PARAMS, "Digits": "9"}, s),  # a parameter changed
        lambda p, q, s: (p, q, {**DOC_PARAMS, "Extra": "x"}, s),  # a parameter added
        lambda p, q, s: (p, q, DOC_PARAMS, None),  # no signature
        lambda p, q, s: (p, q, DOC_PARAMS, ""),
        lambda p, q, s: (p, q, DOC_PARAMS, s[:-2] + "A="),
    ],
)
def test_signature_refuses_any_change(tamper) -> None:
    signature = TwilioSignature(DOC_TOKEN, "https://mycompany.com")
    assert not signature.valid(*tamper("/myapp.php", "foo=1&bar=2", DOC_SIGNATURE))
    assert not TwilioSignature("other", "https://mycompany.com").valid("/myapp.php", "foo=1&bar=2", DOC_PARAMS,
                                                                         DOC_SIGNATURE)


def test_twiml() -> None:
    assert say_twiml("Hello <Ann> & co") == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Say>Hello &lt;Ann&gt; &amp; co</Say><Hangup /></Response>'
    )
    assert say_twiml("Hallo", language="de-DE") == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Say language="de-DE">Hallo</Say><Hangup /></Response>'
    )
    assert hangup_twiml() == '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup /></Response>'


def test_stamp_round_trips_and_refuses_junk() -> None:
    stamp = Stamp("3f0c0d7e-0000-4000-8000-000000000001", "3f0c0d7e-0000-4000-8000-000000000002")
    assert Stamp.from_query(stamp.query()) == stamp
    assert Stamp.decode(stamp.encode()) == stamp
    assert Stamp.from_query({"r": "x"}) is None
    assert Stamp.from_query({"r": "a b", "a": "c"}) is None
    assert Stamp.decode("not base64!") is None


async def test_no_callee_number_reaches_the_logs(router: respx.MockRouter, caplog: pytest.LogCaptureFixture) -> None:
    router.post(CALLS).mock(return_value=httpx.Response(500))
    router.get(CALLS).mock(return_value=httpx.Response(200, json={"calls": []}))
    router.post(f"{API}/2010-04-01/Accounts/{SID}/Calls/{'CA' + 'c' * 32}.json").mock(return_value=httpx.Response(404))
    provider = provider_for(router)
    with caplog.at_level(logging.DEBUG):
        await provider.create_call(SPEC)
        await provider.live_calls(TO)
        await provider.cancel("CA" + "c" * 32)
    await provider.aclose()
    assert TO.removeprefix("+") not in caplog.text
