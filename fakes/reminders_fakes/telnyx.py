"""A Telnyx-shaped fake: Call Control's REST API and its signed events, as Telnyx behaves.

- `POST /v2/calls` (Bearer, JSON `connection_id`, `to`, `from`, `webhook_url`,
  `webhook_failover_url`, `client_state`, `command_id`, `timeout_secs` (5–600, default 30),
  `time_limit_secs`, `answering_machine_detection` (+`_config.total_analysis_time_millis`)): 200
  `{"data": {"call_control_id", "call_leg_id", "call_session_id", ...}}`. A `command_id` seen in
  the last 60 s returns the first Dial's answer and makes no call; after that the same Dial is a
  second call. Over `calls_per_second` in a one-second window: 429 with error code 90103, nothing
  created. Optional injected 429 and 500 *after* creating the call (in doubt).
- Each call: `call.initiated`, ringing, then the scripted callee of the number acts (`answer`,
  `machine`, `fax`, `no-answer`, `busy`, `reject`, optionally pressing `digits`, per gather when a
  list). Unanswered: `call.hangup` with `hangup_cause` `timeout` (the script's `hangup_cause`
  instead, e.g. `no_answer`), `user_busy`, `call_rejected`; a callee ringing past `timeout_secs`:
  `timeout`. Answered: `call.answered`, then machine detection when the Dial asked for it
  (`detect`, `detect_beep`, `detect_words`, `greeting_end`, `premium`:
  `call.machine.detection.ended` and `call.machine.greeting.ended` as Telnyx documents them) and
  the call waits for commands; a callee left in silence hangs up after `patience_ms`. An answering
  machine loses what is spoken over its greeting and records what comes after (`voicemail`).
- Events are signed with Ed25519 over `"{timestamp}|{body}"` (a fixed test key pair unless given
  another), carry the call's `client_state`, `data.id` (the same on every delivery) and
  `meta.attempt` / `meta.delivered_to`, and go out in order per call. Delivery as Telnyx
  documents it: an event not answered within `webhook_timeout` (2 s) is sent again; a non-2xx
  answer is not: the event goes to the failover URL (the Dial's `webhook_failover_url`, else the
  fake-wide `webhook_failover_url` control) if there is one, else it is lost.
- `POST /v2/calls/{id}/actions/speak|gather_using_speak|gather_stop|hangup` (each deduped by
  `command_id` for 60 s): speech is queued and logged as heard (`call.speak.started` / `.ended`,
  or `call.gather.ended` with the callee's digits and `status`); hangup ends the call
  (`call.hangup`); any command to an ended call is a 422 (code 90018).
- `GET /v2/calls/{id}`: the call's status (`is_alive`, times, duration). `GET
  /v2/connections/{id}/active_calls`: the alive calls with their `client_state`, paginated.
- `GET /v2/call_control_applications/{id}`: the connection's Call Control application (what
  `reminders check` reads): 401 (10009) for another key, 404 (10005) for another id.
- Incoming calls (customers who call back): `POST /_fake/incoming` ({"from", "to", "url",
  "attestation", "digits"}) rings the connection's number as a person would: `call.initiated` with
  `direction: "incoming"`, `state: "parked"`, the caller's `from` and, for attestation A, B or C,
  `shaken_stir_attestation` with `shaken_stir_validated: true` (`failed`: A, not validated; `none`:
  neither field), to `url` (the connection's webhook URL); then it waits for the answer command
  (`POST /v2/calls/{id}/actions/answer`, deduped by `command_id`, its `client_state` kept), sends
  `call.answered` and behaves as an answered call: speech, gathers with the caller's `digits`.
- Inspection and control (not Telnyx's), shaped like the Twilio fake's: `GET /_fake/calls` (each
  call with `sid`, `status`, `stamp`, `heard`, what a person heard, what a machine kept and lost,
  its event deliveries and its commands), `GET /_fake/requests` (Dials), `POST /_fake/callees`,
  `POST /_fake/control` (the knobs and faults of `controls.FaultControls`), `POST /_fake/reset`.

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

from reminders_fakes.controls import CalleeScript, ControlledFake, FaultControls, Listener, webhook_transport
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
DEDUPE_SECONDS = 60.0  # a command_id repeated within this window is ignored
BEEP_WINDOW_SECONDS = 30.0  # detect_words: how long the beep is listened for once a machine is detected
AMD_MODES = ("premium", "detect", "detect_beep", "detect_words", "greeting_end", "disabled")
COMMANDS = ("speak", "gather_using_speak", "gather_stop", "hangup", "answer")
# An incoming call's STIR/SHAKEN attestation as the fake is asked for it → call.initiated's fields
SHAKEN_STIR = {"A": {"shaken_stir_attestation": "A", "shaken_stir_validated": True},
               "B": {"shaken_stir_attestation": "B", "shaken_stir_validated": True},
               "C": {"shaken_stir_attestation": "C", "shaken_stir_validated": True},
               "FAILED": {"shaken_stir_attestation": "A", "shaken_stir_validated": False}, "NONE": {}}
# what an unanswered callee's end is reported as, and the fake's call state of each cause
_UNANSWERED_CAUSE = {"no-answer": "timeout", "busy": "user_busy", "reject": "call_rejected"}
_STATE_OF_CAUSE = {"timeout": "no-answer", "no_answer": "no-answer", "user_busy": "busy", "call_rejected": "failed",
                   "not_found": "failed", "unspecified": "failed", "originator_cancel": "canceled"}
_ENDED = ("Call has already ended", "This call is no longer active and can't receive commands.")


def sign(seed: bytes, timestamp: str, body: bytes) -> str:
    """The `telnyx-signature-ed25519` header for `body` sent at `timestamp`."""
    return base64.b64encode(Ed25519PrivateKey.from_private_bytes(seed).sign(timestamp.encode() + b"|" + body)).decode()


@dataclass
class _Controls(FaultControls):
    latency_ms: float = 0.0  # per REST request
    calls_per_second: float = 30.0  # Dials per one-second window; more are 429 (90103). 0: no limit
    ring_ms: float = 200.0
    speak_ms: float = 100.0  # how long a message takes to speak
    patience_ms: float = 10_000.0  # a callee left in silence this long hangs up
    reject_rate: float = 0.0  # 429 before anything is created
    fail_after_create_rate: float = 0.0  # the call is created, the answer is a 500
    hang: bool = False  # hold REST requests until released
    greeting_ms: float = 300.0  # a machine's greeting, from the answer to its end (beep)
    detection_ms: float = 50.0  # how long machine detection needs to tell who answered
    webhook_failover_url: str = ""  # the connection's failover URL, for Dials that give none


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
    heard: list[str] = field(default_factory=list)  # every speech spoken into the call
    digits: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)  # the `language` of each speech heard
    gathers: int = 0
    machine_detection: str | None = None  # the Dial's answering_machine_detection (None: disabled)
    failover_url: str | None = None
    timeout_secs: float = 30.0
    time_limit_secs: float = 14_400.0
    analysis_ms: float = 3_500.0  # answering_machine_detection_config.total_analysis_time_millis
    commands: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    seen_commands: dict[str, float] = field(default_factory=dict)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    speaking: int = 0
    started: float = field(default_factory=time.monotonic)
    quiet_since: float = field(default_factory=time.monotonic)
    outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = field(default_factory=asyncio.Queue)
    speech: asyncio.Lock = field(default_factory=asyncio.Lock)
    gather_stop: asyncio.Event = field(default_factory=asyncio.Event)
    end_time: datetime | None = None
    hangup_cause: str | None = None
    hangup_source: str | None = None
    detection: str | None = None  # the result of call.machine.detection.ended
    greeting: str | None = None  # the result of call.machine.greeting.ended
    listener: Listener = field(default_factory=Listener)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    command_log: list[dict[str, Any]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # per event id: deliveries tried so far
    direction: str = "outgoing"  # incoming: a call to the connection's number (`ring_service`)
    script: CalleeScript | None = None  # an incoming call's caller (else the callee of `to`)

    @property
    def alive(self) -> bool:
        return self.status not in FINAL_CALL_STATES

    def resource(self) -> dict[str, Any]:
        """`GET /v2/calls/{id}`'s data."""
        end = self.end_time or datetime.now(UTC)
        data = {"call_control_id": self.call_id, "call_leg_id": self.leg_id, "call_session_id": self.session_id,
                "is_alive": self.alive, "client_state": self.client_state, "record_type": "call",
                "start_time": _iso(self.created), "call_duration": int((end - self.created).total_seconds())}
        if not self.alive:
            data["end_time"] = _iso(end)
        return data

    def inspect(self) -> dict[str, Any]:
        stamp = Stamp.decode(self.client_state)
        return {"sid": self.call_id, "call_control_id": self.call_id, "to": self.to, "from": self.from_,
                "status": self.status, "placed_by": self.placed_by, "created": self.created.isoformat(),
                "stamp": {"r": stamp.reminder_id, "a": stamp.attempt_id} if stamp else {},
                "heard": list(self.heard), "digits": list(self.digits), "languages": list(self.languages),
                "commands": list(self.commands), "events": list(self.events),
                "hangup_cause": self.hangup_cause, "hangup_source": self.hangup_source,
                "machine_detection": self.machine_detection, "detection": self.detection, "greeting": self.greeting,
                **self.listener.inspect(), "deliveries": list(self.deliveries),
                "command_log": list(self.command_log)}


def _placed_by(request: Request) -> str | None:
    parts = [request.path_params.get(name) for name in ("prefix", "prefix2")]
    return "/".join(p for p in parts if p) or None


def _errors(status: int, code: str, title: str, detail: str = "") -> JSONResponse:
    return JSONResponse({"errors": [{"code": code, "title": title, "detail": detail or title}]}, status_code=status)


def _tags(data: dict[str, Any]) -> frozenset[str]:
    kind = data.get("event_type", "")
    return frozenset({kind, "final"} if kind == "call.hangup" else {kind})


def _int_field(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def _dial_options(body: dict[str, Any]) -> dict[str, Any] | JSONResponse:
    """The Dial's optional fields, checked, as `_Call` fields; or the 422."""
    amd = body.get("answering_machine_detection", "disabled")
    if amd not in AMD_MODES:
        return _errors(422, "10015", "Invalid answering_machine_detection", f"must be one of {AMD_MODES}")
    timeout = _int_field(body, "timeout_secs", 30, 5, 600)
    limit = _int_field(body, "time_limit_secs", 14_400, 30, 14_400)
    if timeout is None or limit is None:
        return _errors(422, "10015", "Invalid timeout_secs or time_limit_secs")
    failover = body.get("webhook_failover_url")
    if failover is not None and not (isinstance(failover, str) and failover.startswith(("http://", "https://"))):
        return _errors(422, "10015", "Invalid webhook_failover_url")
    config = body.get("answering_machine_detection_config")
    analysis = config.get("total_analysis_time_millis", 3500) if isinstance(config, dict) else 3500
    return {"machine_detection": None if amd == "disabled" else amd, "timeout_secs": float(timeout),
            "time_limit_secs": float(limit), "failover_url": failover or None,
            "analysis_ms": float(analysis) if isinstance(analysis, int | float) else 3500.0}


def _gather_options(body: dict[str, Any]) -> dict[str, Any]:
    valid = body.get("valid_digits")
    low, high = body.get("minimum_digits"), body.get("maximum_digits")
    return {"valid_digits": valid if isinstance(valid, str) and valid else "0123456789#*",
            "minimum_digits": low if isinstance(low, int) and low > 0 else 1,
            "maximum_digits": high if isinstance(high, int) and high > 0 else 128}


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
        webhook_timeout: float = 2.0,
        webhook_tries: int = 8,
        seed: int | None = None,
    ) -> None:
        """`webhook_timeout`: Telnyx's (2 s, on the fake's clock); `webhook_tries`: deliveries of one
        event to one URL that get no answer in time before it goes to the failover URL or is lost."""
        super().__init__(_Controls(latency_ms=latency_ms, calls_per_second=calls_per_second, ring_ms=ring_ms,
                                   speak_ms=speak_ms))
        self.api_key = api_key
        self.connection_id = connection_id
        self._seed = signing_seed
        self.calls: dict[str, _Call] = {}
        self._dials: dict[str, tuple[float, JSONResponse]] = {}
        self._window: deque[float] = deque()
        self._rng.seed(seed)
        self._webhook_transport = webhook_transport
        self._webhook_timeout = webhook_timeout
        self._webhook_tries = webhook_tries
        self._http: httpx.AsyncClient | None = None
        self.app = self._build_app()

    # -- calls -----------------------------------------------------------------------------------

    async def _run_call(self, call: _Call) -> None:
        try:
            self._emit(call, "call.initiated", {"state": "bridging"})
            await asyncio.sleep(0)
            if not call.alive:
                return
            call.status = "ringing"
            script = self.callees.get(call.to, CalleeScript())
            ring = (self.controls.ring_ms if script.ring_ms is None else script.ring_ms) / 1000
            limit = self.seconds(call.timeout_secs)
            if await self._ended_within(call, min(ring, limit)):
                return
            if not script.answers:
                cause = script.hangup_cause or _UNANSWERED_CAUSE[script.behaviour]
                self._end(call, _STATE_OF_CAUSE.get(cause, "failed"), cause, "callee")
                return
            if ring > limit:  # the Dial's timeout_secs ran out while it rang
                self._end(call, "no-answer", "timeout", "caller")
                return
            self._answer(call, script)
            await self._stay(call)
        except Exception:
            log.exception("fake telnyx: call %s failed", call.call_id)

    def _answer(self, call: _Call, script: CalleeScript) -> None:
        call.status = "in-progress"
        call.quiet_since = time.monotonic()
        greeting = self.controls.greeting_ms if script.greeting_ms is None else script.greeting_ms
        call.listener = Listener(kind=script.kind, greeting_ends=time.monotonic() + greeting / 1000)
        self._emit(call, "call.answered", {"state": "answered", "start_time": _now()})
        if call.machine_detection:  # Telnyx's AMD reports after the answer
            self._spawn(self._detect(call, script), f"fake-telnyx-amd-{call.call_id}")

    async def _stay(self, call: _Call) -> None:
        """The callee waits for words, and hangs up after a silence; the Dial's time limit ends it."""
        while call.alive:
            if await self._ended_within(call, 0.05):
                return
            now = time.monotonic()
            if now - call.started > self.seconds(call.time_limit_secs):
                self._end(call, "completed", "time_limit", "unknown")
            elif call.speaking == 0 and now - call.quiet_since > self.controls.patience_ms / 1000:
                self._end(call, "completed", "normal_clearing", "callee")

    async def _detect(self, call: _Call, script: CalleeScript) -> None:
        """Answering machine detection as the Dial's mode asks: `detection.ended` once the answerer
        is known (`not_sure` past the analysis time), then for a machine its greeting's end."""
        mode = call.machine_detection
        detect = (self.controls.detection_ms if script.detection_ms is None else script.detection_ms) / 1000
        analysis = self.seconds(call.analysis_ms / 1000)
        if mode == "premium":
            results = {"answer": "human_residence", "machine": "machine", "fax": "fax_detected"}
        else:
            results = {"answer": "human", "machine": "machine", "fax": "not_sure"}
        result = results[script.behaviour] if detect <= analysis else "not_sure"
        if await self._ended_within(call, min(detect, analysis)):
            return
        prefix = "call.machine.premium" if mode == "premium" else "call.machine"
        call.detection = result
        self._emit(call, f"{prefix}.detection.ended", {"result": result})
        if result != "machine" or mode == "detect":
            return
        left = max(0.0, call.listener.greeting_ends - time.monotonic())
        beep = script.greeting_end == "beep"
        if mode in ("detect_beep", "premium"):  # greeting.ended only when a beep is heard
            if not beep:
                return
            greeting = "beep_detected"
        elif mode == "detect_words":  # the beep is listened for 30 s
            window = self.seconds(BEEP_WINDOW_SECONDS)
            greeting = "beep_detected" if beep and left <= window else "not_sure"
            left = left if greeting == "beep_detected" else window
        else:  # greeting_end: a beep or a silence ends it
            greeting = "ended"
        if await self._ended_within(call, left):
            return
        call.greeting = greeting
        self._emit(call, f"{prefix}.greeting.ended", {"result": greeting})

    # -- incoming calls (a customer calls the connection's number) --------------------------------

    def ring_service(self, *, from_: str, to: str, url: str, attestation: str | None = None,
                     digits: str | list[str] | None = None) -> _Call:
        """A person at `from_` calls `to` (the connection's number; its events go to `url`), with
        the STIR/SHAKEN `attestation` (A, B, C, failed, none), pressing `digits` when asked."""
        stir = SHAKEN_STIR[(attestation or "none").upper()]
        call = _Call(call_id="v3:" + base64.urlsafe_b64encode(self._rng.randbytes(24)).decode().rstrip("="),
                     leg_id=str(uuid.uuid4()), session_id=str(uuid.uuid4()), to=to, from_=from_, webhook_url=url,
                     client_state=None, created=datetime.now(UTC), placed_by=None, status="ringing",
                     direction="incoming", script=CalleeScript(digits=digits))
        self.calls[call.call_id] = call
        self._spawn(self._run_incoming(call, stir), f"fake-telnyx-incoming-{call.call_id}")
        self._spawn(self._deliver(call), f"fake-telnyx-events-{call.call_id}")
        return call

    async def _run_incoming(self, call: _Call, stir: dict[str, Any]) -> None:
        """Parked until the answer command comes; the caller gives up after `patience_ms`."""
        try:
            self._emit(call, "call.initiated", {"state": "parked", "start_time": _iso(call.created), **stir})
            deadline = time.monotonic() + self.controls.patience_ms / 1000
            while call.alive and call.status != "in-progress":
                if time.monotonic() > deadline:
                    self._end(call, "canceled", "originator_cancel", "caller")
                    return
                await self._ended_within(call, 0.02)
            await self._stay(call)
        except Exception:
            log.exception("fake telnyx: incoming call %s failed", call.call_id)

    async def _incoming(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
            assert isinstance(body, dict)
            to, url, attestation = body.get("to"), body.get("url"), body.get("attestation")
            assert isinstance(to, str) and E164.fullmatch(to), "to: the connection's number, E.164"
            assert isinstance(url, str) and url.startswith(("http://", "https://")), "url: the connection's webhook URL"
            assert attestation is None or str(attestation).upper() in SHAKEN_STIR, \
                f"attestation: one of {sorted(SHAKEN_STIR)}"
            call = self.ring_service(from_=str(body.get("from") or "anonymous"), to=to, url=url,
                                     attestation=attestation, digits=body.get("digits"))
        except (ValueError, AssertionError) as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        return JSONResponse({"call_control_id": call.call_id}, status_code=201)

    @staticmethod
    async def _ended_within(call: _Call, seconds: float) -> bool:
        try:
            async with asyncio.timeout(max(0.0, seconds)):  # not wait_for: 3.11's can swallow a cancel
                await call.ended.wait()
        except TimeoutError:
            return False
        return True

    def _end(self, call: _Call, status: str, cause: str, source: str) -> None:
        if not call.alive:
            return
        call.status, call.hangup_cause, call.hangup_source = status, cause, source
        call.end_time = datetime.now(UTC)
        call.ended.set()
        self._emit(call, "call.hangup", {"state": "hangup", "hangup_cause": cause, "hangup_source": source,
                                         "start_time": _iso(call.created), "end_time": _iso(call.end_time)})

    async def _speak(self, call: _Call, payload: str, gather: dict[str, Any] | None, script: CalleeScript,
                     language: str | None = None) -> None:
        async with call.speech:  # Telnyx queues speech commands: one after the other
            if not call.alive:
                return
            call.speaking += 1
            try:
                if gather is None:
                    self._emit(call, "call.speak.started", {})
                call.heard.append(payload)
                call.languages.append(language or "")
                call.gather_stop.clear()
                start = time.monotonic()
                await self._speech_lasts(call, stoppable=gather is not None)
                call.listener.take(payload, start, time.monotonic())
                if gather is None:
                    self._emit(call, "call.speak.ended", {"status": "completed" if call.alive else "call_hangup"})
                else:
                    self._gathered(call, script, gather)
            finally:
                call.speaking -= 1
                call.quiet_since = time.monotonic()

    async def _speech_lasts(self, call: _Call, *, stoppable: bool) -> None:
        """`speak_ms`, or less: until the call ends (or, for a gather, `gather_stop` comes)."""
        waiters = [asyncio.ensure_future(call.ended.wait())]
        if stoppable:
            waiters.append(asyncio.ensure_future(call.gather_stop.wait()))
        try:
            await asyncio.wait(waiters, timeout=self.controls.speak_ms / 1000, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _gathered(self, call: _Call, script: CalleeScript, gather: dict[str, Any]) -> None:
        """`call.gather.ended` once the prompt was spoken: the person's keys (a machine presses none)."""
        digits, status = "", "timeout"
        if not call.alive:
            status = "call_hangup"
        elif call.gather_stop.is_set():
            status = "cancelled"
        else:
            keys = script.press(call.gathers) if call.listener.kind == "person" else None
            call.gathers += 1
            digits = (keys or "")[:gather["maximum_digits"]]
            if digits:
                call.digits.append(digits)
                ok = all(d in gather["valid_digits"] for d in digits) and len(digits) >= gather["minimum_digits"]
                status = "valid" if ok else "invalid"
        self._emit(call, "call.gather.ended", {"digits": digits, "status": status})

    # -- events ----------------------------------------------------------------------------------

    def _emit(self, call: _Call, event_type: str, extra: dict[str, Any]) -> None:
        payload = {"call_control_id": call.call_id, "call_leg_id": call.leg_id, "call_session_id": call.session_id,
                   "connection_id": self.connection_id, "client_state": call.client_state, "from": call.from_,
                   "to": call.to, "direction": call.direction, **extra}
        data = {"record_type": "event", "event_type": event_type, "id": str(uuid.uuid4()), "occurred_at": _now(),
                "payload": payload}
        call.events.append(event_type)
        call.outbox.put_nowait((call.webhook_url, data))

    async def _deliver(self, call: _Call) -> None:
        """Send the call's events in order: each until answered, unless a fault loses or delays it."""
        while True:
            url, data = await call.outbox.get()
            tags = _tags(data)
            if self.fault_lost(tags):
                self._delivery(call.deliveries, type=data["event_type"], id=data["id"], attempt=0, url=url,
                               status=None, result="lost")
            elif (delay := self.fault_delay(tags)) > 0:
                self._spawn(self._later(delay, lambda u=url, d=data: self._send_event(call, u, d)),
                            f"fake-telnyx-late-{call.call_id}")
            else:
                await self._send_event(call, url, data)
            if not call.alive and call.outbox.empty() and call.speaking == 0:
                return

    async def _send_event(self, call: _Call, url: str, data: dict[str, Any], redelivery: bool = False) -> None:
        await self._post_event(url, data, call=call, redelivery=redelivery)
        again = None if redelivery else self.fault_redelivery(_tags(data))
        if again is not None:
            self._spawn(self._later(again, lambda: self._send_event(call, url, data, True)),
                        f"fake-telnyx-again-{call.call_id}")

    async def _post_event(self, url: str, data: dict[str, Any], *, call: _Call | None = None,
                          redelivery: bool = False) -> bool:
        """Deliver one event as Telnyx does: again while the receiver does not answer in time; a
        non-2xx answer (or no answer after the tries) sends it to the failover URL, if any."""
        failover = (call.failover_url if call else None) or self.controls.webhook_failover_url or None
        attempts = call.attempts if call is not None else {}
        for target in (url, failover):
            if not target:
                continue
            for _ in range(self._webhook_tries):
                attempts[data["id"]] = attempt = attempts.get(data["id"], 0) + 1
                outcome = await self._post_once(call, target, data, attempt, redelivery)
                if outcome == "acknowledged":
                    return True
                if outcome == "refused":
                    break  # not retried at this URL
                await asyncio.sleep(min(0.2 * attempt, 1.0))
        return False

    async def _post_once(self, call: _Call | None, url: str, data: dict[str, Any], attempt: int,
                         redelivery: bool) -> str:
        """One delivery: `acknowledged` (2xx), `refused` (another status), `timeout` or `error`."""
        if self._http is None:
            self._http = httpx.AsyncClient(transport=self._webhook_transport or webhook_transport(),
                                           timeout=None)
        body = json.dumps({"data": data, "meta": {"attempt": attempt, "delivered_to": url}}).encode()
        timestamp = str(int(time.time()))
        headers = {"content-type": "application/json", "telnyx-timestamp": timestamp,
                   "telnyx-signature-ed25519": sign(self._seed, timestamp, body), "user-agent": "telnyx-webhooks"}
        slow, http = self.fault_slow(_tags(data)), self._http

        async def exchange() -> httpx.Response:
            response = await http.post(url, content=body, headers=headers)
            if slow:
                await asyncio.sleep(slow)  # the receiver did the work; its answer is late
            return response

        status: int | None = None
        try:
            async with asyncio.timeout(self.seconds(self._webhook_timeout)):
                status = (await exchange()).status_code
        except TimeoutError:
            outcome = "timeout"
        except Exception as error:  # noqa: BLE001 - no answer at all, whatever broke: as a timeout
            outcome = "error"
            log.info("fake telnyx: %s to %s failed (%s)", data["event_type"], urlsplit(url).path, type(error).__name__)
        else:
            outcome = "acknowledged" if 200 <= status < 300 else "refused"
        self._delivery(None if call is None else call.deliveries, type=data["event_type"], id=data["id"],
                       attempt=attempt, url=url, status=status, result=outcome, redelivery=redelivery)
        if outcome != "acknowledged":
            log.info("fake telnyx: %s to %s: %s (%s), try %d", data["event_type"], urlsplit(url).path, outcome,
                     status, attempt)
        return outcome

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

    async def _dial(self, request: Request) -> Any:
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
        options = _dial_options(body)
        if isinstance(options, JSONResponse):
            return done(options)
        if isinstance(command_id, str) and command_id:
            seen = self._dials.get(command_id)
            if seen is not None and time.monotonic() - seen[0] < self.seconds(DEDUPE_SECONDS):
                entry["deduped"] = True
                return done(seen[1], seen[1].headers.get("x-call-id"))
        if (self.controls.reject_rate and self._rng.random() < self.controls.reject_rate) or self._over_rate():
            return done(_errors(429, "90103", "Dial rate limit exceeded",
                                "The number of dials per second for this connection was exceeded"))
        state = body.get("client_state")
        call = _Call(call_id="v3:" + base64.urlsafe_b64encode(self._rng.randbytes(24)).decode().rstrip("="),
                     leg_id=str(uuid.uuid4()), session_id=str(uuid.uuid4()), to=to, from_=from_, webhook_url=url,
                     client_state=state if isinstance(state, str) else None, created=datetime.now(UTC),
                     placed_by=entry["placed_by"], **options)
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
            response = _errors(500, "10007", "Unexpected error")
        lost = entry["answer_lost"] = self.answer_lost("dial")
        call.command_log.append({"action": "dial", "command_id": command_id, "at": time.time(), "result": "executed",
                                 "answer": response.status_code, "answer_lost": lost})
        return await self.answered(lost, done(response, call.call_id))

    async def _action(self, request: Request) -> Any:
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
        command_id = body.get("command_id") if isinstance(body.get("command_id"), str) and body["command_id"] else None
        entry: dict[str, Any] = {"action": action, "command_id": command_id, "at": time.time()}
        call.command_log.append(entry)
        if not call.alive:
            entry.update(result="ended", answer=422)
            return _errors(422, "90018", *_ENDED)
        if action not in COMMANDS:
            entry.update(result="unknown", answer=404)
            return _errors(404, "10005", "Resource not found")
        if command_id is not None:
            seen = call.seen_commands.get(command_id)
            if seen is not None and time.monotonic() - seen < self.seconds(DEDUPE_SECONDS):
                entry.update(result="duplicate", answer=200)
                return JSONResponse({"data": {"result": "ok"}})
        response = self._execute(call, action, body)
        entry.update(result="executed" if response.status_code == 200 else "refused", answer=response.status_code)
        if response.status_code != 200:
            return response
        if command_id is not None:
            call.seen_commands[command_id] = time.monotonic()
        entry["answer_lost"] = lost = self.answer_lost(action)
        return await self.answered(lost, response)

    def _execute(self, call: _Call, action: str, body: dict[str, Any]) -> JSONResponse:
        """Carry out a command on a live call: its answer."""
        if isinstance(body.get("client_state"), str):
            call.client_state = body["client_state"]
        answered = call.status == "in-progress"
        if action == "hangup":
            self._end(call, "completed" if answered else "canceled",
                      "normal_clearing" if answered else "originator_cancel", "caller")
            return JSONResponse({"data": {"result": "ok"}})
        if action == "gather_stop":
            call.gather_stop.set()
            return JSONResponse({"data": {"result": "ok"}})
        if action == "answer":
            if call.direction != "incoming" or answered:
                return _errors(422, "90018", "Call can not be answered", "only a parked incoming call is answered")
            self._answer(call, call.script or CalleeScript())
            return JSONResponse({"data": {"result": "ok"}})
        if not answered:
            return _errors(422, "90034", "Call is not answered yet")
        payload = body.get("payload")
        if not isinstance(payload, str) or not payload:
            return _errors(422, "10015", "payload is required")
        script = call.script or self.callees.get(call.to, CalleeScript())
        call.quiet_since = time.monotonic()
        language = body.get("language") if isinstance(body.get("language"), str) else None
        gather = _gather_options(body) if action == "gather_using_speak" else None
        self._spawn(self._speak(call, payload, gather, script, language), f"fake-telnyx-speak-{call.call_id}")
        return JSONResponse({"data": {"result": "ok"}})

    async def _get_call(self, request: Request) -> JSONResponse:
        if not self._authorised(request):
            return _errors(401, "10009", "Authentication failed")
        call = self.calls.get(request.path_params["call_id"])
        if call is None:
            return _errors(404, "10005", "Resource not found")
        await self._turn()
        return JSONResponse({"data": call.resource()})

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
        await self._cancel_tasks()
        if self._http is not None:
            await self._http.aclose()

    def _build_app(self) -> Starlette:
        routes = [
            Route("/v2/calls", self._dial, methods=["POST"]),
            Route("/v2/calls/{call_id}", self._get_call, methods=["GET"]),
            Route("/v2/calls/{call_id}/actions/{action}", self._action, methods=["POST"]),
            Route("/v2/connections/{connection_id}/active_calls", self._active_calls, methods=["GET"]),
            Route("/v2/call_control_applications/{app_id}", self._application, methods=["GET"]),
        ]
        # The REST API under a path prefix of one or two segments too (the harness gives each
        # replica its own, recorded as `placed_by`).
        routes += [Route(prefix + r.path, r.endpoint, methods=list(r.methods or []))
                   for prefix in ("/{prefix}", "/{prefix}/{prefix2}") for r in list(routes)]
        incoming = [Route("/_fake/incoming", self._incoming, methods=["POST"])]
        return Starlette(routes=routes + self._control_routes() + incoming)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _now() -> str:
    return _iso(datetime.now(UTC))


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
