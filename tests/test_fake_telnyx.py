"""The Telnyx-shaped fake behaves like Telnyx: Dial's command_id dedupe, 429 (90103) at its rate,
signed events in order with the client_state echoed, commands deduped, 422 on an ended call, the
active-calls list with its cursor."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from reminders_fakes.telnyx import TEST_PUBLIC_KEY, FakeTelnyx
from service.providers.telnyx.events import parse_event
from service.providers.telnyx.signature import TelnyxSignature
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "Bearer fake-telnyx-key"}
CONNECTION = "1494404757140276705"


class Events(httpx.AsyncBaseTransport):
    """The service's side: records each delivered event (verified), answers 200."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str | None]] = []
        self.check = TelnyxSignature(TEST_PUBLIC_KEY)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        assert self.check.valid(body, request.headers.get("telnyx-signature-ed25519"),
                                request.headers.get("telnyx-timestamp"))
        event = parse_event(body)
        assert event is not None
        self.received.append((event.event_type, event.payload.get("client_state")))
        return httpx.Response(200)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeTelnyx, Events, httpx.AsyncClient]]:
    events = Events()
    fake = FakeTelnyx(calls_per_second=3, ring_ms=10, speak_ms=10, webhook_transport=events)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(fake.app), base_url="http://telnyx", headers=AUTH)
    yield fake, events, client
    await client.aclose()
    await fake.aclose()


def dial(command_id: str, to: str = "+14155552671") -> dict:
    return {"connection_id": CONNECTION, "to": to, "from": "+15550000000", "command_id": command_id,
            "webhook_url": "https://svc.test/telephony/telnyx/events", "client_state": "c3RhdGU="}


async def test_dial_dedupes_by_command_id_and_refuses_over_its_rate(fake) -> None:
    telnyx, _, client = fake
    first = await client.post("/v2/calls", json=dial("a-1"))
    again = await client.post("/v2/calls", json=dial("a-1"))
    assert first.status_code == again.status_code == 200
    assert first.json()["data"]["call_control_id"] == again.json()["data"]["call_control_id"]
    assert len(telnyx.calls) == 1
    answers = [await client.post("/v2/calls", json=dial(f"b-{i}")) for i in range(4)]
    refused = [a for a in answers if a.status_code == 429]
    assert refused and refused[0].json()["errors"][0]["code"] == "90103"
    assert len(telnyx.calls) == 1 + len(answers) - len(refused)
    assert (await client.post("/v2/calls", json=dial("c"), headers={"Authorization": "Bearer no"})).status_code == 401


async def test_a_call_speaks_once_per_command_id_and_refuses_commands_once_ended(fake) -> None:
    telnyx, events, client = fake
    telnyx.controls.patience_ms = 60_000
    call_id = (await client.post("/v2/calls", json=dial("a-1"))).json()["data"]["call_control_id"]
    await eventually(lambda: ("call.answered", "c3RhdGU=") in events.received)
    speak = {"payload": "Hello", "command_id": "speak-1"}
    for _ in range(2):
        assert (await client.post(f"/v2/calls/{call_id}/actions/speak", json=speak)).status_code == 200
    await eventually(lambda: any(e == "call.speak.ended" for e, _ in events.received))
    assert telnyx.calls[call_id].heard == ["Hello"]
    listed = (await client.get(f"/v2/connections/{CONNECTION}/active_calls")).json()
    assert [c["call_control_id"] for c in listed["data"]] == [call_id]
    assert listed["data"][0]["client_state"] == "c3RhdGU="
    assert (await client.post(f"/v2/calls/{call_id}/actions/hangup", json={})).status_code == 200
    ended = await client.post(f"/v2/calls/{call_id}/actions/speak", json={"payload": "again", "command_id": "s2"})
    assert ended.status_code == 422 and ended.json()["errors"][0]["code"] == "90018"
    await eventually(lambda: any(e == "call.hangup" for e, _ in events.received))
    assert [e for e, _ in events.received] == ["call.initiated", "call.answered", "call.speak.started",
                                               "call.speak.ended", "call.hangup"]
    assert (await client.get(f"/v2/connections/{CONNECTION}/active_calls")).json()["data"] == []


async def test_active_calls_are_paginated(fake) -> None:
    telnyx, _, client = fake
    telnyx.controls.calls_per_second = 0
    telnyx.controls.ring_ms = 60_000
    for index in range(5):
        await client.post("/v2/calls", json=dial(f"p-{index}"))
    seen, params = [], {"page[size]": "2"}
    while True:
        page = (await client.get(f"/v2/connections/{CONNECTION}/active_calls", params=params)).json()
        seen += [c["call_control_id"] for c in page["data"]]
        if not page["meta"]["cursors"]["after"]:
            break
        params = {"page[size]": "2", "page[after]": page["meta"]["cursors"]["after"]}
    assert sorted(seen) == sorted(telnyx.calls)


async def test_callee_scripts(fake) -> None:
    telnyx, events, client = fake
    response = await client.post("/_fake/callees", json={"+14155550001": {"behaviour": "busy"},
                                                         "+14155550002": {"behaviour": "no-answer"}})
    assert response.status_code == 200
    busy = (await client.post("/v2/calls", json=dial("x", "+14155550001"))).json()["data"]["call_control_id"]
    await eventually(lambda: telnyx.calls[busy].status == "busy")
    silent = (await client.post("/v2/calls", json=dial("y", "+14155550002"))).json()["data"]["call_control_id"]
    await eventually(lambda: telnyx.calls[silent].status == "no-answer")
    assert "call.answered" not in telnyx.calls[busy].events
    assert json.loads(json.dumps(telnyx.calls[busy].inspect()))["heard"] == []
