"""What the real-provider fakes (Twilio, Telnyx) share: the people they call (`CalleeScript`),
the knobs a test turns (latency, hang…), and the `/_fake/*` routes that inspect and turn them.

Each fake keeps its own REST API, its calls and its own controls dataclass (with at least
`latency_ms` and `hang`); `ControlledFake` is the base class that owns the rest.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = ["BEHAVIOURS", "CalleeScript", "ControlledFake"]

BEHAVIOURS = ("answer", "machine", "no-answer", "busy")


@dataclass
class CalleeScript:
    """What the person (or machine) at a number does when called."""

    behaviour: str = "answer"
    # pressed when the call asks for keys: a string at every ask; a list, the n-th entry at the
    # n-th ask ("" or past its end: nothing pressed, the ask times out)
    digits: str | list[str] | None = None

    def __post_init__(self) -> None:
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour must be one of {BEHAVIOURS}")
        if self.digits is not None and not isinstance(self.digits, str | list):
            raise ValueError("digits must be a string or a list of strings")

    def press(self, gather: int) -> str | None:
        """The keys pressed at the `gather`-th ask of a call (0-based), if any."""
        if isinstance(self.digits, list):
            keys = self.digits[gather] if gather < len(self.digits) else None
        else:
            keys = self.digits
        return keys or None


class ControlledFake:
    """A fake provider's controls, callee scripts and request log, and its `/_fake/*` routes:
    `GET /_fake/calls`, `GET /_fake/requests`, `POST /_fake/callees` ({number: script}),
    `GET|POST /_fake/control`, `POST /_fake/reset`. A subclass answers the first and the last
    (`_inspect_calls`, `_reset`, which calls `_reset_controls`)."""

    def __init__(self, controls: Any) -> None:
        self._initial = controls
        self.controls = replace(controls)
        self.callees: dict[str, CalleeScript] = {}
        self.requests: list[dict[str, Any]] = []
        self._released: asyncio.Event | None = None

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
            unknown = set(payload) - set(vars(self.controls))
            if unknown:
                return JSONResponse({"error": f"unknown controls {sorted(unknown)}"}, status_code=422)
            if "hang" in payload:
                self.set_hang(bool(payload["hang"]))
            for name, value in payload.items():
                if name != "hang":
                    setattr(self.controls, name, float(value))
        return JSONResponse(vars(self.controls))

    def _control_routes(self) -> list[Route]:
        return [
            Route("/_fake/calls", self._inspect_calls, methods=["GET"]),
            Route("/_fake/requests", self._inspect_requests, methods=["GET"]),
            Route("/_fake/callees", self._set_callees, methods=["POST"]),
            Route("/_fake/control", self._control, methods=["GET", "POST"]),
            Route("/_fake/reset", self._reset, methods=["POST"]),
        ]
