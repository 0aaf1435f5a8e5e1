"""What the real-provider fakes (Twilio, Telnyx) share: the people they call (`CalleeScript`),
who takes a call's words in (`Listener`), the knobs a test turns (latency, hang, the faults of
`FaultControls`…), and the `/_fake/*` routes that inspect and turn them.

Each fake keeps its own REST API, its calls and its own controls dataclass (a `FaultControls` with
at least `latency_ms` and `hang`); `ControlledFake` is the base class that owns the rest.

Faults (`FaultControls`, all off by default) name the events they hit by tags: Telnyx, the
`event_type` (`call.hangup` is also `final`); Twilio, a status callback is `status` and its
`CallStatus` (a final one also `final`), the TwiML requests `url`, `fallback`, `action`,
`redirect`. A fault's `*_types` list selects by any tag; empty: every event.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "ANSWER_LOST_MODES",
    "BEHAVIOURS",
    "GREETING_ENDS",
    "HANGUP_CAUSES",
    "CalleeScript",
    "ControlledFake",
    "FaultControls",
    "Listener",
    "split_speech",
    "webhook_transport",
]

# answer: a person; machine: an answering machine (a greeting, then it records); fax: a fax
# machine (takes no words); no-answer, busy, reject: the call is never answered
BEHAVIOURS = ("answer", "machine", "no-answer", "busy", "reject", "fax")
# how a machine's greeting ends: Twilio's machine_end_beep / _silence / _other
GREETING_ENDS = ("beep", "silence", "other")
# Telnyx's `hangup_cause` values (a script may give the cause of an unanswered end)
HANGUP_CAUSES = ("call_rejected", "normal_clearing", "originator_cancel", "timeout", "time_limit", "user_busy",
                 "not_found", "no_answer", "unspecified")
# `alternate`: stall, drop, stall, … in the order the answers are lost (both, however fast the burst)
ANSWER_LOST_MODES = ("stall", "drop", "alternate")


@dataclass
class CalleeScript:
    """What the person (or machine) at a number does when called. The optional fields left None
    take the fake's control of the same name."""

    behaviour: str = "answer"
    # pressed when the call asks for keys (a person only): a string at every ask; a list, the n-th
    # entry at the n-th ask ("" or past its end: nothing pressed, the ask times out)
    digits: str | list[str] | None = None
    ring_ms: float | None = None  # how long it rings before the callee acts
    greeting_ms: float | None = None  # a machine: its greeting's length, from the answer to its end
    greeting_end: str = "beep"  # a machine: how the greeting ends (beep, silence, other)
    detection_ms: float | None = None  # how long the provider's machine detection needs for this answerer
    hangup_cause: str | None = None  # Telnyx: the cause of an unanswered end (no-answer: timeout)

    def __post_init__(self) -> None:
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour must be one of {BEHAVIOURS}")
        if self.digits is not None and not isinstance(self.digits, str | list):
            raise ValueError("digits must be a string or a list of strings")
        if self.greeting_end not in GREETING_ENDS:
            raise ValueError(f"greeting_end must be one of {GREETING_ENDS}")
        if self.hangup_cause is not None and self.hangup_cause not in HANGUP_CAUSES:
            raise ValueError(f"hangup_cause must be one of {HANGUP_CAUSES}")
        for name in ("ring_ms", "greeting_ms", "detection_ms"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise ValueError(f"{name} must be a number of milliseconds")

    def press(self, gather: int) -> str | None:
        """The keys pressed at the `gather`-th ask of a call (0-based), if any."""
        if isinstance(self.digits, list):
            keys = self.digits[gather] if gather < len(self.digits) else None
        else:
            keys = self.digits
        return keys or None

    @property
    def answers(self) -> bool:
        return self.behaviour in ("answer", "machine", "fax")

    @property
    def kind(self) -> str:
        """Who takes the call's words in: person, machine or fax."""
        return {"machine": "machine", "fax": "fax"}.get(self.behaviour, "person")


def split_speech(text: str, start: float, end: float, greeting_ends: float) -> tuple[str, str]:
    """(lost, kept) of `text`, spoken from `start` to `end` to a machine whose greeting ends at
    `greeting_ends` (the same clock): words said over the greeting are lost, words after it are
    recorded; a speech across the beep loses its first words in proportion."""
    if start >= greeting_ends:
        return "", text
    if end <= greeting_ends:
        return text, ""
    words = text.split()
    lost = round(len(words) * (greeting_ends - start) / (end - start))
    return " ".join(words[:lost]), " ".join(words[lost:])


@dataclass
class Listener:
    """Who takes a call's words in: a person hears each message (`person_heard`); an answering
    machine records what is said after its greeting (`voicemail`) and loses what is said over it
    (`lost`); a fax machine takes nothing."""

    kind: str = "person"
    greeting_ends: float = 0.0  # time.monotonic() when a machine's greeting ends (its beep)
    person_heard: list[str] = field(default_factory=list)
    voicemail: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def take(self, text: str, start: float, end: float) -> None:
        """`text` was spoken into the call from `start` to `end` (time.monotonic())."""
        if self.kind == "person":
            self.person_heard.append(text)
        elif self.kind == "machine":
            lost, kept = split_speech(text, start, end, self.greeting_ends)
            self.lost += [lost] if lost else []
            self.voicemail += [kept] if kept else []

    def inspect(self) -> dict[str, Any]:
        return {"answered_by_kind": self.kind, "person_heard": list(self.person_heard),
                "voicemail": list(self.voicemail), "lost": list(self.lost)}


@dataclass
class FaultControls:
    """The provider's clock and the faults both real-provider fakes inject, all off by default."""

    time_scale: float = 1.0  # multiplies the provider's documented durations (timeouts, windows); 1: real time
    event_delay_ms: float = 0.0  # an event hit is sent this late; later events overtake it
    event_delay_max_ms: float = 0.0  # above event_delay_ms: the delay is drawn from [event_delay_ms, this]
    event_delay_rate: float = 1.0  # the share of the selected events delayed, once a delay is set
    event_delay_types: list[str] = field(default_factory=list)
    event_loss_rate: float = 0.0  # an event hit is never sent, though the receiver would have answered
    event_loss_types: list[str] = field(default_factory=list)
    event_redeliver_rate: float = 0.0  # an event hit is delivered again event_redeliver_ms later, acknowledged or not
    event_redeliver_ms: float = 60_000.0
    event_redeliver_types: list[str] = field(default_factory=list)
    # the receiver's answer comes this much later (it did the work); the provider's timeout applies
    slow_receiver_ms: float = 0.0
    slow_receiver_rate: float = 1.0
    slow_receiver_types: list[str] = field(default_factory=list)
    answer_lost_rate: float = 0.0  # a command is executed, and its HTTP answer never arrives
    answer_lost_commands: list[str] = field(default_factory=list)  # Twilio: create, update; Telnyx: dial, speak, …
    # stall: answered after answer_stall_ms; drop: the connection is closed; alternate: one, then the other
    answer_lost_mode: str = "stall"
    answer_stall_ms: float = 30_000.0


def _coerce(current: Any, value: Any) -> Any:
    """`value` of a control, in the type of its `current` value."""
    if isinstance(current, bool):
        return bool(value)
    if isinstance(current, int | float):
        return float(value)
    if isinstance(current, list):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError("a list of names, or one string of comma-separated names")
        return [str(item).strip() for item in items if str(item).strip()]
    return str(value)


class _DroppedConnection(Response):
    """The answer starts, and the connection closes before its body: the client sees a dropped
    connection (over a socket, a response cut short; in-process, the transport error)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        raise httpx.RemoteProtocolError("Server disconnected without sending a complete response.")


def webhook_transport() -> httpx.AsyncBaseTransport:
    """How a fake sends its webhooks over the network: as many at once as its calls need — a
    provider's webhooks come from many machines, with no shared cap. httpx's default pool (100
    connections, wait for a free one counted against the request's timeout) made a burst's webhooks
    queue behind each other inside the fake and time out there (Twilio's `rt`), then be retried: a
    spiral the service never caused (make chaos, Twilio redeliveries, 2026-12-07).

    Spread over `_WEBHOOK_POOLS` pools: httpcore's pool looks at every connection it holds, for
    every idle one, each time a request starts or ends (1.0.9: a check of the keep-alive limit that
    counts all connections inside the loop over them), so one pool's CPU grows with the square of
    the webhooks in flight — with hundreds of calls at once the fake spent most of its CPU there,
    its event loop fell behind and its own webhooks timed out before the service had seen them
    (`python -m bench provider`, issue 26). The same transport class: the same exceptions, the same
    timeouts."""
    return _PooledTransports(_WEBHOOK_POOLS)


_WEBHOOK_POOLS = 32


class _PooledTransports(httpx.AsyncBaseTransport):
    """Requests dealt round robin over `count` httpx transports, none capped on connections."""

    def __init__(self, count: int) -> None:
        limits = httpx.Limits(max_connections=5000, max_keepalive_connections=max(1, 200 // count),
                              keepalive_expiry=4.0)
        self._pools = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(count)]
        self._turn = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._turn = (self._turn + 1) % len(self._pools)
        return await self._pools[self._turn].handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class ControlledFake:
    """A fake provider's controls, callee scripts and request log, the faults it injects, and its
    `/_fake/*` routes: `GET /_fake/calls`, `GET /_fake/requests`, `POST /_fake/callees` ({number:
    script}), `GET|POST /_fake/control`, `POST /_fake/reset`. A subclass answers the first and the
    last (`_inspect_calls`, `_reset`, which calls `_reset_controls`)."""

    def __init__(self, controls: Any) -> None:
        self._initial = controls
        self.controls = replace(controls)
        self.callees: dict[str, CalleeScript] = {}
        self.requests: list[dict[str, Any]] = []
        self._released: asyncio.Event | None = None
        self._rng = random.Random()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._answers_lost = 0

    def _spawn(self, coroutine: Awaitable[Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_tasks(self, *others: asyncio.Task[Any] | None) -> None:
        """Cancel the fake's tasks (and `others`) until every one has ended."""
        tasks = {task for task in (*others, *self._tasks) if task is not None and not task.done()}
        while tasks:
            for task in tasks:
                task.cancel()
            _, tasks = await asyncio.wait(tasks, timeout=1.0)

    async def _turn(self) -> None:
        """Before a REST request is answered: the configured latency, and the hang while it lasts."""
        if self.controls.latency_ms > 0:
            await asyncio.sleep(self.controls.latency_ms / 1000)
        while self.controls.hang and self._released is not None:
            await self._released.wait()

    def set_hang(self, hang: bool) -> None:
        """Hold REST requests (True) until released (False)."""
        if hang and not self.controls.hang:
            self._released = asyncio.Event()
        elif not hang and self._released is not None:
            self._released.set()
            self._released = None
        self.controls.hang = hang

    def _reset_controls(self) -> None:
        self.set_hang(False)
        self.controls = replace(self._initial)
        self.requests, self.callees = [], {}

    # -- the provider's clock and the faults -----------------------------------------------------

    def seconds(self, documented: float) -> float:
        """A duration the provider documents (seconds), on the fake's clock (`time_scale`)."""
        return documented * self.controls.time_scale

    def _chance(self, rate: float) -> bool:
        return rate > 0 and (rate >= 1 or self._rng.random() < rate)

    @staticmethod
    def _selects(types: list[str], tags: Iterable[str]) -> bool:
        return not types or any(tag in types for tag in tags)

    def fault_lost(self, tags: Iterable[str]) -> bool:
        """Whether an event with `tags` is dropped (never sent)."""
        c = self.controls
        return self._selects(c.event_loss_types, tags) and self._chance(c.event_loss_rate)

    def fault_delay(self, tags: Iterable[str]) -> float:
        """How late (seconds) an event with `tags` is sent: 0 when on time."""
        c = self.controls
        if c.event_delay_ms <= 0 and c.event_delay_max_ms <= 0:
            return 0.0
        if not (self._selects(c.event_delay_types, tags) and self._chance(c.event_delay_rate)):
            return 0.0
        low = max(0.0, c.event_delay_ms)
        high = max(low, c.event_delay_max_ms)
        return (low if high == low else self._rng.uniform(low, high)) / 1000

    def fault_redelivery(self, tags: Iterable[str]) -> float | None:
        """After how long (seconds) an event with `tags` is delivered once more; None: never."""
        c = self.controls
        if self._selects(c.event_redeliver_types, tags) and self._chance(c.event_redeliver_rate):
            return max(0.0, c.event_redeliver_ms) / 1000
        return None

    def fault_slow(self, tags: Iterable[str]) -> float:
        """How much later (seconds) the receiver's answer to an event with `tags` arrives."""
        c = self.controls
        if c.slow_receiver_ms > 0 and self._selects(c.slow_receiver_types, tags) and self._chance(c.slow_receiver_rate):
            return c.slow_receiver_ms / 1000
        return 0.0

    def answer_lost(self, command: str) -> str | None:
        """`stall` or `drop` when the answer to an executed `command` is to be lost; None: answered."""
        c = self.controls
        if self._selects(c.answer_lost_commands, (command,)) and self._chance(c.answer_lost_rate):
            self._answers_lost += 1
            if c.answer_lost_mode == "alternate":
                return ("stall", "drop")[(self._answers_lost - 1) % 2]
            return c.answer_lost_mode
        return None

    async def answered(self, mode: str | None, response: Response) -> Response:
        """`response` as the client gets it once the command was executed: at once; after
        `answer_stall_ms` (past the client's timeout: `stall`); or never, the connection dropped."""
        if mode == "drop":
            return _DroppedConnection()
        if mode == "stall":
            await asyncio.sleep(max(0.0, self.controls.answer_stall_ms) / 1000)
        return response

    async def _later(self, seconds: float, send: Callable[[], Awaitable[Any]]) -> None:
        await asyncio.sleep(seconds)
        await send()

    @staticmethod
    def _delivery(log: list[dict[str, Any]] | None, **entry: Any) -> None:
        """Record one delivery (or loss) of an event on a call's log."""
        if log is not None:
            log.append({"at": time.time(), **entry})

    # -- the routes ------------------------------------------------------------------------------

    async def _inspect_calls(self, request: Request) -> JSONResponse:
        raise NotImplementedError

    async def _reset(self, request: Request) -> JSONResponse:
        raise NotImplementedError

    async def _inspect_requests(self, request: Request) -> JSONResponse:
        return JSONResponse({"requests": list(self.requests)})

    async def _set_callees(self, request: Request) -> JSONResponse:
        payload = await request.json()
        try:
            scripts = {number: CalleeScript(**script) for number, script in payload.items()}
        except (TypeError, ValueError, AttributeError) as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        self.callees.update(scripts)
        return JSONResponse({number: vars(script) for number, script in self.callees.items()})

    async def _control(self, request: Request) -> JSONResponse:
        if request.method == "POST":
            payload = await request.json()
            current = vars(self.controls)
            unknown = set(payload) - set(current)
            if unknown:
                return JSONResponse({"error": f"unknown controls {sorted(unknown)}"}, status_code=422)
            try:
                values = {name: _coerce(current[name], value) for name, value in payload.items()}
            except (TypeError, ValueError) as error:
                return JSONResponse({"error": str(error)}, status_code=422)
            if values.get("answer_lost_mode", ANSWER_LOST_MODES[0]) not in ANSWER_LOST_MODES:
                return JSONResponse({"error": f"answer_lost_mode must be one of {ANSWER_LOST_MODES}"},
                                    status_code=422)
            if "hang" in values:
                self.set_hang(values.pop("hang"))
            for name, value in values.items():
                setattr(self.controls, name, value)
        return JSONResponse(vars(self.controls))

    def _control_routes(self) -> list[Route]:
        return [
            Route("/_fake/calls", self._inspect_calls, methods=["GET"]),
            Route("/_fake/requests", self._inspect_requests, methods=["GET"]),
            Route("/_fake/callees", self._set_callees, methods=["POST"]),
            Route("/_fake/control", self._control, methods=["GET", "POST"]),
            Route("/_fake/reset", self._reset, methods=["POST"]),
        ]
