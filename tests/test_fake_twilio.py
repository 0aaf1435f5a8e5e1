"""The Twilio-shaped fake behaves like Twilio, not like the generic API: no idempotency, a CPS
queue, cancellation, listing by To/Status, scripted callees, signed webhooks, a log of what was heard."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from reminders_fakes.twilio import FakeTwilio
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio

SID = "AC" + "3" * 32
TOKEN = "fake-test-token"
BASE = f"/2010-04-01/Accounts/{SID}"
HOOKS = "https://hooks.test/app"
TO = "+14155552671"


class Sink:
    """The webhook receiver: records each signed request and answers the voice URL with `twiml`."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bool]] = []
        self.twiml = '<?xml version="1.0" encoding="UTF-8"?><Response><Say>Hello</Say><Hangup /></Response>'
        validator = RequestValidator(TOKEN)

        async def hook(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode()))
            url = str(request.url)
            valid = validator.validate(url, form, request.headers.get("X-Twilio-Signature", ""))
            self.requests.append((request.url.path, form, valid))
            if request.url.path.endswith("/voice"):
                return Response(self.twiml, media_type="application/xml")
            if request.url.path.endswith("/gather"):
                return Response('<Response><Say>Thanks</Say><Hangup/></Response>', media_type="application/xml")
            return Response(status_code=204)

        self.app = Starlette(routes=[Route("/app/{name}", hook, methods=["POST"])])


@pytest.fixture
async def world() -> AsyncIterator[tuple[FakeTwilio, Sink, httpx.AsyncClient]]:
    sink = Sink()
    fake = FakeTwilio(account_sid=SID, auth_token=TOKEN, calls_per_second=0, ring_ms=20,
                      webhook_transport=httpx.ASGITransport(sink.app))
    auth = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(fake.app), base_url="https://api.twilio.test",
                               headers={"Authorization": auth})
    yield fake, sink, client
    await client.aclose()
    await fake.aclose()


def create_form(**extra: str) -> list[tuple[str, str]]:
    return [("To", TO), ("From", "+15550000000"), ("Url", f"{HOOKS}/voice?r=x&a=y"),
            ("StatusCallback", f"{HOOKS}/status?r=x&a=y"),
            *[("StatusCallbackEvent", e) for e in ("initiated", "ringing", "answered", "completed")],
            *extra.items()]


async def create(client: httpx.AsyncClient, form: list[tuple[str, str]], **headers: str) -> httpx.Response:
    """POST a create: a repeated field (StatusCallbackEvent) needs an encoded body."""
    return await client.post(f"{BASE}/Calls.json", content=urlencode(form),
                             headers={"Content-Type": "application/x-www-form-urlencoded", **headers})


async def test_the_same_request_twice_is_two_calls(world) -> None:
    fake, sink, client = world
    first = await create(client, create_form())
    second = await create(client, create_form())
    assert first.status_code == second.status_code == 201
    assert first.json()["sid"] != second.json()["sid"] and first.json()["status"] == "queued"
    await eventually(lambda: all(c.status == "completed" for c in fake.calls.values()))
    assert [c.heard for c in fake.calls.values()] == [["Hello"], ["Hello"]]

    def statuses() -> list[str]:
        return [form["CallStatus"] for path, form, _ in sink.requests
                        if path.endswith("/status") and form["CallSid"] == first.json()["sid"]]

    # the last callback is sent after the call's status is set: it follows, as Twilio's does
    await eventually(lambda: "completed" in statuses())
    assert all(valid for _, _, valid in sink.requests)  # every webhook signed over the exact URL
    assert statuses() == ["initiated", "ringing", "in-progress", "completed"]
    sequences = [int(form["SequenceNumber"]) for path, form, _ in sink.requests
                 if path.endswith("/status") and form["CallSid"] == first.json()["sid"]]
    assert sequences == sorted(sequences) and len(set(sequences)) == 4


async def test_wrong_credentials_are_401_and_bad_numbers_400(world) -> None:
    fake, _, client = world
    assert (await create(client, create_form(), Authorization="Basic eA==")).status_code == 401
    bad = await create(client, [("To", "12"), *create_form()[1:]])
    assert bad.status_code == 400 and bad.json()["code"] == 21211
    assert fake.calls == {}


async def test_calls_over_the_rate_wait_queued_and_can_be_cancelled_and_listed(world) -> None:
    fake, _, client = world
    fake.controls.calls_per_second = 0.5  # one call leaves the queue every 2 s
    fake.controls.ring_ms = 5000
    sids = [(await create(client, create_form())).json()["sid"] for _ in range(2)]
    await eventually(lambda: fake.calls[sids[0]].status == "ringing")
    assert fake.calls[sids[1]].status == "queued"
    listing = await client.get(f"{BASE}/Calls.json", params={"To": TO, "Status": "queued"})
    assert [c["sid"] for c in listing.json()["calls"]] == [sids[1]]
    assert (await client.get(f"{BASE}/Calls.json", params={"To": "+14155550000"})).json()["calls"] == []
    for sid in sids:
        cancelled = await client.post(f"{BASE}/Calls/{sid}.json", data={"Status": "canceled"})
        assert cancelled.json()["status"] == "canceled"
    await eventually(lambda: all(c.status == "canceled" for c in fake.calls.values()))
    assert all(c.heard == [] for c in fake.calls.values())


async def test_scripted_callees(world) -> None:
    fake, sink, client = world
    numbers = {"+14155550001": {"behaviour": "no-answer"}, "+14155550002": {"behaviour": "busy"},
               "+14155550003": {"behaviour": "machine"}, "+14155550004": {"behaviour": "answer", "digits": "1"}}
    assert (await client.post("/_fake/callees", json=numbers)).status_code == 200
    sink.twiml = ('<Response><Gather numDigits="1" action="https://hooks.test/app/gather"><Say>Press 1</Say>'
                  '</Gather></Response>')
    sids = {}
    for number in numbers:
        form = [("To", number), *create_form(MachineDetection="Enable")[1:]]
        sids[number] = (await create(client, form)).json()["sid"]
    await eventually(lambda: all(c.status in ("completed", "no-answer", "busy") for c in fake.calls.values()))
    calls = (await client.get("/_fake/calls")).json()["calls"]
    by_number = {c["to"]: c for c in calls}
    assert by_number["+14155550001"]["status"] == "no-answer" and by_number["+14155550001"]["heard"] == []
    assert by_number["+14155550002"]["status"] == "busy"
    assert by_number["+14155550003"]["answered_by"] == "machine_start"
    assert by_number["+14155550004"]["answered_by"] == "human"
    assert by_number["+14155550004"]["heard"] == ["Press 1", "Thanks"] and by_number["+14155550004"]["digits"] == ["1"]
    assert by_number["+14155550004"]["stamp"] == {"r": "x", "a": "y"}
    assert by_number["+14155550004"]["placed_by"] is None
    gathers = [form for path, form, _ in sink.requests if path.endswith("/gather")]
    assert [g["Digits"] for g in gathers] == ["1"]


async def test_injected_429_creates_nothing_and_500_after_create_does(world) -> None:
    fake, _, client = world
    await client.post("/_fake/control", json={"reject_rate": 1})
    refused = await create(client, create_form())
    assert refused.status_code == 429 and refused.json()["code"] == 20429 and fake.calls == {}
    await client.post("/_fake/control", json={"reject_rate": 0, "fail_after_create_rate": 1})
    failed = await create(client, create_form())
    assert failed.status_code == 500 and len(fake.calls) == 1  # the call exists: the create was in doubt


async def test_a_path_prefix_is_served_and_recorded(world) -> None:
    fake, _, client = world
    for prefix in ("/replica-1", "/api/laml"):
        response = await client.post(f"{prefix}{BASE}/Calls.json", content=urlencode(create_form()),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert response.status_code == 201
    assert [r["placed_by"] for r in fake.requests] == ["replica-1", "api/laml"]
    assert sorted(c.placed_by for c in fake.calls.values()) == ["api/laml", "replica-1"]
