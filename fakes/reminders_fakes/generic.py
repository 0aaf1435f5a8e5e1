"""The generic fake provider: the JSON calls API of docs/DESIGN.md with real idempotency semantics.

For the demo, the tests, the benchmarks and the k8s demo deployment (`reminders fake-provider`).

Endpoints (each `/v1/...` call endpoint is also served under one path segment, `/<prefix>/v1/...`,
and the prefix is recorded as `placed_by`):

- `POST /v1/calls` — place a call (the contract in docs/DESIGN.md: 201, replay, 400, 401, 409, 422, 5xx).
- `GET /v1/calls` — every call created, `?placed_by=<prefix>` to filter.
- `GET /v1/requests` — every POST received, in arrival order, with the status it got.
- `GET|POST /v1/control` — read or change `latency_ms`, `fail_rate`, `fail_status`, `hang`.
- `POST /v1/reset` — forget all calls, keys and requests and restore the initial behaviour.

Only `POST .../v1/calls` checks the bearer token (TELEPHONY_TOKEN when run by the command). State
lives in memory, in one event loop, bounded: past `max_entries` the oldest calls, requests and
finished keys are forgotten (the listings then say how many were dropped).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.privacy import E164, mask_phone

__all__ = ["DEFAULT_MAX_ENTRIES", "TOKEN_VARIABLE", "FakeProvider", "create_fake_provider", "run_fake_provider"]

logger = logging.getLogger(__name__)

_FAIL_STATUSES = (500, 503, 429)
# Enough for the chaos suite's 42,000 reminders (each call and request kept), bounded all the same.
DEFAULT_MAX_ENTRIES = 200_000
# The bearer token the fake requires: the one the service sends (never on the command line: argv
# is visible to every user of the machine).
TOKEN_VARIABLE = "TELEPHONY_TOKEN"


@dataclass
class _Settings:
    latency_ms: float
    fail_rate: float
    fail_status: int = 503
    hang: bool = False


@dataclass
class _KeyEntry:
    """An idempotency key: in progress until `status` is set, then replayable."""

    body: dict[str, Any]
    status: int | None = None
    response: dict[str, Any] | None = None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validate_call(payload: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The canonical body compared across requests with one key, or the reason it is invalid."""
    if not isinstance(payload, dict):
        return None, "body must be a JSON object"
    for name in ("to", "from", "message"):
        if not isinstance(payload.get(name), str) or not payload[name]:
            return None, f"'{name}' is required and must be a non-empty string"
    for name in ("to", "from"):
        if not E164.fullmatch(payload[name]):
            return None, f"'{name}' must be an E.164 number"
    metadata = payload.get("metadata")
    if not isinstance(metadata, dict):
        return None, "'metadata' is required and must be an object"
    for name in ("appointment_id", "reminder_id"):
        if not isinstance(metadata.get(name), str) or not metadata[name]:
            return None, f"'metadata.{name}' is required and must be a non-empty string"
    body = {
        "to": payload["to"],
        "from": payload["from"],
        "message": payload["message"],
        "metadata": metadata,
    }
    return body, None


class _Bounded(deque):  # type: ignore[type-arg]
    """A deque that counts what fell off its far end."""

    def __init__(self, maxlen: int) -> None:
        super().__init__(maxlen=maxlen)
        self.dropped = 0

    def append(self, item: Any) -> None:
        if len(self) == self.maxlen:
            self.dropped += 1
        super().append(item)


class FakeProvider:
    """One fake provider's state and request handlers; `app` is its Starlette application."""

    def __init__(
        self, *, latency_ms: float = 0, fail_rate: float = 0.0, token: str | None = None, seed: int | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if latency_ms < 0 or not 0.0 <= fail_rate <= 1.0:
            raise ValueError("latency_ms must be >= 0 and fail_rate within [0, 1]")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.initial = _Settings(latency_ms=float(latency_ms), fail_rate=float(fail_rate))
        self.settings = _Settings(**vars(self.initial))
        self.expected_authorization = f"Bearer {token}".encode() if token is not None else None
        self.max_entries = max_entries
        self.rng = random.Random(seed)
        # Set while not hanging; replaced by a fresh, unset event when a hang starts.
        self.released: asyncio.Event | None = None
        self._forget()
        self.app = Starlette(routes=self._routes())

    def _forget(self) -> None:
        self.keys: OrderedDict[str, _KeyEntry] = OrderedDict()
        self.calls = _Bounded(self.max_entries)
        self.requests = _Bounded(self.max_entries)

    def _routes(self) -> list[Route]:
        return [
            Route("/v1/calls", self.create_call, methods=["POST"]),
            Route("/v1/calls", self.list_calls, methods=["GET"]),
            Route("/v1/requests", self.list_requests, methods=["GET"]),
            Route("/v1/control", self.control, methods=["GET", "POST"]),
            Route("/v1/reset", self.reset, methods=["POST"]),
            Route("/{prefix}/v1/calls", self.create_call, methods=["POST"]),
            Route("/{prefix}/v1/calls", self.list_calls, methods=["GET"]),
            Route("/{prefix}/v1/requests", self.list_requests, methods=["GET"]),
        ]

    def _authorized(self, request: Request) -> bool:
        if self.expected_authorization is None:
            return True
        given = request.headers.get("Authorization", "").encode()
        return hmac.compare_digest(given, self.expected_authorization)

    def _remember_key(self, keys: OrderedDict[str, _KeyEntry], key: str, entry: _KeyEntry) -> None:
        """Store `key`; past `max_entries` keys, forget the oldest finished ones (never one in progress)."""
        keys[key] = entry
        while len(keys) > self.max_entries:
            oldest = next((k for k, e in keys.items() if e.status is not None), None)
            if oldest is None:
                return
            del keys[oldest]

    async def _wait_for_turn(self) -> None:
        """The configured latency, then as long as a hang lasts."""
        delay = self.settings.latency_ms / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)
        while self.settings.hang and self.released is not None:
            await self.released.wait()

    async def create_call(self, request: Request) -> JSONResponse:
        placed_by = request.path_params.get("prefix")
        key = request.headers.get("Idempotency-Key") or None
        # Captured so that a reset during the latency cannot mix generations.
        keys, calls = self.keys, self.calls
        logged: dict[str, Any] = {
            "idempotency_key": key, "placed_by": placed_by, "status": None, "received_at": time.time(),
            "replayed": False, "call_id": None,
        }
        self.requests.append(logged)
        response, replayed = await self._answer_call(request, key, placed_by, keys, calls, logged)
        logged["status"], logged["replayed"] = response.status_code, replayed
        return response

    async def _answer_call(
        self, request: Request, key: str | None, placed_by: str | None,
        keys: OrderedDict[str, _KeyEntry], calls: _Bounded, logged: dict[str, Any],
    ) -> tuple[JSONResponse, bool]:
        if not self._authorized(request):
            return _error(401, "missing or invalid bearer token"), False
        if key is None:
            return _error(400, "Idempotency-Key header is required"), False
        try:
            payload = await request.json()
        except ValueError:
            return _error(422, "body is not valid JSON"), False
        body, problem = _validate_call(payload)
        if body is None:
            return _error(422, problem or "invalid body"), False
        # Check and mark in progress with no await in between: one event loop, no lock needed.
        existing = keys.get(key)
        if existing is not None:
            if existing.body != body:
                return _error(422, "Idempotency-Key reused with a different body"), False
            if existing.status is None:
                return _error(409, "a request with this Idempotency-Key is in progress"), False
            logged["call_id"] = (existing.response or {}).get("id")
            return JSONResponse(existing.response, status_code=existing.status,
                                headers={"Idempotent-Replayed": "true"}), True
        entry = _KeyEntry(body=body)
        self._remember_key(keys, key, entry)
        try:
            return await self._place(key, body, placed_by, entry, calls, logged), False
        finally:
            if entry.status is None and keys.get(key) is entry:
                del keys[key]  # failed or abandoned: the key may be used again

    async def _place(
        self, key: str, body: dict[str, Any], placed_by: str | None, entry: _KeyEntry, calls: _Bounded,
        logged: dict[str, Any],
    ) -> JSONResponse:
        await self._wait_for_turn()
        if self.settings.fail_rate > 0 and self.rng.random() < self.settings.fail_rate:
            fail_status = self.settings.fail_status
            headers = {"Retry-After": "1"} if fail_status == 429 else None
            logger.info("fake provider: failing call to %s with %d (key %s)", mask_phone(body["to"]), fail_status, key)
            return _error(fail_status, "simulated provider failure", headers)
        call_id = f"call_{self.rng.getrandbits(96):024x}"
        response = {
            "id": call_id, "status": "queued", "to": body["to"], "from": body["from"],
            "created_at": datetime.now(UTC).isoformat(),
        }
        entry.status, entry.response = 201, response
        calls.append({**response, "message": body["message"], "metadata": body["metadata"], "idempotency_key": key,
                      "placed_by": placed_by})
        logged["call_id"] = call_id
        logger.info("fake provider: call %s to %s placed by %s (key %s)", call_id, mask_phone(body["to"]), placed_by,
                    key)
        return JSONResponse(response, status_code=201)

    async def list_calls(self, request: Request) -> JSONResponse:
        placed_by = request.query_params.get("placed_by")
        calls = [c for c in self.calls if placed_by is None or c["placed_by"] == placed_by]
        return JSONResponse({"calls": calls, "dropped": self.calls.dropped})

    async def list_requests(self, request: Request) -> JSONResponse:
        return JSONResponse({"requests": list(self.requests), "dropped": self.requests.dropped})

    def _set_hang(self, hang: bool) -> None:
        if hang and not self.settings.hang:
            self.released = asyncio.Event()
        elif not hang and self.released is not None:
            self.released.set()
            self.released = None
        self.settings.hang = hang

    async def control(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse(dict(vars(self.settings)))
        try:
            payload = await request.json()
        except ValueError:
            return _error(422, "body is not valid JSON")
        problem = _check_control(payload, self.settings)
        if problem is not None:
            return _error(422, problem)
        self.settings.latency_ms = float(payload.get("latency_ms", self.settings.latency_ms))
        self.settings.fail_rate = float(payload.get("fail_rate", self.settings.fail_rate))
        self.settings.fail_status = payload.get("fail_status", self.settings.fail_status)
        self._set_hang(payload.get("hang", self.settings.hang))
        return JSONResponse(dict(vars(self.settings)))

    async def reset(self, request: Request) -> JSONResponse:
        self._set_hang(False)
        self.settings = _Settings(**vars(self.initial))
        self._forget()
        return JSONResponse({"reset": True})


def _check_control(payload: Any, current: _Settings) -> str | None:
    """Why a /v1/control body is invalid, or None."""
    if not isinstance(payload, dict):
        return "body must be a JSON object"
    unknown = set(payload) - {"latency_ms", "fail_rate", "fail_status", "hang"}
    if unknown:
        return f"unknown settings: {sorted(unknown)}"
    latency = payload.get("latency_ms", current.latency_ms)
    rate = payload.get("fail_rate", current.fail_rate)
    status = payload.get("fail_status", current.fail_status)
    if isinstance(latency, bool) or not isinstance(latency, int | float):
        return "latency_ms must be a number"
    if not math.isfinite(latency) or latency < 0:
        return "latency_ms must be >= 0"
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
        return "fail_rate must be a number within [0, 1]"
    if isinstance(status, bool) or status not in _FAIL_STATUSES:
        return f"fail_status must be one of {list(_FAIL_STATUSES)}"
    if not isinstance(payload.get("hang", current.hang), bool):
        return "hang must be a boolean"
    return None


def create_fake_provider(
    *, latency_ms: float = 0, fail_rate: float = 0.0, token: str | None = None, seed: int | None = None,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> Starlette:
    """A fresh fake provider app with its own in-memory state."""
    return FakeProvider(
        latency_ms=latency_ms, fail_rate=fail_rate, token=token, seed=seed, max_entries=max_entries
    ).app


def run_fake_provider(host: str, port: int, latency_ms: float = 0, fail_rate: float = 0.0) -> None:
    """Serve a fake provider with uvicorn until interrupted; the token comes from TELEPHONY_TOKEN."""
    import uvicorn

    token = os.environ.get(TOKEN_VARIABLE) or None
    app = create_fake_provider(latency_ms=latency_ms, fail_rate=fail_rate, token=token)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
