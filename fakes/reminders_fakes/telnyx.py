"""A Telnyx-shaped fake: Call Control's REST API and its signed events, as Telnyx behaves.

- `POST /v2/calls` (Bearer, JSON `connection_id`, `to`, `from`, `webhook_url`, `client_state`,
  `command_id`): 200 `{"data": {"call_control_id", "call_leg_id", "call_session_id", ...}}`. A
  `command_id` seen in the last 60 s returns the first Dial's answer and makes no call; after that
  the same Dial is a second call. Over `calls_per_second` in a one-second window: 429 with error
  code 90103, nothing created. Optional injected 429 and 500 *after* creating the call (in doubt).
- Each call: `call.initiated`, ringing, then the scripted callee of the number acts (`answer`,
  `machine`, `no-answer`, `busy`, optionally pressing `digits`, per gather when a list):
  `call.answered` (then `call.machine.detection.ended` when the Dial asked for
  `answering_machine_detection`: `machine` or `human`) and the call waits
  for commands; a callee left in silence hangs up after `patience_ms`. Every event is signed with
  Ed25519 over `"{timestamp}|{body}"` (a fixed test key pair unless given another), carries the
  call's `client_state`, and is delivered in order per call, again until acknowledged (2xx); an
  event not answered within `webhook_timeout` (5 s) is sent again (to whichever replica).
- `POST /v2/calls/{id}/actions/speak|gather_using_speak|hangup` (each deduped by `command_id` for
  60 s): speech is queued and logged as heard (`call.speak.started` / `.ended`, or
  `call.gather.ended` with the callee's digits); hangup ends the call (`call.hangup`); any command
  to an ended call is a 422 (code 90018).
- `GET /v2/connections/{id}/active_calls`: the alive calls with their `client_state`, paginated.
- `GET /v2/call_control_applications/{id}`: the connection's Call Control application (what
  `reminders check` reads): 401 (10009) for another key, 404 (10005) for another id.
- Inspection and control (not Telnyx's), shaped like the Twilio fake's: `GET /_fake/calls` (each
  call with `sid`, `status`, `stamp`, `heard`), `GET /_fake/requests` (Dials), `POST /_fake/callees`,
  `POST /_fake/control`, `POST /_fake/reset`.

`FakeTelnyx(...).app` is a Starlette app: serve it (`python -m reminders_fakes.telnyx`) or hand it to
httpx as a transport (`httpx.ASGITransport(fake.app)`); `webhook_transport` routes the events
(e.g. to the service's ASGI app) instead of the network.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reminders_fakes.controls import CalleeScript, ControlledFake
from service.privacy import E164
from service.reminders.outcomes import FINAL_CALL_STATES
from service.telephony.provider import Stamp

__all__ = ["CalleeScript", "FakeTelnyx", "TEST_PUBLIC_KEY", "TEST_SIGNING_SEED", "main", "sign"]

log = logging.getLogger(__name__)

# The fixed test key pair: events of the fake are signed with it unless another seed is given.
TEST_SIGNING_SEED = bytes.fromhex("4f1f3b0e6a5c2d7e8b9a0c1d2e3f40516273849a5b6c7d8e9fa0b1c2d3e4f506")
TEST_PUBLIC_KEY = base64.b64encode(
    Ed25519PrivateKey.from_private_bytes(TEST_SIGNING_SEED).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
).decode()
DEDUPE_SECONDS = 60.0


def sign(seed: bytes, timestamp: str, body: bytes) -> str:
    """The `telnyx-signature-ed25519` header for `body` sent at `timestamp`."""
    return base64.b64encode(Ed25519PrivateKey.from_private_bytes(seed).sign(timestamp.encode() + b"|" + body)).decode()


@dataclass
class _Controls:
    latency_ms: float = 0.0  # per REST request
    calls_per_second: float = 30.0  # Dials per one-second window; more are 429 (90103). 0: no limit
    ring_ms: float = 200.0
    speak_ms: float = 100.0  # how long a message takes to speak
    patience_ms: float = 10_000.0  # a callee left in silence this long hangs up
    reject_rate: float = 0.0  # 429 before anything is created
    fail_after_create_rate: float = 0.0  # the call is created, the answer is a 500
    hang: bool = False  # hold REST requests until released


@dataclass
class _Call:
    call_id: str
    leg_id: str
    session_id: str
    to: str
    from_: str
    webhook_url: str
    client_state: str | None
    created: datetime
    placed_by: str | None
    status: str = "initiated"  # initiated, ringing, in-progress, then a final one (the domain's FINAL_CALL_STATES)
    heard: list[str] = field(default_factory=list)
    digits: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)  # the `language` of each speech heard
    gathers: int = 0
    machine_detection: bool = False
    commands: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    seen_commands: dict[str, float] = field(default_factory=dict)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    speaking: int = 0
    quiet_since: float = field(default_factory=time.monotonic)
    outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = field(default_factory=asyncio.Queue)
    speech: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def alive(self) -> bool:
        return self.status not in FINAL_CALL_STATES

    def inspect(self) -> dict[str, Any]:
        stamp = Stamp.decode(self.client_state)
        return {"sid": self.call_id, "call_control_id": self.call_id, "to": self.to, "from": self.from_,
                "status": self.status, "placed_by": self.placed_by, "created": self.created.isoformat(),
                "stamp": {"r": stamp.reminder_id, "a": stamp.attempt_id} if stamp else {},
                "heard": list(self.heard), "digits": list(self.digits), "languages": list(self.languages),
                "commands": list(self.commands),
                "events": list(self.events)}


def _placed_by(request: Request) -> str | None:
    parts = [request.path_params.get(name) for name in ("prefix", "prefix2")]
    return "/".join(p for p in parts if p) or None


def _errors(status: int, code: str, title: str, detail: str = "") -> JSONResponse:
    return JSONResponse({"errors": [{"code": code, "title": title, "detail": detail or title}]}, status_code=status)


class FakeTelnyx(ControlledFake):
    """One fake Telnyx account with one Call Control connection: REST API (`app`), calls, events."""

    def __init__(
        self,
        *,
        api_key: str = "fake-telnyx-key",
        connection_id: str = "1494404757140276705",
        signing_seed: bytes = TEST_SIGNING_SEED,
        latency_ms: float = 0.0,
        calls_per_second: float = 30.0,
        ring_ms: float = 200.0,
        speak_ms: float = 100.0,
        webhook_transport: httpx.AsyncBaseTransport | None = None,
        webhook_timeout: float = 5.0,
        webhook_tries: int = 8,
        seed: int | None = None,
    ) -> None:
        super().__init__(_Controls(latency_ms=latency_ms, calls_per_second=calls_per_second, ring_ms=ring_ms,
                                   speak_ms=speak_ms))
        self.api_key = api_key
        self.connection_id = connection_id
        self._seed = signing_seed
        self.calls: dict[str, _Call] = {}
        self._dials: dict[str, tuple[float, JSONResponse]] = {}
        self._window: deque[float] = deque()
        self._rng = random.Random(seed)
        self._tasks: set[asyncio.Task[None]] = set()
        self._webhook_transport = webhook_transport
        self._webhook_timeout = webhook_timeout
        self._webhook_tries = webhook_tries
        self._http: httpx.AsyncClient | None = None
        self.app = self._build_app()

    # -- calls -----------------------------------------------------------------------------------

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_call(self, call: _Call) -> None:
        try:
            self._emit(call, "call.initiated", {"state": "bridging"})
            await asyncio.sleep(0)
            if not call.alive:
                return
            call.status = "ringing"
            if await self._ended_within(call, self.controls.ring_ms / 1000):
                return
            script = self.callees.get(call.to, CalleeScript())
            if script.behaviour in ("no-answer", "busy"):
                cause = "timeout" if script.behaviour == "no-answer" else "user_busy"
                self._end(call, script.behaviour, cause, "callee")
                return
            call.status = "in-progress"
            call.quiet_since = time.monotonic()
            self._emit(call, "call.answered", {"state": "answered", "start_time": _now()})
            if call.machine_detection:  # Telnyx's AMD ("detect") reports after the answer
                result = "machine" if script.behaviour == "machine" else "human"
                self._emit(call, "call.machine.detection.ended", {"result": result})
            while call.alive:  # the callee waits for words, and hangs up after a silence
                if await self._ended_within(call, 0.05):
                    return
                if call.speaking == 0 and time.monotonic() - call.quiet_since > self.controls.patience_ms / 1000:
                    self._end(call, "completed", "normal_clearing", "callee")
        except Exception:
            log.exception("fake telnyx: call %s failed", call.call_id)

    @staticmethod
    async def _ended_within(call: _Call, seconds: float) -> bool:
        try:
            await asyncio.wait_for(call.ended.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _end(self, call: _Call, status: str, cause: str, source: str) -> None:
        if not call.alive:
            return
        call.status = status
        call.ended.set()
        self._emit(call, "call.hangup", {"state": "hangup", "hangup_cause": cause, "hangup_source": source,
                                         "end_time": _now()})

    async def _speak(self, call: _Call, payload: str, gather: bool, script: CalleeScript,
                     language: str | None = None) -> None:
        async with call.speech:  # Telnyx queues speech commands: one after the other
            if not call.alive:
                return
            call.speaking += 1
            try:
                kind = "call.gather" if gather else "call.speak"
                if not gather:
                    self._emit(call, "call.speak.started", {})
                call.heard.append(payload)
                call.languages.append(language or "")
                interrupted = await self._ended_within(call, self.controls.speak_ms / 1000)
                if gather:
                    if interrupted:
                        return
                    digits = script.press(call.gathers) or ""
                    call.gathers += 1
                    if digits:
                        call.digits.append(digits)
                    self._emit(call, f"{kind}.ended", {"digits": digits, "status": "valid" if digits else "timeout"})
                else:
                    self._emit(call, f"{kind}.ended", {"status": "call_hangup" if interrupted else "completed"})
            finally:
                call.speaking -= 1
                call.quiet_since = time.monotonic()

    # -- events ----------------------------------------------------------------------------------

    def _emit(self, call: _Call, event_type: str, extra: dict[str, Any]) -> None:
        payload = {"call_control_id": call.call_id, "call_leg_id": call.leg_id, "call_session_id": call.session_id,
                   "connection_id": self.connection_id, "client_state": call.client_state, "from": call.from_,
                   "to": call.to, "direction": "outgoing", **extra}
        data = {"record_type": "event", "event_type": event_type, "id": str(uuid.uuid4()), "occurred_at": _now(),
                "payload": payload}
        call.events.append(event_type)
        call.outbox.put_nowait((call.webhook_url, data))

    async def _deliver(self, call: _Call) -> None:
        """Send the call's events in order, each until acknowledged (or out of tries)."""
        while True:
            url, data = await call.outbox.get()
            await self._post_event(url, data)
            if not call.alive and call.outbox.empty():
                return

    async def _post_event(self, url: str, data: dict[str, Any]) -> bool:
        if self._http is None:
            transport = self._webhook_transport or httpx.AsyncHTTPTransport()
            self._http = httpx.AsyncClient(transport=transport, timeout=self._webhook_timeout)
        for attempt in range(1, self._webhook_tries + 1):
            body = json.dumps({"data": data, "meta": {"attempt": attempt, "delivered_to": url}}).encode()
            timestamp = str(int(time.time()))
            headers = {"content-type": "application/json", "telnyx-timestamp": timestamp,
                       "telnyx-signature-ed25519": sign(self._seed, timestamp, body), "user-agent": "telnyx-webhooks"}
            try:
                response = await self._http.post(url, content=body, headers=headers)
            except httpx.HTTPError as error:
                log.info("fake telnyx: %s to %s failed (%s), try %d", data["event_type"], urlsplit(url).path,
                         type(error).__name__, attempt)
            else:
                if response.status_code < 300:
                    return True
                log.info("fake telnyx: %s answered %d, try %d", data["event_type"], response.status_code, attempt)
            await asyncio.sleep(min(0.2 * attempt, 1.0))
        return False

    # -- the REST API ----------------------------------------------------------------------------

    def _authorised(self, request: Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def _over_rate(self) -> bool:
        cps = self.controls.calls_per_second
        if cps <= 0:
            return False
        now = time.monotonic()
        while self._window and self._window[0] <= now - 1.0:
            self._window.popleft()
        if len(self._window) >= cps:
            return True
        self._window.append(now)
        return False

    async def _dial(self, request: Request) -> JSONResponse:
        entry: dict[str, Any] = {"received_at": time.time(), "status": None, "sid": None,
                                 "placed_by": _placed_by(request)}
        self.requests.append(entry)

        def done(response: JSONResponse, call_id: str | None = None) -> JSONResponse:
            entry["status"], entry["sid"] = response.status_code, call_id
            return response

        if not self._authorised(request):
            return done(_errors(401, "10009", "Authentication failed"))
        try:
            body = await request.json()
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return done(_errors(400, "10015", "Bad Request", "the body is not a JSON object"))
        to, from_, url, command_id = body.get("to"), body.get("from"), body.get("webhook_url"), body.get("command_id")
        entry["to"], entry["command_id"] = to, command_id
        await self._turn()
        if body.get("connection_id") != self.connection_id:
            return done(_errors(422, "10015", "Invalid connection_id"))
        if not isinstance(to, str) or not E164.fullmatch(to):
            return done(_errors(422, "10016", "Invalid 'to' phone number"))
        if not isinstance(from_, str) or not E164.fullmatch(from_):
            return done(_errors(422, "10016", "Invalid 'from' phone number"))
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return done(_errors(422, "10015", "Invalid webhook_url"))
        if isinstance(command_id, str) and command_id:
            seen = self._dials.get(command_id)
            if seen is not None and time.monotonic() - seen[0] < DEDUPE_SECONDS:
                entry["deduped"] = True
                return done(seen[1], seen[1].headers.get("x-call-id"))
        if (self.controls.reject_rate and self._rng.random() < self.controls.reject_rate) or self._over_rate():
            return done(_errors(429, "90103", "Dial rate limit exceeded",
                                "The number of dials per second for this connection was exceeded"))
        state = body.get("client_state")
        call = _Call(call_id="v3:" + base64.urlsafe_b64encode(self._rng.randbytes(24)).decode().rstrip("="),
                     leg_id=str(uuid.uuid4()), session_id=str(uuid.uuid4()), to=to, from_=from_, webhook_url=url,
                     client_state=state if isinstance(state, str) else None, created=datetime.now(UTC),
                     placed_by=entry["placed_by"],
                     machine_detection=body.get("answering_machine_detection") in ("detect", "detect_beep",
                                                                                   "detect_words", "greeting_end"))
        self.calls[call.call_id] = call
        self._spawn(self._run_call(call), f"fake-telnyx-{call.call_id}")
        self._spawn(self._deliver(call), f"fake-telnyx-events-{call.call_id}")
        response = JSONResponse({"data": {"call_control_id": call.call_id, "call_leg_id": call.leg_id,
                                          "call_session_id": call.session_id, "client_state": call.client_state,
                                          "is_alive": False, "record_type": "call"}},
                                headers={"x-call-id": call.call_id})
        if isinstance(command_id, str) and command_id:
            self._dials[command_id] = (time.monotonic(), response)
        if self.controls.fail_after_create_rate and self._rng.random() < self.controls.fail_after_create_rate:
            return done(_errors(500, "10007", "Unexpected error"), call.call_id)
        return done(response, call.call_id)

    async def _action(self, request: Request) -> JSONResponse:
        if not self._authorised(request):
            return _errors(401, "10009", "Authentication failed")
        call = self.calls.get(request.path_params["call_id"])
        action = request.path_params["action"]
        if call is None:
            return _errors(404, "10005", "Resource not found")
        try:
            body = await request.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        await self._turn()
        call.commands.append(action)
        if not call.alive:
            return _errors(422, "90018", "Call has already ended")
        if action not in ("speak", "gather_using_speak", "hangup"):
            return _errors(404, "10005", "Resource not found")
        command_id = body.get("command_id")
        if isinstance(command_id, str) and command_id:
            seen = call.seen_commands.get(command_id)
            if seen is not None and time.monotonic() - seen < DEDUPE_SECONDS:
                return JSONResponse({"data": {"result": "ok"}})
            call.seen_commands[command_id] = time.monotonic()
        if isinstance(body.get("client_state"), str):
            call.client_state = body["client_state"]
        if action == "hangup":
            self._end(call, "completed" if call.status == "in-progress" else "canceled",
                      "normal_clearing" if call.status == "in-progress" else "originator_cancel", "caller")
            return JSONResponse({"data": {"result": "ok"}})
        if call.status != "in-progress":
            return _errors(422, "90034", "Call is not answered yet")
        payload = body.get("payload")
        if not isinstance(payload, str) or not payload:
            return _errors(422, "10015", "payload is required")
        script = self.callees.get(call.to, CalleeScript())
        call.quiet_since = time.monotonic()
        language = body.get("language") if isinstance(body.get("language"), str) else None
        self._spawn(self._speak(call, payload, action == "gather_using_speak", script, language),
                    f"fake-telnyx-speak-{call.call_id}")
        return JSONResponse({"data": {"result": "ok"}})

    async def _active_calls(self, request: Request) -> JSONResponse:
        if not self._authorised(request):
            return _errors(401, "10009", "Authentication failed")
        if request.path_params["connection_id"] != self.connection_id:
            return _errors(404, "10005", "Resource not found")
        await self._turn()
        alive = [c for c in self.calls.values() if c.alive]
        try:
            size = max(1, min(250, int(request.query_params.get("page[size]", "20"))))
            start = int(request.query_params.get("page[after]", "0"))
        except ValueError:
            return _errors(400, "10015", "Bad page parameters")
        page = alive[start:start + size]
        now = datetime.now(UTC)
        data = [{"call_control_id": c.call_id, "call_leg_id": c.leg_id, "call_session_id": c.session_id,
                 "client_state": c.client_state, "call_duration": int((now - c.created).total_seconds()),
                 "record_type": "call"} for c in page]
        after = str(start + size) if start + size < len(alive) else None
        return JSONResponse({"data": data, "meta": {"cursors": {"after": after, "before": None},
                                                    "total_items": len(alive)}})

    async def _application(self, request: Request) -> JSONResponse:
        """The Call Control application this fake's connection id names, shaped as Telnyx's."""
        if not self._authorised(request):
            return _errors(401, "10009", "Authentication failed")
        if request.path_params["app_id"] != self.connection_id:
            return _errors(404, "10005", "Resource not found")
        await self._turn()
        return JSONResponse({"data": {
            "id": self.connection_id, "record_type": "call_control_application", "application_name": "fake-reminders",
            "active": True, "webhook_api_version": "2", "webhook_event_url": None, "webhook_event_failover_url": None,
            "webhook_timeout_secs": 25, "anchorsite_override": "Latency", "dtmf_type": "RFC 2833",
            "first_command_timeout": False, "first_command_timeout_secs": 10,
            "inbound": {"channel_limit": None, "shaken_stir_enabled": False, "sip_subdomain": None},
            "outbound": {"channel_limit": None, "outbound_voice_profile_id": "1293384261075731499"},
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
        }})

    # -- inspection and control ------------------------------------------------------------------

    async def _inspect_calls(self, request: Request) -> JSONResponse:
        return JSONResponse({"calls": [c.inspect() for c in self.calls.values()]})

    async def _reset(self, request: Request) -> JSONResponse:
        self._reset_controls()
        for call in self.calls.values():
            if call.alive:
                call.status = "canceled"
            call.ended.set()
        self.calls, self._dials = {}, {}
        return JSONResponse({"reset": True})

    async def aclose(self) -> None:
        """Stop the calls and their event senders (tests that run the fake in-process)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    def _build_app(self) -> Starlette:
        routes = [
            Route("/v2/calls", self._dial, methods=["POST"]),
            Route("/v2/calls/{call_id}/actions/{action}", self._action, methods=["POST"]),
            Route("/v2/connections/{connection_id}/active_calls", self._active_calls, methods=["GET"]),
            Route("/v2/call_control_applications/{app_id}", self._application, methods=["GET"]),
        ]
        # The REST API under a path prefix of one or two segments too (the harness gives each
        # replica its own, recorded as `placed_by`).
        routes += [Route(prefix + r.path, r.endpoint, methods=list(r.methods or []))
                   for prefix in ("/{prefix}", "/{prefix}/{prefix2}") for r in list(routes)]
        return Starlette(routes=routes + self._control_routes())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def main(argv: list[str] | None = None) -> None:
    """`python -m reminders_fakes.telnyx --port P [--latency-ms N] [--cps F] [--ring-ms N]`."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8092)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--cps", type=float, default=30.0, help="Dials per second before 429 (90103)")
    parser.add_argument("--ring-ms", type=float, default=200.0)
    parser.add_argument("--speak-ms", type=float, default=100.0)
    parser.add_argument("--api-key", default="fake-telnyx-key")
    parser.add_argument("--connection-id", default="1494404757140276705")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s fake-telnyx: %(message)s")
    fake = FakeTelnyx(api_key=args.api_key, connection_id=args.connection_id, latency_ms=args.latency_ms,
                      calls_per_second=args.cps, ring_ms=args.ring_ms, speak_ms=args.speak_ms)
    uvicorn.run(fake.app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
