"""A Twilio-shaped fake: the Calls REST API and the webhooks, as Twilio behaves (not like `generic`).

- `POST /2010-04-01/Accounts/{sid}/Calls.json` (HTTP Basic, form `To`, `From`, `Url` (+`Method`),
  `FallbackUrl` (+`FallbackMethod`), `StatusCallback` (+`StatusCallbackMethod`), repeated
  `StatusCallbackEvent`, `Timeout`, `MachineDetection` = `Enable` | `DetectMessageEnd`,
  `MachineDetectionTimeout`): 201 JSON with `sid`, status `queued`. No idempotency: the same
  request twice is two calls. Optional injected 429 (error 20429, nothing created) and 500 *after*
  creating the call (the create in doubt).
- Calls leave the queue at `calls_per_second` (queued calls wait, like Twilio's CPS queue), ring,
  and then the scripted callee of the number acts: `answer` (a person), `machine` (an answering
  machine: a greeting of `greeting_ms`, then it records), `fax`, `no-answer`, `busy`, `reject`
  (Twilio reports it `busy`), optionally pressing `digits`. A callee ringing past the create's
  `Timeout` is `no-answer`.
- Machine detection: with `Enable` the voice `Url` is requested once the answerer is known
  (`detection_ms`): `AnsweredBy` = `human`, `machine_start`, `fax`; with `DetectMessageEnd` a
  machine's comes only when its greeting ends: `machine_end_beep` | `_silence` | `_other`; past
  `MachineDetectionTimeout` (30 s): `unknown`. A `<Say>` (`speak_ms` long) to a machine is lost
  while its greeting plays and recorded after it (`voicemail` / `lost` per call).
- The TwiML is followed (`<Say>`, `<Gather>` with the person's digits to its `action`,
  `<Redirect>`, `<Pause>` (silence), `<Hangup/>`). A request of `Url` that fails (an HTTP error
  status, no connection, no answer within the read timeout, TwiML that does not parse) goes to
  `FallbackUrl` at once, with
  `ErrorCode` and `ErrorUrl`; an `action` or `<Redirect>` that fails ends the call's TwiML.
- Webhooks are signed over the URL requested (without its fragment; POST parameters sorted) and
  carry `I-Twilio-Idempotency-Token` (the same on each retry of one request). A URL's fragment
  holds Twilio's connection overrides (`#rc=2&rp=5xx,ct&ct=..&rt=..&tt=..`; never sent). Status
  callbacks (`SequenceNumber`, `Timestamp`) go out in order per call, best effort: one that fails
  is retried only as its overrides say. A call cancelled while queued sends none.
- `GET /2010-04-01/Accounts/{sid}.json` reads the account (what `reminders check` asks): 401
  (20003) for wrong credentials, 404 (20404) for another account's sid.
- `GET Calls.json?To=&Status=` lists, `GET Calls/{sid}.json` reads, `POST Calls/{sid}.json`
  with `Status=canceled` cancels a queued or ringing call (no effect later), `Status=completed`
  ends one in progress.
- Incoming calls (customers who call back): `POST /_fake/incoming` ({"from", "to", "url",
  "attestation", "digits"}) rings the service as a person calling the account's number would:
  Twilio requests the number's voice URL (`url`) with the documented parameters (`Direction`
  `inbound`, `From`, `To`, `CallSid`, and `StirVerstat` for the STIR/SHAKEN attestation: `A`, `B`,
  `C` → `TN-Validation-Passed-A|B|C`, `failed` → `TN-Validation-Failed`, `none` or absent: no
  parameter), signed as every webhook, then follows the TwiML (a `<Gather>` gets `digits`).
- Inspection and control (not Twilio's): `GET /_fake/calls` (every call with what was said into it
  (`heard`), what a person heard, what a machine kept and lost, its webhook deliveries, its
  commands), `GET /_fake/requests`, `POST /_fake/callees` ({number: script}), `POST
  /_fake/control` (the knobs and faults of `controls.FaultControls`), `POST /_fake/reset`.

`FakeTwilio(...).app` is a Starlette app: serve it (`python -m reminders_fakes.twilio`) or hand it
to httpx as a transport (`httpx.ASGITransport(fake.app)`) in unit tests; `webhook_transport`
routes the webhooks (e.g. to the service's ASGI app) instead of the network.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from reminders_fakes.controls import CalleeScript, ControlledFake, FaultControls, Listener, webhook_transport
from service.privacy import E164
from service.reminders.outcomes import FINAL_CALL_STATES, PRE_ANSWER_STATES

__all__ = ["CalleeScript", "FakeTwilio", "main"]

log = logging.getLogger(__name__)

# Twilio's error codes for a failed webhook (the fallback's ErrorCode)
HTTP_RETRIEVAL_FAILURE, HTTP_CONNECTION_FAILURE, DOCUMENT_PARSE_FAILURE = 11200, 11205, 12100
# connection overrides: valid range of each, in ms (rc: a count)
_LIMITS = {"ct": (100.0, 10_000.0), "rt": (100.0, 15_000.0), "tt": (100.0, 15_000.0), "rc": (0.0, 5.0)}
_UNANSWERED = {"no-answer": "no-answer", "busy": "busy", "reject": "busy"}
# An incoming call's STIR/SHAKEN attestation → its StirVerstat ("Trusted Calling with SHAKEN/STIR");
# none: no parameter
STIR_VERSTAT = {"A": "TN-Validation-Passed-A", "B": "TN-Validation-Passed-B", "C": "TN-Validation-Passed-C",
                "FAILED": "TN-Validation-Failed"}


@dataclass
class _Controls(FaultControls):
    latency_ms: float = 0.0  # per REST request
    calls_per_second: float = 1.0  # the account's CPS: the queue drains at this rate (0: no queue)
    ring_ms: float = 200.0
    reject_rate: float = 0.0  # 429 before anything is created
    fail_after_create_rate: float = 0.0  # the call is created, the answer is a 500
    hang: bool = False  # hold REST requests until released
    speak_ms: float = 0.0  # how long a <Say> lasts
    greeting_ms: float = 300.0  # a machine's greeting, from the answer to its beep
    detection_ms: float = 50.0  # how long machine detection needs to tell who answered


@dataclass(frozen=True)
class _Overrides:
    """Twilio's connection overrides of one webhook URL (its fragment), in ms."""

    rc: int = 1
    rp: frozenset[str] = frozenset({"ct"})
    ct: float = 5000.0
    rt: float = 15000.0
    tt: float = 15000.0


def _overrides(url: str, status: bool, read_ms: float) -> tuple[str, _Overrides]:
    """The URL to request (no fragment) and its overrides. A status callback without any is
    never retried; `read_ms` is the default read and total time."""
    base, hash_, fragment = url.partition("#")
    values = dict(parse_qsl(fragment))

    def number(name: str, default: float) -> float:
        try:
            value = float(values[name])
        except (KeyError, ValueError):
            return default
        low, high = _LIMITS[name]
        return min(high, max(low, value))

    policy = frozenset(p.strip() for p in values.get("rp", "ct").split(",") if p.strip())
    return base, _Overrides(rc=int(number("rc", 0 if status and not hash_ else 1)), rp=policy,
                            ct=number("ct", 5000.0), rt=number("rt", read_ms), tt=number("tt", read_ms))


@dataclass
class _Hook:
    """One webhook request Twilio makes (retries included: they share the token)."""

    kind: str  # status, url, fallback, action, redirect
    url: str  # as given: connection overrides in its fragment
    params: dict[str, str]
    method: str = "POST"
    tags: frozenset[str] = frozenset()
    token: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def name(self) -> str:
        return f"status:{self.params.get('CallStatus')}" if self.kind == "status" else self.kind


@dataclass
class _Result:
    response: httpx.Response | None
    failure: str | None = None  # 4xx, 5xx, ct, rt, conn
    code: int | None = None


@dataclass
class _Call:
    sid: str
    to: str
    from_: str
    url: str
    status_callback: str | None
    events: set[str]
    machine_detection: str | None  # Enable, DetectMessageEnd or None
    date_created: datetime
    method: str = "POST"
    status_callback_method: str = "POST"
    fallback_url: str | None = None
    fallback_method: str = "POST"
    timeout: float = 60.0  # seconds it may ring
    detection_timeout: float = 30.0  # MachineDetectionTimeout
    status: str = "queued"
    sequence: int = 0
    heard: list[str] = field(default_factory=list)  # every <Say> spoken into the call
    twiml: list[str] = field(default_factory=list)
    answered_by: str | None = None
    digits: list[str] = field(default_factory=list)
    gathers: int = 0
    hang_up: asyncio.Event = field(default_factory=asyncio.Event)
    start_time: datetime | None = None
    end_time: datetime | None = None
    placed_by: str | None = None
    direction: str = "outbound-api"  # inbound: a call to the account's number (`ring_service`)
    stir_verstat: str | None = None  # an inbound call's StirVerstat parameter
    listener: Listener = field(default_factory=Listener)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    command_log: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    outbox: asyncio.Queue[_Hook | None] = field(default_factory=asyncio.Queue)

    def resource(self, account_sid: str) -> dict[str, Any]:
        duration = None
        if self.end_time is not None:
            duration = str(int((self.end_time - self.start_time).total_seconds())) if self.start_time else "0"
        return {
            "sid": self.sid,
            "account_sid": account_sid,
            "to": self.to,
            "from": self.from_,
            "status": self.status,
            "direction": self.direction,
            "api_version": "2010-04-01",
            "date_created": format_datetime(self.date_created, usegmt=True),
            "date_updated": format_datetime(self.end_time or self.start_time or self.date_created, usegmt=True),
            "start_time": format_datetime(self.start_time, usegmt=True) if self.start_time else None,
            "end_time": format_datetime(self.end_time, usegmt=True) if self.end_time else None,
            "duration": duration,
            "answered_by": self.answered_by,
            "uri": f"/2010-04-01/Accounts/{account_sid}/Calls/{self.sid}.json",
        }

    def inspect(self, account_sid: str) -> dict[str, Any]:
        query = dict(parse_qsl(urlsplit(self.url).query))
        return {**self.resource(account_sid), "url": self.url, "stamp": query, "placed_by": self.placed_by,
                "heard": list(self.heard), "twiml": list(self.twiml), "digits": list(self.digits),
                "machine_detection": self.machine_detection, "fallback_url": self.fallback_url,
                **self.listener.inspect(), "deliveries": list(self.deliveries), "command_log": list(self.command_log),
                "errors": list(self.errors)}


def _placed_by(request: Request) -> str | None:
    """The path prefix the REST request came under (None without one)."""
    parts = [request.path_params.get(name) for name in ("prefix", "prefix2")]
    return "/".join(p for p in parts if p) or None


async def _form(request: Request) -> FormData:
    """An urlencoded body (all Twilio's API takes), without a multipart parser."""
    return FormData(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))


def _pause_seconds(length: str | None) -> float:
    """<Pause length>: whole seconds, 1 by default (Twilio's)."""
    try:
        return max(0.0, min(float(int(length or "1")), 60.0))
    except ValueError:
        return 1.0


def _method(value: Any) -> str:
    return "GET" if isinstance(value, str) and value.upper() == "GET" else "POST"


def _number(value: Any, default: float, low: float, high: float) -> float:
    try:
        return min(high, max(low, float(value)))
    except (TypeError, ValueError):
        return default


def _twiml_root(result: _Result) -> tuple[ET.Element | None, int | None]:
    """The TwiML document of a webhook's answer, or the error code of its failure."""
    if result.response is None or not 200 <= result.response.status_code < 300:
        return None, result.code or HTTP_RETRIEVAL_FAILURE
    try:
        root = ET.fromstring(result.response.text)
    except ET.ParseError:
        return None, DOCUMENT_PARSE_FAILURE
    return (root, None) if root.tag == "Response" else (None, DOCUMENT_PARSE_FAILURE)


class FakeTwilio(ControlledFake):
    """One fake Twilio account: its REST API (`app`), its dialer, and its webhook sender."""

    def __init__(
        self,
        *,
        account_sid: str = "AC" + "0" * 32,
        auth_token: str = "fake-auth-token",
        latency_ms: float = 0.0,
        calls_per_second: float = 1.0,
        ring_ms: float = 200.0,
        webhook_transport: httpx.AsyncBaseTransport | None = None,
        webhook_timeout: float = 15.0,
        seed: int | None = None,
    ) -> None:
        """`webhook_timeout`: Twilio's default read and total time of a webhook (15 s), in seconds."""
        super().__init__(_Controls(latency_ms=latency_ms, calls_per_second=calls_per_second, ring_ms=ring_ms))
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.calls: dict[str, _Call] = {}
        self._signer = RequestValidator(auth_token)
        self._rng.seed(seed)
        self._queue: asyncio.Queue[_Call] | None = None
        self._dialer: asyncio.Task[None] | None = None
        self._webhook_transport = webhook_transport
        self._webhook_timeout = webhook_timeout
        self._http: httpx.AsyncClient | None = None
        self.app = self._build_app()

    # -- the dialer ------------------------------------------------------------------------------

    def _ensure_dialer(self) -> asyncio.Queue[_Call]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._dialer is None or self._dialer.done():
            self._dialer = asyncio.get_running_loop().create_task(self._dial_loop(), name="fake-twilio-dialer")
        return self._queue

    async def _dial_loop(self) -> None:
        assert self._queue is not None
        next_at = time.monotonic()
        while True:
            call = await self._queue.get()
            if call.status != "queued":
                continue  # cancelled while queued
            cps = self.controls.calls_per_second
            if cps > 0:
                now = time.monotonic()
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                next_at = max(now, next_at) + 1.0 / cps
            if call.status != "queued":
                continue
            self._spawn(self._run_call(call), f"fake-call-{call.sid}")

    @staticmethod
    async def _hung_up_within(call: _Call, seconds: float) -> bool:
        if seconds <= 0:
            return call.hang_up.is_set()
        try:
            async with asyncio.timeout(seconds):  # not wait_for: 3.11's can swallow a cancel
                await call.hang_up.wait()
        except TimeoutError:
            return False
        return True

    async def _run_call(self, call: _Call) -> None:
        self._spawn(self._send_status(call), f"fake-call-status-{call.sid}")
        try:
            call.status = "initiated"
            self._status_callback(call, "initiated", "initiated")
            if call.status == "canceled":
                return
            call.status = "ringing"
            self._status_callback(call, "ringing", "ringing")
            script = self.callees.get(call.to, CalleeScript())
            ring = (self.controls.ring_ms if script.ring_ms is None else script.ring_ms) / 1000
            limit = self.seconds(call.timeout)
            await self._hung_up_within(call, min(ring, limit))
            if call.status == "canceled":
                self._status_callback(call, "completed", "canceled")
                return
            if not script.answers or ring > limit:
                self._finish(call, _UNANSWERED.get(script.behaviour, "no-answer"))
                return
            await self._answer(call, script)
            if not call.hang_up.is_set():
                await self._follow(call, call.url, script, {}, kind="url", method=call.method)
            self._finish(call, "completed")
        except Exception:
            log.exception("fake twilio: call %s failed", call.sid)
        finally:
            call.outbox.put_nowait(None)

    async def _answer(self, call: _Call, script: CalleeScript) -> None:
        """The callee picks up; with machine detection, wait until Twilio knows who it is."""
        call.status = "in-progress"
        call.start_time = datetime.now(UTC)
        greeting = self.controls.greeting_ms if script.greeting_ms is None else script.greeting_ms
        call.listener = Listener(kind=script.kind, greeting_ends=time.monotonic() + greeting / 1000)
        self._status_callback(call, "answered", "in-progress")
        if call.machine_detection:
            after, answered_by = self._detection(call, script)
            if not await self._hung_up_within(call, after):
                call.answered_by = answered_by

    def _detection(self, call: _Call, script: CalleeScript) -> tuple[float, str]:
        """(seconds after the answer, AnsweredBy) of Twilio's machine detection for this callee."""
        detect = (self.controls.detection_ms if script.detection_ms is None else script.detection_ms) / 1000
        if script.behaviour == "machine" and call.machine_detection == "DetectMessageEnd":
            at = max(0.0, call.listener.greeting_ends - time.monotonic())
            answered_by = f"machine_end_{script.greeting_end}"
        else:
            at, answered_by = detect, {"machine": "machine_start", "fax": "fax"}.get(script.behaviour, "human")
        timeout = self.seconds(call.detection_timeout)
        return (timeout, "unknown") if at > timeout else (at, answered_by)

    def _finish(self, call: _Call, status: str) -> None:
        call.status = status
        call.end_time = datetime.now(UTC)
        extra = {}
        if call.start_time is not None:
            extra["CallDuration"] = str(max(0, int((call.end_time - call.start_time).total_seconds())))
        self._status_callback(call, "completed", status, extra)

    async def _say(self, call: _Call, text: str) -> None:
        """`text` spoken into the call for `speak_ms` (less if the call ends meanwhile)."""
        call.heard.append(text)
        start = time.monotonic()
        await self._hung_up_within(call, self.controls.speak_ms / 1000)
        call.listener.take(text, start, time.monotonic())

    async def _follow(self, call: _Call, url: str, script: CalleeScript, extra: dict[str, str], depth: int = 0,
                      *, kind: str = "url", method: str = "POST") -> None:
        """Fetch TwiML from `url` and act it out (Say → heard, Gather → digits, Hangup → end)."""
        if depth > 10 or call.hang_up.is_set():
            return
        params = {**self._call_params(call), **extra}
        if call.answered_by:
            params["AnsweredBy"] = call.answered_by
        root = await self._twiml(call, _Hook(kind, url, params, method, frozenset({kind})))
        if root is None:
            return
        for verb in root:
            if call.hang_up.is_set() or verb.tag == "Hangup":
                return
            if verb.tag == "Say":
                await self._say(call, verb.text or "")
            elif verb.tag == "Gather":
                for inner in verb:
                    if inner.tag == "Say" and not call.hang_up.is_set():
                        await self._say(call, inner.text or "")
                keys = script.press(call.gathers) if call.listener.kind == "person" else None
                call.gathers += 1
                if keys and not call.hang_up.is_set():
                    call.digits.append(keys)
                    await self._follow(call, verb.get("action") or url, script, {"Digits": keys}, depth + 1,
                                       kind="action", method=_method(verb.get("method")))
                    return
            elif verb.tag == "Pause":  # silence; the callee may hang up meanwhile
                await self._hung_up_within(call, _pause_seconds(verb.get("length")))
            elif verb.tag == "Redirect" and verb.text:
                await self._follow(call, verb.text.strip(), script, {}, depth + 1, kind="redirect",
                                   method=_method(verb.get("method")))
                return

    async def _twiml(self, call: _Call, hook: _Hook) -> ET.Element | None:
        """The TwiML at `hook`; when it fails, the call's FallbackUrl's (for `Url` only)."""
        result = await self._request(call, hook)
        root, code = _twiml_root(result)
        status = None if result.response is None else result.response.status_code
        if status is not None and 200 <= status < 300:
            call.twiml.append(result.response.text)  # type: ignore[union-attr]
        if root is not None:
            return root
        call.twiml.append("<unparsable>" if code == DOCUMENT_PARSE_FAILURE else f"<error {status}>")
        error_url = hook.url.partition("#")[0]
        call.errors.append({"code": code, "kind": hook.kind, "url": error_url, "status": status})
        if hook.kind != "url" or not call.fallback_url:
            return None
        params = {**hook.params, "ErrorCode": str(code), "ErrorUrl": error_url}
        return await self._twiml(call, _Hook("fallback", call.fallback_url, params, call.fallback_method,
                                             frozenset({"fallback"})))

    # -- webhooks --------------------------------------------------------------------------------

    def _call_params(self, call: _Call) -> dict[str, str]:
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": call.sid,
            "CallStatus": call.status,
            "Direction": call.direction,
            "From": call.from_,
            "To": call.to,
            "Called": call.to,
            "Caller": call.from_,
            **({"StirVerstat": call.stir_verstat} if call.stir_verstat else {}),
        }

    def _status_callback(self, call: _Call, event: str, status: str, extra: dict[str, str] | None = None) -> None:
        """Queue a status callback for the call's sender (in order, unless a fault says otherwise)."""
        if not call.status_callback or event not in call.events:
            return
        params = self._call_params(call)
        params.update(
            CallStatus=status,
            SequenceNumber=str(call.sequence),
            CallbackSource="call-progress-events",
            Timestamp=format_datetime(datetime.now(UTC), usegmt=True),
            **(extra or {}),
        )
        call.sequence += 1
        tags = frozenset({"status", status, *(["final"] if status in FINAL_CALL_STATES else [])})
        call.outbox.put_nowait(_Hook("status", call.status_callback, params, call.status_callback_method, tags))

    async def _send_status(self, call: _Call) -> None:
        """The call's status callbacks, one after the other; lost, late or twice as the faults say."""
        while (hook := await call.outbox.get()) is not None:
            if self.fault_lost(hook.tags):
                self._delivery(call.deliveries, type=hook.name, id=hook.token, attempt=0, url=hook.url,
                               status=None, result="lost")
                continue
            delay = self.fault_delay(hook.tags)
            if delay > 0:
                self._spawn(self._later(delay, lambda h=hook: self._deliver_status(call, h)), f"late-{call.sid}")
            else:
                await self._deliver_status(call, hook)

    async def _deliver_status(self, call: _Call, hook: _Hook, redelivery: bool = False) -> None:
        await self._request(call, hook, redelivery=redelivery)
        again = None if redelivery else self.fault_redelivery(hook.tags)
        if again is not None:
            self._spawn(self._later(again, lambda: self._deliver_status(call, hook, True)), f"again-{call.sid}")

    def sign(self, url: str, params: dict[str, str]) -> str:
        return self._signer.compute_signature(url, params)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            transport = self._webhook_transport or webhook_transport()
            self._http = httpx.AsyncClient(transport=transport, timeout=None)
        return self._http

    async def _request(self, call: _Call | None, hook: _Hook, *, redelivery: bool = False) -> _Result:
        """`hook`'s request as Twilio makes it: signed over the URL without its fragment; each try
        bounded by the read timeout (`rt`), retried as `rc`/`rp` say within the total time (`tt`)."""
        url, rules = _overrides(hook.url, hook.kind == "status", min(15_000.0, self._webhook_timeout * 1000))
        target, data = url, hook.params
        if hook.method == "GET":
            target, data = url + ("&" if urlsplit(url).query else "?") + urlencode(hook.params), {}
        headers = {"X-Twilio-Signature": self.sign(target, data), "User-Agent": "TwilioProxy/1.1",
                   "I-Twilio-Idempotency-Token": hook.token}
        deadline = time.monotonic() + self.seconds(rules.tt / 1000)
        result = _Result(None, "rt", HTTP_CONNECTION_FAILURE)
        for attempt in range(1, rules.rc + 2):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            result = await self._try(hook, target, data, headers, min(left, self.seconds(rules.rt / 1000)),
                                     self.seconds(rules.ct / 1000))
            self._delivery(None if call is None else call.deliveries, type=hook.name, id=hook.token, attempt=attempt,
                           url=target, status=None if result.response is None else result.response.status_code,
                           result=result.failure or "answered", redelivery=redelivery)
            if result.failure is None or not ({result.failure, "all"} & rules.rp):
                break
            log.info("fake twilio: webhook %s failed (%s), try %d", urlsplit(url).path, result.failure, attempt)
        return result

    async def _try(self, hook: _Hook, target: str, data: dict[str, str], headers: dict[str, str],
                   timeout: float, connect: float) -> _Result:
        slow = self.fault_slow(hook.tags)

        async def exchange() -> httpx.Response:
            response = await self._client().request(
                hook.method, target, data=data or None, headers=headers,
                timeout=httpx.Timeout(timeout + 1, connect=max(0.001, connect)))
            if slow:
                await asyncio.sleep(slow)  # the receiver did the work; its answer is late
            return response

        try:
            async with asyncio.timeout(max(0.001, timeout)):
                response = await exchange()
        except (TimeoutError, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
            return _Result(None, "rt", HTTP_CONNECTION_FAILURE)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            return _Result(None, "ct", HTTP_CONNECTION_FAILURE)
        except Exception:  # noqa: BLE001 - whatever broke the exchange, Twilio got no answer
            return _Result(None, "conn", HTTP_RETRIEVAL_FAILURE)
        if response.status_code >= 400:
            return _Result(response, "4xx" if response.status_code < 500 else "5xx", HTTP_RETRIEVAL_FAILURE)
        return _Result(response)

    # -- incoming calls (a customer calls the account's number) ----------------------------------

    def ring_service(self, *, from_: str, to: str, url: str, attestation: str | None = None,
                     digits: str | list[str] | None = None) -> _Call:
        """A person at `from_` calls `to` (the account's number, whose voice URL is `url`), with the
        STIR/SHAKEN `attestation` (A, B, C, failed, none) and pressing `digits` when asked."""
        call = _Call(sid="CA" + f"{self._rng.getrandbits(128):032x}", to=to, from_=from_, url=url,
                     status_callback=None, events=set(), machine_detection=None, date_created=datetime.now(UTC),
                     direction="inbound", stir_verstat=STIR_VERSTAT.get((attestation or "none").upper()))
        self.calls[call.sid] = call
        self._spawn(self._run_incoming(call, CalleeScript(digits=digits)), f"fake-incoming-{call.sid}")
        return call

    async def _run_incoming(self, call: _Call, script: CalleeScript) -> None:
        try:
            call.status = "in-progress"  # Twilio asks the voice URL as the call arrives
            call.start_time = datetime.now(UTC)
            call.listener = Listener(kind="person", greeting_ends=time.monotonic())
            await self._follow(call, call.url, script, {}, kind="url", method=call.method)
            call.status, call.end_time = "completed", datetime.now(UTC)
        except Exception:
            log.exception("fake twilio: incoming call %s failed", call.sid)

    async def _incoming(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
            assert isinstance(body, dict)
            to, url, attestation = body.get("to"), body.get("url"), body.get("attestation")
            assert isinstance(to, str) and E164.fullmatch(to), "to: the account's number, E.164"
            assert isinstance(url, str) and url.startswith(("http://", "https://")), "url: the number's voice URL"
            assert attestation is None or str(attestation).upper() in STIR_VERSTAT or attestation == "none", \
                f"attestation: one of {sorted(STIR_VERSTAT)} or none"
            call = self.ring_service(from_=str(body.get("from") or "anonymous"), to=to, url=url,
                                     attestation=attestation, digits=body.get("digits"))
        except (ValueError, AssertionError) as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        return JSONResponse({"sid": call.sid}, status_code=201)

    # -- the REST API ----------------------------------------------------------------------------

    def _authorised(self, request: Request, account: str) -> bool:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return account == self.account_sid and request.headers.get("Authorization") == f"Basic {expected}"

    @staticmethod
    def _error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
                             "status": status}, status_code=status, headers=headers)

    def _new_call(self, form: FormData, placed_by: str | None) -> _Call | JSONResponse:
        """The call a create's form asks for, or the 400 it gets."""
        to, from_, url, fallback = form.get("To"), form.get("From"), form.get("Url"), form.get("FallbackUrl")
        if not isinstance(to, str) or not E164.fullmatch(to):
            return self._error(400, 21211, "Invalid 'To' Phone Number")
        if not isinstance(from_, str) or not E164.fullmatch(from_):
            return self._error(400, 21212, "Invalid 'From' Phone Number")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return self._error(400, 21205, "Url is not a valid URL")
        if fallback and not (isinstance(fallback, str) and fallback.startswith(("http://", "https://"))):
            return self._error(400, 21205, "FallbackUrl is not a valid URL")
        callback = form.get("StatusCallback")
        events = {e for value in form.getlist("StatusCallbackEvent") for e in str(value).split()}
        detection = form.get("MachineDetection")
        return _Call(
            sid="CA" + f"{self._rng.getrandbits(128):032x}", to=to, from_=from_, url=url,
            status_callback=callback if isinstance(callback, str) and callback else None,
            events=events or {"completed"},
            machine_detection=detection if detection in ("Enable", "DetectMessageEnd") else None,
            date_created=datetime.now(UTC), placed_by=placed_by, method=_method(form.get("Method")),
            status_callback_method=_method(form.get("StatusCallbackMethod")),
            fallback_url=fallback if isinstance(fallback, str) and fallback else None,
            fallback_method=_method(form.get("FallbackMethod")),
            timeout=_number(form.get("Timeout"), 60.0, 1.0, 600.0),
            detection_timeout=_number(form.get("MachineDetectionTimeout"), 30.0, 3.0, 59.0),
        )

    async def _create(self, request: Request) -> Any:
        entry: dict[str, Any] = {"received_at": time.time(), "status": None, "sid": None,
                                 "placed_by": _placed_by(request)}
        self.requests.append(entry)

        def done(response: JSONResponse, sid: str | None = None) -> JSONResponse:
            entry["status"], entry["sid"] = response.status_code, sid
            return response

        if not self._authorised(request, request.path_params["account"]):
            return done(self._error(401, 20003, "Authenticate"))
        form = await _form(request)
        entry["to"] = form.get("To")
        await self._turn()
        call = self._new_call(form, entry["placed_by"])
        if isinstance(call, JSONResponse):
            return done(call)
        if self.controls.reject_rate and self._rng.random() < self.controls.reject_rate:
            return done(self._error(429, 20429, "Too Many Requests", {"Retry-After": "1"}))
        self.calls[call.sid] = call
        self._ensure_dialer().put_nowait(call)
        if self.controls.fail_after_create_rate and self._rng.random() < self.controls.fail_after_create_rate:
            response = done(self._error(500, 20500, "Internal Server Error"), call.sid)
        else:
            response = done(JSONResponse(call.resource(self.account_sid), status_code=201), call.sid)
        lost = self.answer_lost("create")
        entry["answer_lost"] = lost
        call.command_log.append({"action": "create", "at": time.time(), "result": "executed",
                                 "answer": response.status_code, "answer_lost": lost})
        return await self.answered(lost, response)

    async def _list(self, request: Request) -> JSONResponse:
        if not self._authorised(request, request.path_params["account"]):
            return self._error(401, 20003, "Authenticate")
        await self._turn()
        to, status = request.query_params.get("To"), request.query_params.get("Status")
        found = [c.resource(self.account_sid) for c in self.calls.values()
                 if (to is None or c.to == to) and (status is None or c.status == status)]
        found.sort(key=lambda c: c["date_created"], reverse=True)
        return JSONResponse({"calls": found, "page": 0, "page_size": len(found), "next_page_uri": None})

    async def _call(self, request: Request) -> Any:
        if not self._authorised(request, request.path_params["account"]):
            return self._error(401, 20003, "Authenticate")
        call = self.calls.get(request.path_params["sid"])
        if call is None:
            return self._error(404, 20404, "The requested resource was not found")
        await self._turn()
        if request.method != "POST":
            return JSONResponse(call.resource(self.account_sid))
        wanted = (await _form(request)).get("Status")
        if wanted not in ("canceled", "completed"):
            return self._error(400, 21220, "Invalid call state")
        before = call.status
        if wanted == "canceled" and call.status in PRE_ANSWER_STATES:
            call.status = "canceled"
            call.end_time = datetime.now(UTC)
            call.hang_up.set()
        elif wanted == "completed" and call.status not in FINAL_CALL_STATES:
            if call.status != "in-progress":
                call.status = "canceled"
            call.hang_up.set()  # in progress: the TwiML being followed stops; _run_call reports completed
        lost = self.answer_lost("update")
        call.command_log.append({"action": "update", "status": wanted, "before": before, "at": time.time(),
                                 "result": "executed", "answer": 200, "answer_lost": lost})
        return await self.answered(lost, JSONResponse(call.resource(self.account_sid)))

    async def _account(self, request: Request) -> JSONResponse:
        """The Account resource, as Twilio answers it (its auth token included)."""
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {expected}":
            return self._error(401, 20003, "Authenticate")
        if request.path_params["account"] != self.account_sid:
            return self._error(404, 20404, "The requested resource was not found")
        await self._turn()
        sid = self.account_sid
        return JSONResponse({
            "sid": sid, "owner_account_sid": sid, "friendly_name": "Fake account", "status": "active",
            "type": "Full", "auth_token": self.auth_token, "date_created": "Thu, 01 Jan 2026 00:00:00 +0000",
            "date_updated": "Thu, 01 Jan 2026 00:00:00 +0000", "uri": f"/2010-04-01/Accounts/{sid}.json",
        })

    # -- inspection and control ------------------------------------------------------------------

    async def _inspect_calls(self, request: Request) -> JSONResponse:
        return JSONResponse({"calls": [c.inspect(self.account_sid) for c in self.calls.values()]})

    async def _reset(self, request: Request) -> JSONResponse:
        self._reset_controls()
        for call in self.calls.values():
            call.hang_up.set()
            if call.status in PRE_ANSWER_STATES:
                call.status = "canceled"
        self.calls = {}
        return JSONResponse({"reset": True})

    async def aclose(self) -> None:
        """Stop the dialer and the calls in progress (tests that run the fake in-process)."""
        await self._cancel_tasks(self._dialer)
        if self._http is not None:
            await self._http.aclose()

    def _build_app(self) -> Starlette:
        base = "/2010-04-01/Accounts/{account}"
        routes = [
            Route(base + ".json", self._account, methods=["GET"]),
            Route(base + "/Calls.json", self._create, methods=["POST"]),
            Route(base + "/Calls.json", self._list, methods=["GET"]),
            Route(base + "/Calls/{sid}.json", self._call, methods=["GET", "POST"]),
        ]
        # The REST API under a path prefix of one or two segments too (SignalWire's /api/laml; the
        # harness gives each replica its own, recorded as `placed_by`).
        routes += [Route(prefix + r.path, r.endpoint, methods=list(r.methods or []))
                   for prefix in ("/{prefix}", "/{prefix}/{prefix2}") for r in list(routes)]
        incoming = [Route("/_fake/incoming", self._incoming, methods=["POST"])]
        return Starlette(routes=routes + self._control_routes() + incoming)


def main(argv: list[str] | None = None) -> None:
    """`python -m reminders_fakes.twilio --port P [--latency-ms N] [--cps F] [--ring-ms N]`."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--cps", type=float, default=1.0, help="calls per second leaving the queue")
    parser.add_argument("--ring-ms", type=float, default=200.0)
    parser.add_argument("--account-sid", default="AC" + "0" * 32)
    parser.add_argument("--auth-token", default="fake-auth-token")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s fake-twilio: %(message)s")
    fake = FakeTwilio(account_sid=args.account_sid, auth_token=args.auth_token, latency_ms=args.latency_ms,
                      calls_per_second=args.cps, ring_ms=args.ring_ms)
    uvicorn.run(fake.app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
