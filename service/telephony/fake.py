"""A fake telephony provider with real idempotency semantics, for the demo and the tests.

Endpoints (each `/v1/...` call endpoint is also served under one path segment, `/<prefix>/v1/...`,
and the prefix is recorded as `placed_by`):

- `POST /v1/calls` — place a call (the contract in DESIGN.md: 201, replay, 400, 401, 409, 422, 5xx).
- `GET /v1/calls` — every call created, `?placed_by=<prefix>` to filter.
- `GET /v1/requests` — every POST received, in arrival order, with the status it got.
- `GET|POST /v1/control` — read or change `latency_ms`, `fail_rate`, `fail_status`, `hang`.
- `POST /v1/reset` — forget all calls, keys and requests and restore the initial behaviour.

Only `POST .../v1/calls` checks the bearer token. State lives in memory, in one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .client import mask_phone

__all__ = ["create_fake_provider", "run_fake_provider"]

logger = logging.getLogger(__name__)

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_FAIL_STATUSES = (500, 503, 429)


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


@dataclass
class _State:
    settings: _Settings
    keys: dict[str, _KeyEntry] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Set while not hanging; replaced by a fresh, unset event when a hang starts.
    released: asyncio.Event | None = None


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
        if not _E164.fullmatch(payload[name]):
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


def create_fake_provider(
    *,
    latency_ms: float = 0,
    fail_rate: float = 0.0,
    token: str | None = None,
    seed: int | None = None,
) -> Starlette:
    """A fresh fake provider app with its own in-memory state."""
    if latency_ms < 0 or not 0.0 <= fail_rate <= 1.0:
        raise ValueError("latency_ms must be >= 0 and fail_rate within [0, 1]")
    initial = _Settings(latency_ms=float(latency_ms), fail_rate=float(fail_rate))
    state = _State(settings=_Settings(**vars(initial)))
    rng = random.Random(seed)

    async def _wait_for_turn() -> None:
        """The configured latency, then as long as a hang lasts."""
        delay = state.settings.latency_ms / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)
        while state.settings.hang and state.released is not None:
            await state.released.wait()

    async def create_call(request: Request) -> JSONResponse:
        placed_by = request.path_params.get("prefix")
        key = request.headers.get("Idempotency-Key") or None
        # Capture the collections so that a reset during the latency cannot mix generations.
        keys, calls, log = state.keys, state.calls, state.requests
        entry_log: dict[str, Any] = {
            "idempotency_key": key,
            "placed_by": placed_by,
            "status": None,
            "received_at": time.time(),
            "replayed": False,
            "call_id": None,
        }
        log.append(entry_log)

        def answer(response: JSONResponse, *, replayed: bool = False) -> JSONResponse:
            entry_log["status"] = response.status_code
            entry_log["replayed"] = replayed
            return response

        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return answer(_error(401, "missing or invalid bearer token"))
        if key is None:
            return answer(_error(400, "Idempotency-Key header is required"))
        try:
            payload = await request.json()
        except ValueError:
            return answer(_error(422, "body is not valid JSON"))
        body, problem = _validate_call(payload)
        if body is None:
            return answer(_error(422, problem or "invalid body"))

        # Check and mark in progress with no await in between: one event loop, no lock needed.
        existing = keys.get(key)
        if existing is not None:
            if existing.body != body:
                return answer(_error(422, "Idempotency-Key reused with a different body"))
            if existing.status is None:
                return answer(_error(409, "a request with this Idempotency-Key is in progress"))
            entry_log["call_id"] = (existing.response or {}).get("id")
            return answer(
                JSONResponse(
                    existing.response,
                    status_code=existing.status,
                    headers={"Idempotent-Replayed": "true"},
                ),
                replayed=True,
            )
        entry = _KeyEntry(body=body)
        keys[key] = entry

        try:
            await _wait_for_turn()
            if state.settings.fail_rate > 0 and rng.random() < state.settings.fail_rate:
                fail_status = state.settings.fail_status
                headers = {"Retry-After": "1"} if fail_status == 429 else None
                logger.info(
                    "fake provider: failing call to %s with %d (key %s)",
                    mask_phone(body["to"]),
                    fail_status,
                    key,
                )
                return answer(_error(fail_status, "simulated provider failure", headers))
            created_at = datetime.now(UTC).isoformat()
            call_id = f"call_{rng.getrandbits(96):024x}"
            response = {
                "id": call_id,
                "status": "queued",
                "to": body["to"],
                "from": body["from"],
                "created_at": created_at,
            }
            entry.status, entry.response = 201, response
            calls.append(
                {
                    **response,
                    "message": body["message"],
                    "metadata": body["metadata"],
                    "idempotency_key": key,
                    "placed_by": placed_by,
                }
            )
            entry_log["call_id"] = call_id
            logger.info(
                "fake provider: call %s to %s placed by %s (key %s)",
                call_id,
                mask_phone(body["to"]),
                placed_by,
                key,
            )
            return answer(JSONResponse(response, status_code=201))
        finally:
            if entry.status is None and keys.get(key) is entry:
                del keys[key]  # failed or abandoned: the key may be used again

    async def list_calls(request: Request) -> JSONResponse:
        placed_by = request.query_params.get("placed_by")
        calls = [c for c in state.calls if placed_by is None or c["placed_by"] == placed_by]
        return JSONResponse({"calls": calls})

    async def list_requests(request: Request) -> JSONResponse:
        return JSONResponse({"requests": list(state.requests)})

    def _settings_json() -> dict[str, Any]:
        return dict(vars(state.settings))

    def _set_hang(hang: bool) -> None:
        if hang and not state.settings.hang:
            state.released = asyncio.Event()
        elif not hang and state.released is not None:
            state.released.set()
            state.released = None
        state.settings.hang = hang

    async def control(request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse(_settings_json())
        try:
            payload = await request.json()
        except ValueError:
            return _error(422, "body is not valid JSON")
        if not isinstance(payload, dict):
            return _error(422, "body must be a JSON object")
        unknown = set(payload) - {"latency_ms", "fail_rate", "fail_status", "hang"}
        if unknown:
            return _error(422, f"unknown settings: {sorted(unknown)}")
        latency = payload.get("latency_ms", state.settings.latency_ms)
        rate = payload.get("fail_rate", state.settings.fail_rate)
        status = payload.get("fail_status", state.settings.fail_status)
        hang = payload.get("hang", state.settings.hang)
        if isinstance(latency, bool) or not isinstance(latency, int | float):
            return _error(422, "latency_ms must be a number")
        if not math.isfinite(latency) or latency < 0:
            return _error(422, "latency_ms must be >= 0")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            return _error(422, "fail_rate must be a number within [0, 1]")
        if isinstance(status, bool) or status not in _FAIL_STATUSES:
            return _error(422, f"fail_status must be one of {list(_FAIL_STATUSES)}")
        if not isinstance(hang, bool):
            return _error(422, "hang must be a boolean")
        state.settings.latency_ms = float(latency)
        state.settings.fail_rate = float(rate)
        state.settings.fail_status = status
        _set_hang(hang)
        return JSONResponse(_settings_json())

    async def reset(request: Request) -> JSONResponse:
        _set_hang(False)
        state.settings = _Settings(**vars(initial))
        state.keys, state.calls, state.requests = {}, [], []
        return JSONResponse({"reset": True})

    routes = [
        Route("/v1/calls", create_call, methods=["POST"]),
        Route("/v1/calls", list_calls, methods=["GET"]),
        Route("/v1/requests", list_requests, methods=["GET"]),
        Route("/v1/control", control, methods=["GET", "POST"]),
        Route("/v1/reset", reset, methods=["POST"]),
        Route("/{prefix}/v1/calls", create_call, methods=["POST"]),
        Route("/{prefix}/v1/calls", list_calls, methods=["GET"]),
        Route("/{prefix}/v1/requests", list_requests, methods=["GET"]),
    ]
    return Starlette(routes=routes)


def run_fake_provider(
    host: str,
    port: int,
    latency_ms: float = 0,
    fail_rate: float = 0.0,
    token: str | None = None,
) -> None:
    """Serve a fake provider with uvicorn until interrupted."""
    import uvicorn

    app = create_fake_provider(latency_ms=latency_ms, fail_rate=fail_rate, token=token)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
