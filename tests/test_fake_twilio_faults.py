"""The Twilio-shaped fake does what Twilio documents, failures included: machine detection
(`Enable` / `DetectMessageEnd`, `MachineDetectionTimeout`), an answering machine that records only
after its greeting, `FallbackUrl`, connection overrides with `I-Twilio-Idempotency-Token`,
best-effort status callbacks, and the faults a test switches on (late, lost and repeated status
callbacks, a create whose answer is lost, a slow receiver)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from reminders_fakes.twilio import CalleeScript, FakeTwilio
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio

SID = "AC" + "4" * 32
TOKEN = "fault-test-token"
BASE = f"/2010-04-01/Accounts/{SID}"
HOOKS = "https://hooks.test/app"
TO = "+14155552671"
MESSAGE = "Hello Ann this is a reminder of your appointment tomorrow at ten"
SAY = f"<Response><Say>{MESSAGE}</Say><Hangup/></Response>"
GATHER = (f'<Response><Gather numDigits="1" action="{HOOKS}/gather"><Say>Press 1</Say></Gather>'
          "<Say>Goodbye</Say></Response>")


@dataclass
class Received:
    name: str
    form: dict[str, str]
    valid: bool
    token: str | None
    url: str


@dataclass
class Receiver:
    """The service's side: records each signed request; `answers[name]` is the list of (status,
    body) it answers in turn (the last one repeated); `hold[name]` keeps that request waiting."""

    requests: list[Received] = field(default_factory=list)
    answers: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    hold: dict[str, asyncio.Event] = field(default_factory=dict)

    def app(self) -> Starlette:
        validator = RequestValidator(TOKEN)

        async def hook(request: Request) -> Response:
            name = request.path_params["name"]
            form = dict(parse_qsl((await request.body()).decode()))
            valid = validator.validate(str(request.url), form, request.headers.get("X-Twilio-Signature", ""))
            self.requests.append(Received(name, form, valid, request.headers.get("I-Twilio-Idempotency-Token"),
                                          str(request.url)))
            if name in self.hold:
                await self.hold[name].wait()
            queue = self.answers.get(name) or [(204, "") if name == "status" else (200, SAY)]
            status, body = queue.pop(0) if len(queue) > 1 else queue[0]
            return Response(body, status_code=status, media_type="application/xml")

        return Starlette(routes=[Route("/app/{name}", hook, methods=["POST", "GET"])])

    def named(self, name: str) -> list[Received]:
        return [r for r in self.requests if r.name == name]

    def statuses(self, sid: str) -> list[str]:
        return [r.form["CallStatus"] for r in self.named("status") if r.form.get("CallSid") == sid]


class Network(httpx.AsyncBaseTransport):
    """Routes the webhooks to the receiver; a host named `down.test` refuses connections."""

    def __init__(self, app: Starlette) -> None:
        self.inner = httpx.ASGITransport(app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "down.test":
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)


@pytest.fixture
async def world() -> AsyncIterator[tuple[FakeTwilio, Receiver, httpx.AsyncClient]]:
    receiver = Receiver()
    fake = FakeTwilio(account_sid=SID, auth_token=TOKEN, calls_per_second=0, ring_ms=10,
                      webhook_transport=Network(receiver.app()))
    fake.controls.detection_ms = 10
    auth = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(fake.app), base_url="https://api.twilio.test",
                               headers={"Authorization": auth})
    yield fake, receiver, client
    for event in receiver.hold.values():
        event.set()
    await client.aclose()
    await fake.aclose()


def form(to: str = TO, url: str = f"{HOOKS}/voice", status: str = f"{HOOKS}/status",
         **extra: str) -> list[tuple[str, str]]:
    return [("To", to), ("From", "+15550000000"), ("Url", url), ("StatusCallback", status),
            *[("StatusCallbackEvent", e) for e in ("initiated", "ringing", "answered", "completed")],
            *extra.items()]


async def create(client: httpx.AsyncClient, fields: list[tuple[str, str]]) -> str:
    response = await client.post(f"{BASE}/Calls.json", content=urlencode(fields),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 201, response.text
    return response.json()["sid"]


async def over(fake: FakeTwilio, sid: str) -> None:
    await eventually(lambda: fake.calls[sid].status in ("completed", "busy", "no-answer", "canceled", "failed"))


async def inspected(client: httpx.AsyncClient, sid: str) -> dict:
    return next(c for c in (await client.get("/_fake/calls")).json()["calls"] if c["sid"] == sid)


# -- machine detection and the machine -----------------------------------------------------------


async def test_enable_requests_the_url_as_soon_as_the_answerer_is_known(world) -> None:
    fake, receiver, client = world
    await client.post("/_fake/callees", json={"+14155550001": {"behaviour": "answer"},
                                              "+14155550002": {"behaviour": "machine", "greeting_ms": 2000},
                                              "+14155550003": {"behaviour": "fax"}})
    sids = {n: await create(client, form(to=n, MachineDetection="Enable"))
            for n in ("+14155550001", "+14155550002", "+14155550003")}
    for sid in sids.values():
        await over(fake, sid)
    voice = {r.form["To"]: r.form["AnsweredBy"] for r in receiver.named("voice")}
    assert voice == {"+14155550001": "human", "+14155550002": "machine_start", "+14155550003": "fax"}
    person, machine, fax = [await inspected(client, sids[n]) for n in sorted(sids)]
    assert person["person_heard"] == [MESSAGE] and person["voicemail"] == []
    # machine_start comes during the greeting: the <Say> is spoken over it, nothing is recorded
    assert machine["person_heard"] == [] and machine["voicemail"] == [] and machine["lost"] == [MESSAGE]
    assert machine["heard"] == [MESSAGE]  # spoken into the call all the same
    assert fax["person_heard"] == fax["voicemail"] == fax["lost"] == []


@pytest.mark.parametrize(("end", "answered_by"), [("beep", "machine_end_beep"), ("silence", "machine_end_silence"),
                                                  ("other", "machine_end_other")])
async def test_detect_message_end_waits_for_the_greeting_and_the_machine_keeps_the_message(
        world, end: str, answered_by: str) -> None:
    fake, receiver, client = world
    fake.callees[TO] = CalleeScript("machine", greeting_ms=150, greeting_end=end)
    sid = await create(client, form(MachineDetection="DetectMessageEnd"))
    await over(fake, sid)
    (voice,) = receiver.named("voice")
    assert voice.form["AnsweredBy"] == answered_by
    call = await inspected(client, sid)
    assert call["voicemail"] == [MESSAGE] and call["lost"] == [] and call["answered_by"] == answered_by


async def test_detect_message_end_answers_a_person_at_once(world) -> None:
    fake, receiver, client = world
    fake.controls.greeting_ms = 10_000  # a machine's greeting would take this long; a person's does not count
    sid = await create(client, form(MachineDetection="DetectMessageEnd"))
    await over(fake, sid)
    assert receiver.named("voice")[0].form["AnsweredBy"] == "human"
    assert (await inspected(client, sid))["person_heard"] == [MESSAGE]


async def test_a_say_across_the_beep_is_recorded_from_the_beep_on(world) -> None:
    fake, _, client = world
    await client.post("/_fake/control", json={"speak_ms": 600, "greeting_ms": 300, "detection_ms": 0})
    await client.post("/_fake/callees", json={TO: {"behaviour": "machine"}})
    sid = await create(client, form(MachineDetection="Enable"))
    await over(fake, sid)
    call = await inspected(client, sid)
    (lost,), (kept,) = call["lost"], call["voicemail"]
    assert f"{lost} {kept}" == MESSAGE and MESSAGE.startswith(lost)  # the first words eaten by the greeting


async def test_machine_detection_timeout_answers_unknown(world) -> None:
    fake, receiver, client = world
    fake.controls.time_scale = 0.01  # MachineDetectionTimeout=3 s lasts 30 ms
    await client.post("/_fake/callees", json={"+14155550001": {"behaviour": "answer", "detection_ms": 5000},
                                              "+14155550002": {"behaviour": "machine", "greeting_ms": 5000}})
    sids = [await create(client, form(to=n, MachineDetection="DetectMessageEnd", MachineDetectionTimeout="3"))
            for n in ("+14155550001", "+14155550002")]
    for sid in sids:
        await over(fake, sid)
    assert [r.form["AnsweredBy"] for r in receiver.named("voice")] == ["unknown", "unknown"]
    assert [fake.calls[sid].answered_by for sid in sids] == ["unknown", "unknown"]


async def test_without_machine_detection_there_is_no_answered_by(world) -> None:
    fake, receiver, client = world
    sid = await create(client, form())
    await over(fake, sid)
    assert "AnsweredBy" not in receiver.named("voice")[0].form


# -- FallbackUrl ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "code"), [((500, "oops"), 11200), ((404, ""), 11200),
                                              ((200, "<Response><Say>unclosed"), 12100),
                                              ((200, "<html>not twiml</html>"), 12100)])
async def test_a_failing_url_goes_to_the_fallback_url_with_the_error(world, answer: tuple[int, str], code: int) -> None:
    fake, receiver, client = world
    receiver.answers["voice"] = [answer]
    receiver.answers["fallback"] = [(200, "<Response><Say>Sorry, later</Say></Response>")]
    sid = await create(client, form(FallbackUrl=f"{HOOKS}/fallback?x=1"))
    await over(fake, sid)
    (fallback,) = receiver.named("fallback")
    assert fallback.valid and fallback.url == f"{HOOKS}/fallback?x=1"  # signed over the URL requested
    assert fallback.form["ErrorCode"] == str(code) and fallback.form["ErrorUrl"] == f"{HOOKS}/voice"
    assert fallback.form["CallSid"] == sid and fallback.form["CallStatus"] == "in-progress"
    assert fake.calls[sid].heard == ["Sorry, later"]
    assert (await inspected(client, sid))["errors"][0]["code"] == code


async def test_a_url_that_cannot_be_reached_is_tried_twice_then_falls_back(world) -> None:
    fake, receiver, client = world
    sid = await create(client, form(url="https://down.test/voice", FallbackUrl=f"{HOOKS}/fallback", Method="POST"))
    await over(fake, sid)
    tries = [d for d in fake.calls[sid].deliveries if d["type"] == "url"]
    assert [d["result"] for d in tries] == ["ct", "ct"]  # rc=1, rp=ct by default: one retry
    assert len({d["id"] for d in tries}) == 1
    assert receiver.named("fallback")[0].form["ErrorCode"] == "11205"


async def test_a_url_not_answered_within_the_read_timeout_falls_back(world) -> None:
    fake, receiver, client = world
    fake.controls.time_scale = 0.02  # the 15 s read timeout lasts 300 ms
    receiver.hold["voice"] = asyncio.Event()  # the receiver never answers
    sid = await create(client, form(FallbackUrl=f"{HOOKS}/fallback", FallbackMethod="GET"))
    await over(fake, sid)
    (fallback,) = receiver.named("fallback")
    assert fallback.form == {} and "ErrorCode=11205" in fallback.url and fallback.valid  # GET: the query carries it
    assert [d["result"] for d in fake.calls[sid].deliveries if d["type"] == "url"] == ["rt"]
    assert fake.calls[sid].heard == [MESSAGE]  # the fallback's default TwiML (the receiver's) was followed


async def test_no_fallback_url_ends_the_call_and_a_failing_fallback_too(world) -> None:
    fake, receiver, client = world
    receiver.answers["voice"] = [(503, "")]
    receiver.answers["fallback"] = [(500, "")]
    alone = await create(client, form())
    with_fallback = await create(client, form(FallbackUrl=f"{HOOKS}/fallback"))
    for sid in (alone, with_fallback):
        await over(fake, sid)
        assert fake.calls[sid].heard == [] and fake.calls[sid].status == "completed"
    assert [e["kind"] for e in fake.calls[with_fallback].errors] == ["url", "fallback"]
    assert len(receiver.named("fallback")) == 1


async def test_a_failing_gather_action_has_no_fallback_and_ends_the_twiml(world) -> None:
    fake, receiver, client = world
    fake.callees[TO] = CalleeScript("answer", digits="1")
    receiver.answers["voice"] = [(200, GATHER)]
    receiver.answers["gather"] = [(500, "")]
    sid = await create(client, form(FallbackUrl=f"{HOOKS}/fallback"))
    await over(fake, sid)
    assert len(receiver.named("gather")) == 1 and receiver.named("fallback") == []
    assert fake.calls[sid].heard == ["Press 1"] and fake.calls[sid].errors[0]["kind"] == "action"


# -- connection overrides and best-effort status callbacks ---------------------------------------


async def test_overrides_retry_with_one_idempotency_token_and_stay_out_of_the_request(world) -> None:
    fake, receiver, client = world
    receiver.answers["status"] = [(503, ""), (503, ""), (204, "")] * 2 + [(204, "")]
    receiver.answers["voice"] = [(500, ""), (200, SAY)]
    sid = await create(client, form(url=f"{HOOKS}/voice?r=1#rc=2&rp=5xx", status=f"{HOOKS}/status?r=1#rc=3&rp=5xx,ct",
                                    **{"StatusCallbackEvent": "initiated"}))
    await over(fake, sid)
    assert fake.calls[sid].heard == [MESSAGE]  # the second try of the voice URL answered
    voice = receiver.named("voice")
    assert len(voice) == 2 and voice[0].token == voice[1].token and voice[0].url == f"{HOOKS}/voice?r=1"
    first = [r for r in receiver.named("status") if r.form["CallStatus"] == "initiated"]
    assert len(first) == 3 and len({r.token for r in first}) == 1 and all(r.valid for r in first)
    assert all("#" not in r.url for r in receiver.requests)
    tokens = {r.token for r in receiver.named("status")}
    assert len(tokens) == len({r.form["SequenceNumber"] for r in receiver.named("status")})  # one per event


async def test_a_failing_status_callback_without_overrides_is_lost(world) -> None:
    fake, receiver, client = world
    receiver.answers["status"] = [(500, "")]
    sid = await create(client, form())
    await over(fake, sid)
    await eventually(lambda: len(receiver.statuses(sid)) == 4)
    assert receiver.statuses(sid) == ["initiated", "ringing", "in-progress", "completed"]  # each once, never again
    assert all(d["result"] == "5xx" and d["attempt"] == 1 for d in fake.calls[sid].deliveries if d["type"] != "url")


async def test_the_total_time_bounds_the_retries(world) -> None:
    fake, receiver, client = world
    fake.controls.time_scale = 0.02  # rt=5000 ms lasts 100 ms; tt=12000 ms, 240 ms: 3 tries at most, not 6
    receiver.hold["voice"] = asyncio.Event()
    sid = await create(client, form(url=f"{HOOKS}/voice#rc=5&rp=rt&rt=5000&tt=12000"))
    await over(fake, sid)
    tries = [d["result"] for d in fake.calls[sid].deliveries if d["type"] == "url"]
    assert tries in (["rt"] * 2, ["rt"] * 3)


async def test_status_callbacks_carry_timestamp_and_sequence_and_the_resource_its_times(world) -> None:
    fake, receiver, client = world
    fake.callees[TO] = CalleeScript("machine")
    sid = await create(client, form(MachineDetection="Enable"))
    await over(fake, sid)
    await eventually(lambda: "completed" in receiver.statuses(sid))
    stamps = [(int(r.form["SequenceNumber"]), parsedate_to_datetime(r.form["Timestamp"]))
              for r in receiver.named("status")]
    assert [s for s, _ in stamps] == [0, 1, 2, 3] and [t for _, t in stamps] == sorted(t for _, t in stamps)
    resource = (await client.get(f"{BASE}/Calls/{sid}.json")).json()
    assert resource["status"] == "completed" and resource["answered_by"] == "machine_start"
    assert parsedate_to_datetime(resource["start_time"]) <= parsedate_to_datetime(resource["end_time"])
    assert resource["duration"] == "0"


async def test_a_call_cancelled_while_queued_sends_no_status_callback(world) -> None:
    fake, receiver, client = world
    fake.controls.calls_per_second = 0.5
    fake.controls.ring_ms = 5000
    first, queued = await create(client, form()), await create(client, form())
    await eventually(lambda: fake.calls[first].status == "ringing")
    cancelled = await client.post(f"{BASE}/Calls/{queued}.json", data={"Status": "canceled"})
    assert cancelled.json()["status"] == "canceled"
    await client.post(f"{BASE}/Calls/{first}.json", data={"Status": "canceled"})
    await eventually(lambda: receiver.statuses(first)[-1:] == ["canceled"])
    assert receiver.statuses(queued) == [] and fake.calls[queued].deliveries == []
    resource = (await client.get(f"{BASE}/Calls/{queued}.json")).json()
    assert resource["status"] == "canceled" and resource["start_time"] is None and resource["end_time"]


async def test_rejected_and_unanswered_calls(world) -> None:
    fake, receiver, client = world
    fake.controls.time_scale = 0.01
    await client.post("/_fake/callees", json={"+14155550001": {"behaviour": "reject"},
                                              "+14155550002": {"behaviour": "answer", "ring_ms": 3000}})
    rejected = await create(client, form(to="+14155550001"))
    slow = await create(client, form(to="+14155550002", Timeout="10"))  # rings 100 ms on this clock
    for sid in (rejected, slow):
        await over(fake, sid)
    assert (fake.calls[rejected].status, fake.calls[slow].status) == ("busy", "no-answer")
    assert receiver.named("voice") == []


# -- faults --------------------------------------------------------------------------------------


async def test_a_late_status_callback_arrives_after_later_ones(world) -> None:
    fake, receiver, client = world
    await client.post("/_fake/control", json={"event_delay_ms": 300, "event_delay_types": ["initiated"]})
    sid = await create(client, form())
    await eventually(lambda: len(receiver.statuses(sid)) == 4)
    statuses = receiver.statuses(sid)
    assert statuses[-1] == "initiated" or statuses.index("initiated") > statuses.index("ringing")
    assert sorted(int(r.form["SequenceNumber"]) for r in receiver.named("status")) == [0, 1, 2, 3]


async def test_only_the_final_status_callback_is_late_by_a_random_delay(world) -> None:
    fake, receiver, client = world
    await client.post("/_fake/control", json={"event_delay_ms": 100, "event_delay_max_ms": 200,
                                              "event_delay_types": "final"})
    assert all(0.1 <= fake.fault_delay({"status", "completed", "final"}) <= 0.2 for _ in range(50))
    assert fake.fault_delay({"status", "ringing"}) == 0
    sid = await create(client, form())
    await over(fake, sid)
    assert receiver.statuses(sid)[-1:] != ["completed"]  # the call ended; its final callback is still on its way
    await eventually(lambda: receiver.statuses(sid)[-1:] == ["completed"])


async def test_lost_status_callbacks_never_arrive(world) -> None:
    fake, receiver, client = world
    await client.post("/_fake/control", json={"event_loss_rate": 1, "event_loss_types": ["final"]})
    sid = await create(client, form())
    await over(fake, sid)
    await eventually(lambda: len(fake.calls[sid].deliveries) == 5)  # 3 status callbacks, the voice URL, 1 lost
    assert receiver.statuses(sid) == ["initiated", "ringing", "in-progress"]
    lost = [d for d in (await inspected(client, sid))["deliveries"] if d["result"] == "lost"]
    assert [d["type"] for d in lost] == ["status:completed"]


async def test_a_redelivered_status_callback_repeats_its_params_and_token(world) -> None:
    fake, receiver, client = world
    await client.post("/_fake/control", json={"event_redeliver_rate": 1, "event_redeliver_ms": 200,
                                              "event_redeliver_types": ["completed"]})
    sid = await create(client, form())
    await eventually(lambda: receiver.statuses(sid).count("completed") == 2)
    first, again = [r for r in receiver.named("status") if r.form["CallStatus"] == "completed"]
    assert first.form == again.form and first.token == again.token and again.valid
    assert [d["redelivery"] for d in fake.calls[sid].deliveries if d["type"] == "status:completed"] == [False, True]


@pytest.mark.parametrize("mode", ["stall", "drop"])
async def test_a_create_is_executed_although_its_answer_never_arrives(world, mode: str) -> None:
    fake, _, client = world
    await client.post("/_fake/control", json={"answer_lost_rate": 1, "answer_lost_commands": ["create"],
                                              "answer_lost_mode": mode, "answer_stall_ms": 10_000})
    with pytest.raises((TimeoutError, httpx.RemoteProtocolError)):
        await asyncio.wait_for(client.post(f"{BASE}/Calls.json", content=urlencode(form()),
                                           headers={"Content-Type": "application/x-www-form-urlencoded"}), 0.5)
    (call,) = fake.calls.values()
    await over(fake, call.sid)
    assert call.heard == [MESSAGE] and call.command_log[0]["answer_lost"] == mode
    assert fake.requests[0]["answer_lost"] == mode and fake.requests[0]["sid"] == call.sid


async def test_answers_lost_in_turn_stall_then_drop(world) -> None:
    fake, _, client = world
    await client.post("/_fake/control", json={"answer_lost_rate": 1, "answer_lost_commands": ["create"],
                                              "answer_lost_mode": "alternate", "answer_stall_ms": 10_000})
    for _ in range(3):
        with pytest.raises((TimeoutError, httpx.RemoteProtocolError)):
            await asyncio.wait_for(client.post(f"{BASE}/Calls.json", content=urlencode(form()),
                                               headers={"Content-Type": "application/x-www-form-urlencoded"}), 0.5)
    assert [request["answer_lost"] for request in fake.requests] == ["stall", "drop", "stall"]


async def test_a_slow_receiver_times_out_and_twilio_falls_back(world) -> None:
    fake, receiver, client = world
    await client.post("/_fake/control", json={"time_scale": 0.02, "slow_receiver_ms": 1000,
                                              "slow_receiver_types": ["url"]})
    sid = await create(client, form(FallbackUrl=f"{HOOKS}/fallback"))
    await over(fake, sid)
    assert len(receiver.named("voice")) == 1  # the receiver got it (and did its work) …
    assert receiver.named("fallback")[0].form["ErrorCode"] == "11205"  # … but answered too late
    assert fake.calls[sid].heard == [MESSAGE]  # what the fallback said


async def test_faults_are_controls_over_http(world) -> None:
    _, _, client = world
    controls = (await client.post("/_fake/control", json={"event_loss_types": "completed, final",
                                                           "answer_lost_mode": "drop", "time_scale": "0.5"})).json()
    assert controls["event_loss_types"] == ["completed", "final"] and controls["time_scale"] == 0.5
    refused = await client.post("/_fake/control", json={"answer_lost_mode": "sometimes"})
    assert refused.status_code == 422
    assert (await client.post("/_fake/callees", json={TO: {"greeting_end": "music"}})).status_code == 422
    await client.post("/_fake/reset")
    assert (await client.get("/_fake/control")).json()["event_loss_types"] == []
