"""A Twilio-shaped fake: the Calls REST API and the webhooks, as Twilio behaves (not like `generic`).

- `POST /2010-04-01/Accounts/{sid}/Calls.json` (HTTP Basic, form `To`, `From`, `Url`,
  `StatusCallback`, repeated `StatusCallbackEvent`, optional `MachineDetection`): 201 JSON with
  `sid`, status `queued`. No idempotency: the same request twice is two calls. Optional injected
  429 (error 20429, nothing created) and 500 *after* creating the call (the create in doubt).
- Calls leave the queue at `calls_per_second` (queued calls wait, like Twilio's CPS queue), ring,
  and then the scripted callee of the number acts: `answer` (a person), `machine`, `no-answer`,
  `busy`, optionally pressing `digits`. On answer the fake POSTs the signed voice request to
  `Url` and follows the TwiML (`<Say>` is logged as heard, `<Gather>` gets the digits,
  `<Hangup/>` ends the call). Status callbacks (signed, with `SequenceNumber`) go to
  `StatusCallback` for the subscribed events. Webhooks are signed over the exact URL given.
- `GET /2010-04-01/Accounts/{sid}.json` reads the account (what `reminders check` asks): 401
  (20003) for wrong credentials, 404 (20404) for another account's sid.
- `GET Calls.json?To=&Status=` lists, `GET Calls/{sid}.json` reads, `POST Calls/{sid}.json`
  with `Status=canceled` cancels a queued or ringing call (no effect later), `Status=completed`
  ends one in progress.
- Inspection and control (not Twilio's): `GET /_fake/calls` (every call with what it heard),
  `GET /_fake/requests`, `POST /_fake/callees` ({number: script}), `POST /_fake/control`,
  `POST /_fake/reset`.

`FakeTwilio(...).app` is a Starlette app: serve it (`python -m reminders_fakes.twilio`) or hand it
to httpx as a transport (`httpx.ASGITransport(fake.app)`) in unit tests; `webhook_transport`
routes the webhooks (e.g. to the service's ASGI app) instead of the network.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import random
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from reminders_fakes.controls import CalleeScript, ControlledFake
from service.privacy import E164
from service.reminders.outcomes import FINAL_CALL_STATES, PRE_ANSWER_STATES

__all__ = ["CalleeScript", "FakeTwilio", "main"]

log = logging.getLogger(__name__)



@dataclass
class _Controls:
    latency_ms: float = 0.0  # per REST request
    calls_per_second: float = 1.0  # the account's CPS: the queue drains at this rate (0: no queue)
    ring_ms: float = 200.0
    reject_rate: float = 0.0  # 429 before anything is created
    fail_after_create_rate: float = 0.0  # the call is created, the answer is a 500
    hang: bool = False  # hold REST requests until released


@dataclass
class _Call:
    sid: str
    to: str
    from_: str
    url: str
    status_callback: str | None
    events: set[str]
    machine_detection: bool
    date_created: datetime
    status: str = "queued"
    sequence: int = 0
    heard: list[str] = field(default_factory=list)
    twiml: list[str] = field(default_factory=list)
    answered_by: str | None = None
    digits: list[str] = field(default_factory=list)
    gathers: int = 0
    hang_up: asyncio.Event = field(default_factory=asyncio.Event)
    start_time: datetime | None = None
    end_time: datetime | None = None
    placed_by: str | None = None

    def resource(self, account_sid: str) -> dict[str, Any]:
        return {
            "sid": self.sid,
            "account_sid": account_sid,
            "to": self.to,
            "from": self.from_,
            "status": self.status,
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "date_created": format_datetime(self.date_created, usegmt=True),
            "start_time": format_datetime(self.start_time, usegmt=True) if self.start_time else None,
            "end_time": format_datetime(self.end_time, usegmt=True) if self.end_time else None,
            "answered_by": self.answered_by,
            "uri": f"/2010-04-01/Accounts/{account_sid}/Calls/{self.sid}.json",
        }

    def inspect(self, account_sid: str) -> dict[str, Any]:
        query = dict(parse_qsl(urlsplit(self.url).query))
        return {**self.resource(account_sid), "url": self.url, "stamp": query, "placed_by": self.placed_by,
                "heard": list(self.heard),
                "twiml": list(self.twiml), "digits": list(self.digits)}


def _placed_by(request: Request) -> str | None:
    """The path prefix the REST request came under (None without one)."""
    parts = [request.path_params.get(name) for name in ("prefix", "prefix2")]
    return "/".join(p for p in parts if p) or None


async def _form(request: Request) -> FormData:
    """An urlencoded body (all Twilio's API takes), without a multipart parser."""
    return FormData(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))


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
        super().__init__(_Controls(latency_ms=latency_ms, calls_per_second=calls_per_second, ring_ms=ring_ms))
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.calls: dict[str, _Call] = {}
        self._signer = RequestValidator(auth_token)
        self._rng = random.Random(seed)
        self._queue: asyncio.Queue[_Call] | None = None
        self._dialer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
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
            task = asyncio.get_running_loop().create_task(self._run_call(call), name=f"fake-call-{call.sid}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_call(self, call: _Call) -> None:
        try:
            call.status = "initiated"
            await self._status_callback(call, "initiated", "initiated")
            if call.status == "canceled":
                return
            call.status = "ringing"
            await self._status_callback(call, "ringing", "ringing")
            try:
                await asyncio.wait_for(call.hang_up.wait(), self.controls.ring_ms / 1000)
            except TimeoutError:
                pass
            if call.status == "canceled":
                await self._status_callback(call, "completed", "canceled")
                return
            script = self.callees.get(call.to, CalleeScript())
            if script.behaviour in ("no-answer", "busy"):
                await self._finish(call, script.behaviour)
                return
            call.status = "in-progress"
            call.start_time = datetime.now(UTC)
            if call.machine_detection:
                call.answered_by = "machine_start" if script.behaviour == "machine" else "human"
            await self._status_callback(call, "answered", "in-progress")
            await self._follow(call, call.url, script, {})
            await self._finish(call, "completed")
        except Exception:
            log.exception("fake twilio: call %s failed", call.sid)

    async def _finish(self, call: _Call, status: str) -> None:
        call.status = status
        call.end_time = datetime.now(UTC)
        extra = {}
        if call.start_time is not None:
            extra["CallDuration"] = str(max(0, int((call.end_time - call.start_time).total_seconds())))
        await self._status_callback(call, "completed", status, extra)

    async def _follow(self, call: _Call, url: str, script: CalleeScript, extra: dict[str, str], depth: int = 0) -> None:
        """Fetch TwiML from `url` and act it out (Say → heard, Gather → digits, Hangup → end)."""
        if depth > 5 or call.hang_up.is_set():
            return
        params = {**self._call_params(call), **extra}
        if call.answered_by:
            params["AnsweredBy"] = call.answered_by
        response = await self._post_webhook(url, params, tries=3)
        if response is None or response.status_code != 200:
            call.twiml.append(f"<error {None if response is None else response.status_code}>")
            return
        call.twiml.append(response.text)
        try:
            root = ET.fromstring(response.text)
        except ET.ParseError:
            call.twiml.append("<unparsable>")
            return
        for verb in root:
            if call.hang_up.is_set() or verb.tag == "Hangup":
                return
            if verb.tag == "Say":
                call.heard.append(verb.text or "")
            elif verb.tag == "Pause":
                continue
            elif verb.tag == "Gather":
                for inner in verb:
                    if inner.tag == "Say":
                        call.heard.append(inner.text or "")
                keys = script.press(call.gathers)
                call.gathers += 1
                if keys:
                    call.digits.append(keys)
                    action = verb.get("action") or url
                    await self._follow(call, action, script, {"Digits": keys}, depth + 1)
                    return
            elif verb.tag == "Redirect" and verb.text:
                await self._follow(call, verb.text.strip(), script, {}, depth + 1)
                return

    # -- webhooks --------------------------------------------------------------------------------

    def _call_params(self, call: _Call) -> dict[str, str]:
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": call.sid,
            "CallStatus": call.status,
            "Direction": "outbound-api",
            "From": call.from_,
            "To": call.to,
            "Called": call.to,
            "Caller": call.from_,
        }

    async def _status_callback(self, call: _Call, event: str, status: str, extra: dict[str, str] | None = None) -> None:
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
        await self._post_webhook(call.status_callback, params, tries=2)

    def sign(self, url: str, params: dict[str, str]) -> str:
        return self._signer.compute_signature(url, params)

    async def _post_webhook(self, url: str, params: dict[str, str], *, tries: int) -> httpx.Response | None:
        if self._http is None:
            transport = self._webhook_transport or httpx.AsyncHTTPTransport()
            self._http = httpx.AsyncClient(transport=transport, timeout=self._webhook_timeout)
        headers = {"X-Twilio-Signature": self.sign(url, params), "User-Agent": "TwilioProxy/1.1"}
        response: httpx.Response | None = None
        for attempt in range(tries):
            try:
                response = await self._http.post(url, data=params, headers=headers)
            except httpx.HTTPError as error:
                log.info("fake twilio: webhook %s failed (%s), try %d", urlsplit(url).path, type(error).__name__,
                         attempt + 1)
            else:
                if response.status_code < 500:
                    return response
                log.info("fake twilio: webhook %s answered %d, try %d", urlsplit(url).path, response.status_code,
                         attempt + 1)
            await asyncio.sleep(0.2 * (attempt + 1))
        return response

    # -- the REST API ----------------------------------------------------------------------------

    def _authorised(self, request: Request, account: str) -> bool:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return account == self.account_sid and request.headers.get("Authorization") == f"Basic {expected}"

    @staticmethod
    def _error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
                             "status": status}, status_code=status, headers=headers)

    async def _create(self, request: Request) -> JSONResponse:
        entry: dict[str, Any] = {"received_at": time.time(), "status": None, "sid": None,
                                 "placed_by": _placed_by(request)}
        self.requests.append(entry)

        def done(response: JSONResponse, sid: str | None = None) -> JSONResponse:
            entry["status"], entry["sid"] = response.status_code, sid
            return response

        if not self._authorised(request, request.path_params["account"]):
            return done(self._error(401, 20003, "Authenticate"))
        form = await _form(request)
        to, from_, url = form.get("To"), form.get("From"), form.get("Url")
        entry["to"] = to
        await self._turn()
        if not isinstance(to, str) or not E164.fullmatch(to):
            return done(self._error(400, 21211, "Invalid 'To' Phone Number"))
        if not isinstance(from_, str) or not E164.fullmatch(from_):
            return done(self._error(400, 21212, "Invalid 'From' Phone Number"))
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return done(self._error(400, 21205, "Url is not a valid URL"))
        if self.controls.reject_rate and self._rng.random() < self.controls.reject_rate:
            return done(self._error(429, 20429, "Too Many Requests", {"Retry-After": "1"}))
        callback = form.get("StatusCallback")
        call = _Call(
            sid="CA" + f"{self._rng.getrandbits(128):032x}",
            to=to,
            from_=from_,
            url=url,
            status_callback=callback if isinstance(callback, str) and callback else None,
            events={str(e) for e in form.getlist("StatusCallbackEvent")} or {"completed"},
            machine_detection=form.get("MachineDetection") in ("Enable", "DetectMessageEnd"),
            date_created=datetime.now(UTC),
            placed_by=entry["placed_by"],
        )
        self.calls[call.sid] = call
        self._ensure_dialer().put_nowait(call)
        if self.controls.fail_after_create_rate and self._rng.random() < self.controls.fail_after_create_rate:
            return done(self._error(500, 20500, "Internal Server Error"), call.sid)
        return done(JSONResponse(call.resource(self.account_sid), status_code=201), call.sid)

    async def _list(self, request: Request) -> JSONResponse:
        if not self._authorised(request, request.path_params["account"]):
            return self._error(401, 20003, "Authenticate")
        await self._turn()
        to, status = request.query_params.get("To"), request.query_params.get("Status")
        found = [c.resource(self.account_sid) for c in self.calls.values()
                 if (to is None or c.to == to) and (status is None or c.status == status)]
        found.sort(key=lambda c: c["date_created"], reverse=True)
        return JSONResponse({"calls": found, "page": 0, "page_size": len(found), "next_page_uri": None})

    async def _call(self, request: Request) -> JSONResponse:
        if not self._authorised(request, request.path_params["account"]):
            return self._error(401, 20003, "Authenticate")
        call = self.calls.get(request.path_params["sid"])
        if call is None:
            return self._error(404, 20404, "The requested resource was not found")
        await self._turn()
        if request.method == "POST":
            wanted = (await _form(request)).get("Status")
            if wanted == "canceled" and call.status in PRE_ANSWER_STATES:
                call.status = "canceled"
                call.end_time = datetime.now(UTC)
                call.hang_up.set()
            elif wanted == "completed" and call.status not in FINAL_CALL_STATES:
                if call.status == "in-progress":
                    call.hang_up.set()  # the TwiML being followed stops; _run_call reports completed
                else:
                    call.status = "canceled"
                    call.hang_up.set()
            elif wanted not in ("canceled", "completed"):
                return self._error(400, 21220, "Invalid call state")
        return JSONResponse(call.resource(self.account_sid))

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
        tasks = [t for t in (self._dialer, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
        return Starlette(routes=routes + self._control_routes())


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
