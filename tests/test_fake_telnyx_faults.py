"""The Telnyx-shaped fake does what Telnyx documents, failures included: webhook delivery (again
only on a timeout; a non-2xx goes to the failover URL or is lost), `command_id` for 60 s, queued
speech, 422 90018 on an ended call, machine detection modes and an answering machine that records
only after its greeting, hangup causes, `GET /v2/calls/{id}`, gather results, and the faults a test
switches on (late, lost and repeated events, a command whose answer is lost, a slow receiver)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from reminders_fakes.telnyx import TEST_PUBLIC_KEY, CalleeScript, FakeTelnyx
from service.providers.telnyx.signature import TelnyxSignature
from tests.support.waiting import eventually, poll_until

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "Bearer fake-telnyx-key"}
CONNECTION = "1494404757140276705"
HOOKS = "https://svc.test/hooks"
TO = "+14155552671"
MESSAGE = "Hello Ann this is a reminder of your appointment tomorrow at ten"


@dataclass
class Delivery:
    path: str
    data: dict[str, Any]
    meta: dict[str, Any]
    valid: bool

    @property
    def type(self) -> str:
        return self.data["event_type"]


@dataclass
class Receiver:
    """The service's side: records each delivery (signature checked); `answer(path, delivery)` is
    the status it answers (200 unless set); `hold[event type]` keeps the first such delivery waiting."""

    deliveries: list[Delivery] = field(default_factory=list)
    answer: Callable[[str, Delivery], int] = lambda path, delivery: 200
    hold: dict[str, asyncio.Event] = field(default_factory=dict)

    def app(self) -> Starlette:
        check = TelnyxSignature(TEST_PUBLIC_KEY)

        async def hook(request: Request) -> Response:
            body = await request.body()
            valid = check.valid(body, request.headers.get("telnyx-signature-ed25519"),
                                request.headers.get("telnyx-timestamp"))
            envelope = json.loads(body)
            delivery = Delivery(request.url.path, envelope["data"], envelope["meta"], valid)
            self.deliveries.append(delivery)
            held = self.hold.pop(delivery.type, None)
            if held is not None:
                await held.wait()
            return Response(status_code=self.answer(request.url.path, delivery))

        return Starlette(routes=[Route("/hooks/{name}", hook, methods=["POST"])])

    def types(self, call_id: str | None = None, path: str | None = None) -> list[str]:
        return [d.type for d in self.deliveries
                if (call_id is None or d.data["payload"]["call_control_id"] == call_id)
                and (path is None or d.path == path)]

    def of(self, kind: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.type == kind]


@pytest.fixture
async def world() -> AsyncIterator[tuple[FakeTelnyx, Receiver, httpx.AsyncClient]]:
    receiver = Receiver()
    fake = FakeTelnyx(calls_per_second=0, ring_ms=10, speak_ms=10,
                      webhook_transport=httpx.ASGITransport(receiver.app()))
    fake.controls.detection_ms = 10
    fake.controls.patience_ms = 60_000
    client = httpx.AsyncClient(transport=httpx.ASGITransport(fake.app), base_url="http://telnyx", headers=AUTH)
    yield fake, receiver, client
    for held in receiver.hold.values():
        held.set()
    await client.aclose()
    await fake.aclose()


def dial(command_id: str = "d-1", to: str = TO, **extra: Any) -> dict[str, Any]:
    return {"connection_id": CONNECTION, "to": to, "from": "+15550000000", "command_id": command_id,
            "webhook_url": f"{HOOKS}/events", "client_state": "c3RhdGU=", **extra}


async def place(client: httpx.AsyncClient, **extra: Any) -> str:
    response = await client.post("/v2/calls", json=dial(**extra))
    assert response.status_code == 200, response.text
    return response.json()["data"]["call_control_id"]


async def command(client: httpx.AsyncClient, call_id: str, action: str, **body: Any) -> httpx.Response:
    return await client.post(f"/v2/calls/{call_id}/actions/{action}", json=body)


async def inspected(client: httpx.AsyncClient, call_id: str) -> dict[str, Any]:
    return next(c for c in (await client.get("/_fake/calls")).json()["calls"] if c["sid"] == call_id)


# -- webhook delivery ----------------------------------------------------------------------------


async def test_a_non_2xx_answer_is_not_retried_and_goes_to_the_dials_failover_url(world) -> None:
    fake, receiver, client = world
    receiver.answer = lambda path, d: 500 if path.endswith("/events") and d.type == "call.answered" else 200
    call_id = await place(client, webhook_failover_url=f"{HOOKS}/failover")
    await eventually(lambda: receiver.types(path="/hooks/failover") == ["call.answered"])
    primary, failover = receiver.of("call.answered")
    assert primary.data["id"] == failover.data["id"] and primary.valid and failover.valid
    assert (primary.meta, failover.meta) == ({"attempt": 1, "delivered_to": f"{HOOKS}/events"},
                                            {"attempt": 2, "delivered_to": f"{HOOKS}/failover"})
    results = [(d["url"], d["result"]) for d in (await inspected(client, call_id))["deliveries"]
               if d["type"] == "call.answered"]
    assert results == [(f"{HOOKS}/events", "refused"), (f"{HOOKS}/failover", "acknowledged")]


async def test_without_a_failover_url_a_refused_event_is_lost_and_the_fake_wide_one_is_used(world) -> None:
    fake, receiver, client = world
    receiver.answer = lambda path, d: 503 if path.endswith("/events") and d.type == "call.initiated" else 200
    lost = await place(client, command_id="a")
    await eventually(lambda: "call.answered" in receiver.types(lost))
    assert receiver.types(lost).count("call.initiated") == 1  # refused once, never again
    await client.post("/_fake/control", json={"webhook_failover_url": f"{HOOKS}/connection-failover"})
    rescued = await place(client, command_id="b")
    await eventually(lambda: receiver.types(rescued, "/hooks/connection-failover") == ["call.initiated"])


async def test_an_event_not_answered_within_2_s_is_delivered_again_with_the_same_id(world) -> None:
    fake, receiver, client = world
    fake.controls.time_scale = 0.05  # Telnyx's 2 s last 100 ms
    receiver.hold["call.answered"] = asyncio.Event()  # the first delivery is never answered
    call_id = await place(client)
    await eventually(lambda: len(receiver.of("call.answered")) == 2)
    first, again = receiver.of("call.answered")
    assert first.data == again.data and (first.meta["attempt"], again.meta["attempt"]) == (1, 2)
    assert [d["result"] for d in fake.calls[call_id].deliveries if d["type"] == "call.answered"] == \
        ["timeout", "acknowledged"]


# -- commands ------------------------------------------------------------------------------------


async def test_a_command_id_is_ignored_for_60_s_then_runs_again(world) -> None:
    fake, receiver, client = world
    fake.controls.time_scale = 0.01  # 60 s last 600 ms
    call_id = await place(client)
    await eventually(lambda: "call.answered" in receiver.types())
    for _ in range(3):
        assert (await command(client, call_id, "speak", payload=MESSAGE, command_id="s-1")).json() == \
            {"data": {"result": "ok"}}
    await eventually(lambda: "call.speak.ended" in receiver.types(call_id))
    assert fake.calls[call_id].heard == [MESSAGE]
    results = [e["result"] for e in (await inspected(client, call_id))["command_log"] if e["action"] == "speak"]
    assert results == ["executed", "duplicate", "duplicate"]

    async def spoken_again() -> bool:
        await command(client, call_id, "speak", payload=MESSAGE, command_id="s-1")
        return len(fake.calls[call_id].heard) == 2

    await poll_until(spoken_again, 5, "the same command_id executed again after the window", interval=0.05)


async def test_speak_commands_are_queued_one_after_the_other(world) -> None:
    fake, receiver, client = world
    fake.controls.speak_ms = 100
    call_id = await place(client)
    await eventually(lambda: "call.answered" in receiver.types())
    for index in range(3):
        await command(client, call_id, "speak", payload=f"part {index}", command_id=f"p-{index}")
    await eventually(lambda: receiver.types(call_id).count("call.speak.ended") == 3)
    speech = [d for d in receiver.types(call_id) if d.startswith("call.speak")]
    assert speech == ["call.speak.started", "call.speak.ended"] * 3
    assert fake.calls[call_id].heard == ["part 0", "part 1", "part 2"]


async def test_a_command_to_an_ended_call_is_422_90018(world) -> None:
    fake, receiver, client = world
    call_id = await place(client)
    await eventually(lambda: "call.answered" in receiver.types())
    assert (await command(client, call_id, "hangup", command_id="h")).status_code == 200
    for action in ("speak", "gather_using_speak", "hangup"):
        refused = await command(client, call_id, action, payload="x", command_id=f"late-{action}")
        assert refused.status_code == 422
        assert refused.json() == {"errors": [{"code": "90018", "title": "Call has already ended",
                                              "detail": "This call is no longer active and can't receive commands."}]}
    assert [e["result"] for e in fake.calls[call_id].command_log] == ["executed", "executed", "ended", "ended",
                                                                      "ended"]


# -- machine detection and the machine -----------------------------------------------------------


@pytest.mark.parametrize(("mode", "script", "expected"), [
    ("detect", CalleeScript("answer"), [("call.machine.detection.ended", "human")]),
    ("detect", CalleeScript("machine", greeting_ms=0), [("call.machine.detection.ended", "machine")]),
    ("detect", CalleeScript("fax"), [("call.machine.detection.ended", "not_sure")]),
    ("detect", CalleeScript("answer", detection_ms=5000), [("call.machine.detection.ended", "not_sure")]),
    ("detect_beep", CalleeScript("machine", greeting_ms=50),
     [("call.machine.detection.ended", "machine"), ("call.machine.greeting.ended", "beep_detected")]),
    ("detect_words", CalleeScript("machine", greeting_ms=50),
     [("call.machine.detection.ended", "machine"), ("call.machine.greeting.ended", "beep_detected")]),
    ("detect_words", CalleeScript("machine", greeting_ms=50, greeting_end="silence"),
     [("call.machine.detection.ended", "machine"), ("call.machine.greeting.ended", "not_sure")]),
    ("greeting_end", CalleeScript("machine", greeting_ms=50, greeting_end="silence"),
     [("call.machine.detection.ended", "machine"), ("call.machine.greeting.ended", "ended")]),
    ("premium", CalleeScript("answer"), [("call.machine.premium.detection.ended", "human_residence")]),
])
async def test_machine_detection_modes(world, mode: str, script: CalleeScript, expected: list) -> None:
    fake, receiver, client = world
    fake.controls.time_scale = 0.01  # the 3.5 s analysis lasts 35 ms, detect_words' 30 s beep window 300 ms
    fake.callees[TO] = script
    call_id = await place(client, answering_machine_detection=mode)

    def machine_events() -> list[tuple[str, str]]:  # once per event id: Telnyx may deliver one twice
        return list({d.data["id"]: (d.type, d.data["payload"]["result"]) for d in receiver.deliveries
                     if "machine" in d.type and d.data["payload"]["call_control_id"] == call_id}.values())

    await eventually(lambda: len(machine_events()) == len(expected))
    await command(client, call_id, "hangup", command_id="h")  # events come in order: nothing after it
    await eventually(lambda: "call.hangup" in receiver.types(call_id))
    assert machine_events() == expected


async def test_detect_beep_reports_a_greeting_only_when_a_beep_is_heard(world) -> None:
    fake, receiver, client = world
    fake.controls.speak_ms = 200  # the speech ends after the greeting: a greeting.ended would come before it
    fake.callees[TO] = CalleeScript("machine", greeting_ms=50, greeting_end="silence")
    call_id = await place(client, answering_machine_detection="detect_beep")
    await eventually(lambda: fake.calls[call_id].detection == "machine")
    assert (await command(client, call_id, "speak", payload=MESSAGE, command_id="s")).status_code == 200
    await eventually(lambda: "call.speak.ended" in receiver.types(call_id))
    assert "call.machine.greeting.ended" not in fake.calls[call_id].events


async def test_a_machine_loses_speech_over_its_greeting_and_keeps_it_after_the_beep(world) -> None:
    fake, receiver, client = world
    await client.post("/_fake/callees", json={TO: {"behaviour": "machine", "greeting_ms": 300}})
    call_id = await place(client, answering_machine_detection="detect_beep")
    await eventually(lambda: fake.calls[call_id].detection == "machine")
    await command(client, call_id, "speak", payload="too early", command_id="early")
    await eventually(lambda: fake.calls[call_id].greeting == "beep_detected")
    await command(client, call_id, "speak", payload=MESSAGE, command_id="after-beep")
    await eventually(lambda: receiver.types(call_id).count("call.speak.ended") == 2)
    call = await inspected(client, call_id)
    assert call["lost"] == ["too early"] and call["voicemail"] == [MESSAGE] and call["person_heard"] == []
    assert call["heard"] == ["too early", MESSAGE]


async def test_a_speech_across_the_beep_keeps_its_end(world) -> None:
    fake, receiver, client = world
    fake.controls.speak_ms = 600
    fake.callees[TO] = CalleeScript("machine", greeting_ms=300, detection_ms=0)
    call_id = await place(client, answering_machine_detection="detect")
    await eventually(lambda: fake.calls[call_id].detection == "machine")
    await command(client, call_id, "speak", payload=MESSAGE, command_id="s")
    await eventually(lambda: "call.speak.ended" in receiver.types(call_id))
    (lost,), (kept,) = fake.calls[call_id].listener.lost, fake.calls[call_id].listener.voicemail
    assert f"{lost} {kept}" == MESSAGE


# -- hangup causes, the call resource, gather results --------------------------------------------


@pytest.mark.parametrize(("script", "cause", "source", "status"), [
    ({"behaviour": "busy"}, "user_busy", "callee", "busy"),
    ({"behaviour": "reject"}, "call_rejected", "callee", "failed"),
    ({"behaviour": "no-answer"}, "timeout", "callee", "no-answer"),
    ({"behaviour": "no-answer", "hangup_cause": "no_answer"}, "no_answer", "callee", "no-answer"),
    ({"behaviour": "answer", "ring_ms": 2000}, "timeout", "caller", "no-answer"),  # past timeout_secs
])
async def test_unanswered_calls_hang_up_with_their_cause(world, script: dict, cause: str, source: str,
                                                         status: str) -> None:
    fake, receiver, client = world
    fake.controls.time_scale = 0.01  # timeout_secs=5 lasts 50 ms
    await client.post("/_fake/callees", json={TO: script})
    call_id = await place(client, timeout_secs=5)
    await eventually(lambda: "call.hangup" in receiver.types(call_id))
    hangup = receiver.of("call.hangup")[0]
    assert (hangup.data["payload"]["hangup_cause"], hangup.data["payload"]["hangup_source"]) == (cause, source)
    assert fake.calls[call_id].status == status and "call.answered" not in receiver.types(call_id)


async def test_hangup_by_command_before_and_after_the_answer(world) -> None:
    fake, receiver, client = world
    fake.controls.ring_ms = 5000
    ringing = await place(client, command_id="r")
    await command(client, ringing, "hangup", command_id="h1")
    fake.controls.ring_ms = 10
    answered = await place(client, command_id="a")
    await eventually(lambda: "call.answered" in receiver.types(answered))
    await command(client, answered, "hangup", command_id="h2")
    assert (fake.calls[ringing].hangup_cause, fake.calls[answered].hangup_cause) == ("originator_cancel",
                                                                                    "normal_clearing")
    assert fake.calls[answered].hangup_source == "caller"


async def test_a_dial_with_a_bad_timeout_or_detection_mode_is_refused(world) -> None:
    fake, _, client = world
    for extra in ({"timeout_secs": 3}, {"timeout_secs": "30"}, {"answering_machine_detection": "maybe"},
                  {"webhook_failover_url": "ftp://x"}):
        response = await client.post("/v2/calls", json=dial(**extra))
        assert response.status_code == 422, extra
    assert fake.calls == {}


async def test_get_call_reports_alive_then_ended(world) -> None:
    fake, receiver, client = world
    call_id = await place(client)
    await eventually(lambda: "call.answered" in receiver.types(call_id))
    alive = (await client.get(f"/v2/calls/{call_id}")).json()["data"]
    assert alive["is_alive"] is True and "end_time" not in alive and alive["record_type"] == "call"
    assert alive["client_state"] == "c3RhdGU=" and alive["call_control_id"] == call_id
    await command(client, call_id, "hangup", command_id="h")
    ended = (await client.get(f"/v2/calls/{call_id}")).json()["data"]
    assert ended["is_alive"] is False and ended["end_time"] >= ended["start_time"]
    assert isinstance(ended["call_duration"], int)
    assert (await client.get("/v2/calls/v3:nope")).status_code == 404


@pytest.mark.parametrize(("script", "body", "expected"), [
    ({"digits": "1"}, {}, ("1", "valid")),
    ({"digits": "9"}, {"valid_digits": "12"}, ("9", "invalid")),
    ({}, {}, ("", "timeout")),
    ({"behaviour": "machine", "digits": "1"}, {}, ("", "timeout")),  # a machine presses nothing
])
async def test_gather_ended_reports_what_was_pressed(world, script: dict, body: dict, expected: tuple) -> None:
    fake, receiver, client = world
    await client.post("/_fake/callees", json={TO: script})
    call_id = await place(client)
    await eventually(lambda: "call.answered" in receiver.types(call_id))
    await command(client, call_id, "gather_using_speak", payload="Press 1", command_id="g", **body)
    await eventually(lambda: "call.gather.ended" in receiver.types(call_id))
    payload = receiver.of("call.gather.ended")[0].data["payload"]
    assert (payload["digits"], payload["status"]) == expected and payload["client_state"] == "c3RhdGU="


@pytest.mark.parametrize(("action", "event", "status"), [("hangup", "call.gather.ended", "call_hangup"),
                                                         ("gather_stop", "call.gather.ended", "cancelled"),
                                                         ("hangup", "call.speak.ended", "call_hangup")])
async def test_speech_cut_short(world, action: str, event: str, status: str) -> None:
    fake, receiver, client = world
    fake.controls.speak_ms = 10_000
    fake.callees[TO] = CalleeScript("answer", digits="1")
    call_id = await place(client)
    await eventually(lambda: "call.answered" in receiver.types(call_id))
    verb = "gather_using_speak" if event == "call.gather.ended" else "speak"
    await command(client, call_id, verb, payload="Press 1", command_id="g")
    await eventually(lambda: fake.calls[call_id].speaking == 1)
    await command(client, call_id, action, command_id="stop")
    await eventually(lambda: event in receiver.types(call_id))
    assert receiver.of(event)[0].data["payload"]["status"] == status


# -- faults --------------------------------------------------------------------------------------


async def test_a_late_event_arrives_after_later_ones(world) -> None:
    fake, receiver, client = world
    await client.post("/_fake/control", json={"event_delay_ms": 300,
                                              "event_delay_types": ["call.machine.detection.ended"]})
    call_id = await place(client, answering_machine_detection="detect")
    await eventually(lambda: fake.calls[call_id].detection == "human")
    await command(client, call_id, "speak", payload=MESSAGE, command_id="s")
    await eventually(lambda: "call.machine.detection.ended" in receiver.types(call_id))
    types = receiver.types(call_id)
    assert types.index("call.machine.detection.ended") > types.index("call.speak.started")


async def test_lost_events_are_never_delivered(world) -> None:
    fake, receiver, client = world
    await client.post("/_fake/control", json={"event_loss_rate": 1, "event_loss_types": ["final"]})
    call_id = await place(client)
    await eventually(lambda: "call.answered" in receiver.types(call_id))
    await command(client, call_id, "hangup", command_id="h")
    await eventually(lambda: any(d["result"] == "lost" for d in fake.calls[call_id].deliveries))
    assert "call.hangup" not in receiver.types(call_id) and fake.calls[call_id].status == "completed"
    lost = [d for d in (await inspected(client, call_id))["deliveries"] if d["result"] == "lost"]
    assert [d["type"] for d in lost] == ["call.hangup"]


async def test_an_acknowledged_event_is_delivered_again_with_the_same_id(world) -> None:
    fake, receiver, client = world
    await client.post("/_fake/control", json={"event_redeliver_rate": 1, "event_redeliver_ms": 200,
                                              "event_redeliver_types": ["call.answered"]})
    call_id = await place(client)
    await eventually(lambda: len(receiver.of("call.answered")) == 2)
    first, again = receiver.of("call.answered")
    assert first.data == again.data and again.meta["attempt"] == 2 and again.valid
    assert [d["result"] for d in fake.calls[call_id].deliveries if d["type"] == "call.answered"] == \
        ["acknowledged", "acknowledged"]


@pytest.mark.parametrize(("action", "mode"), [("dial", "stall"), ("speak", "drop"), ("hangup", "stall"),
                                              ("gather_using_speak", "drop")])
async def test_a_command_is_executed_although_its_answer_never_arrives(world, action: str, mode: str) -> None:
    fake, receiver, client = world
    await client.post("/_fake/control", json={"answer_lost_rate": 1, "answer_lost_commands": [action],
                                              "answer_lost_mode": mode, "answer_stall_ms": 10_000})
    request = client.post("/v2/calls", json=dial()) if action == "dial" else None
    if request is None:
        call_id = await place(client)
        await eventually(lambda: "call.answered" in receiver.types(call_id))
        request = command(client, call_id, action, payload=MESSAGE, command_id="c")
    with pytest.raises((TimeoutError, httpx.RemoteProtocolError)):
        await asyncio.wait_for(request, 1.0)
    (call,) = fake.calls.values()
    if action == "hangup":
        assert not call.alive
    else:
        await eventually(lambda: "call.answered" in call.events)
        assert call.heard == ([] if action == "dial" else [MESSAGE])
    (entry,) = [e for e in call.command_log if e["action"] == action]
    assert entry["answer_lost"] == mode and entry["result"] == "executed"


async def test_a_slow_receiver_times_out_and_telnyx_delivers_again(world) -> None:
    fake, receiver, client = world
    fake._webhook_tries = 2
    await client.post("/_fake/control", json={"time_scale": 0.05, "slow_receiver_ms": 500,
                                              "slow_receiver_types": ["call.answered"]})
    call_id = await place(client)
    await eventually(lambda: len([d for d in fake.calls[call_id].deliveries if d["type"] == "call.answered"]) == 2)
    assert len(receiver.of("call.answered")) == 2  # the receiver got it each time (and did its work) …
    assert [d["result"] for d in fake.calls[call_id].deliveries if d["type"] == "call.answered"] == \
        ["timeout", "timeout"]  # … but answered too late: out of tries, the event is lost
    assert "call.initiated" in receiver.types(call_id)
