"""The API benchmark's baselines: a bare FastAPI app, served the way `reminders serve` serves.

GET /bare returns a JSON object about the size of an appointment; POST /bare validates a small
pydantic body and echoes it (201). No database, no middleware.
With --database-url, the floors for the service's routes, each through a plain asyncpg pool (no
ORM, no SQLAlchemy), returning the same fields the service returns:

- GET /bare-db/{id}: one appointment and its reminders in ONE SELECT, outside a transaction;
- POST /bare-db/appointments: the body validated by a pydantic model, then ONE transaction that
  INSERTs the appointment and its reminder (one per offset, as the service plans by default);
- GET /bare-db/appointments?limit=N: a page of N appointments by (starts_at, id) with their
  reminders in ONE SELECT.

With --framework starlette, the same three floors on Starlette alone (no FastAPI: the body
validated by the same pydantic model, the answer written by Starlette's JSONResponse).

  python -m bench.bare --port 8000 [--database-url postgresql://...] [--framework starlette]
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

_COLUMNS = """a.id, a.customer_name, a.phone, a.starts_at, a.timezone, a.notes, a.status, a.language,
       a.confirmation, a.remind_at, a.created_at, a.updated_at, a.erased_at,
       r.id AS reminder_id, r.due_at, r.status AS reminder_status, r.attempts,
       r.last_error, r.skip_reason, r.sent_at, r.provider_call_id, r.outcome, r.answered_at"""
_ONE_APPOINTMENT = f"""
SELECT {_COLUMNS}
FROM appointments a LEFT JOIN reminders r ON r.appointment_id = a.id
WHERE a.id = $1 ORDER BY r.due_at
"""
_PAGE = f"""
SELECT {_COLUMNS}
FROM (SELECT * FROM appointments ORDER BY starts_at, id LIMIT $1) a
LEFT JOIN reminders r ON r.appointment_id = a.id
ORDER BY a.starts_at, a.id, r.due_at
"""
_INSERT_APPOINTMENT = """
INSERT INTO appointments
    (id, customer_name, phone, starts_at, timezone, notes, remind_at, status, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, NULL, 'scheduled', $7, $7)
"""
_INSERT_REMINDER = """
INSERT INTO reminders
    (id, appointment_id, due_at, status, attempts, next_attempt_at, idempotency_key, created_at, updated_at)
VALUES ($1, $2, $3, 'pending', 0, $3, $4, $5, $5)
"""
OFFSETS = (timedelta(hours=24),)  # the service's default REMINDER_OFFSETS


async def _no_reset(_connection: asyncpg.Connection) -> None:
    """asyncpg's default reset sends a query (a round trip) on every release; the service's pool
    (SQLAlchemy's) sends none after a read outside a transaction, so neither does the floor."""


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    url = os.environ.get("BARE_DATABASE_URL")
    app.state.pool = await asyncpg.create_pool(url, min_size=4, max_size=10, reset=_no_reset) if url else None
    try:
        yield
    finally:
        if app.state.pool is not None:
            await app.state.pool.close()


app = FastAPI(lifespan=_lifespan)

_DOC = {
    "id": "3f1c5c1e-9c7a-4a53-9a57-6c2b1f0e8d11",
    "customer_name": "Bench Customer",
    "phone": "+14155552671",
    "starts_at": "2030-01-01T10:00:00+00:00",
    "timezone": "Europe/Paris",
    "notes": None,
    "status": "scheduled",
    "reminders": [{"id": "9a6f2d1c-0b1e-4a47-8f1c-2c5d6e7f8a90", "due_at": "2029-12-31T10:00:00+00:00",
                   "status": "pending", "attempts": 0, "last_error": None}],
}


class Body(BaseModel):
    customer_name: str
    phone: str
    starts_at: datetime
    timezone: str = "UTC"
    notes: str | None = None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _appointments(rows: Sequence[asyncpg.Record]) -> list[dict[str, Any]]:
    """Joined rows (appointment columns, then one reminder's or NULLs) → appointments with reminders."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for row in rows:
        if current is None or current["id"] != row["id"]:
            remind_at = json.loads(row["remind_at"]) if row["remind_at"] else None
            current = {
                "id": row["id"], "customer_name": row["customer_name"], "phone": row["phone"],
                "starts_at": row["starts_at"].isoformat(), "timezone": row["timezone"], "notes": row["notes"],
                "status": row["status"], "language": row["language"], "confirmation": row["confirmation"],
                "remind_at": remind_at, "reminders": [], "unplanned": [],
                "created_at": row["created_at"].isoformat(), "updated_at": row["updated_at"].isoformat(),
                "erased_at": _iso(row["erased_at"]),
            }
            out.append(current)
        if row["reminder_id"] is not None:
            current["reminders"].append({
                "id": row["reminder_id"], "due_at": row["due_at"].isoformat(), "status": row["reminder_status"],
                "attempts": row["attempts"], "last_error": row["last_error"], "skip_reason": row["skip_reason"],
                "sent_at": _iso(row["sent_at"]), "provider_call_id": row["provider_call_id"],
                "outcome": row["outcome"], "answered_at": _iso(row["answered_at"]),
            })
    return out


@app.get("/bare")
async def bare() -> dict:
    return _DOC


@app.post("/bare", status_code=201)
async def bare_post(body: Body) -> dict:
    return {**_DOC, "customer_name": body.customer_name, "starts_at": body.starts_at.isoformat()}


async def _page(pool: asyncpg.Pool, limit: int) -> dict[str, Any]:
    return {"items": _appointments(await pool.fetch(_PAGE, limit, timeout=10)), "next_cursor": None}


async def read_appointment(pool: asyncpg.Pool, appointment_id: str) -> dict[str, Any] | None:
    """The floor of `GET /appointments/{id}`: one joined SELECT, the answer's fields as the service's."""
    rows = await pool.fetch(_ONE_APPOINTMENT, appointment_id, timeout=10)
    return _appointments(rows)[0] if rows else None


async def _create(pool: asyncpg.Pool, body: Body) -> dict[str, Any]:
    now = datetime.now(UTC)
    appointment_id = str(uuid.uuid4())
    starts_at = body.starts_at.astimezone(UTC)
    reminders = []
    for offset in OFFSETS:
        reminder_id = str(uuid.uuid4())
        reminders.append((reminder_id, appointment_id, starts_at - offset, f"reminder-{reminder_id}", now))
    async with pool.acquire(timeout=10) as connection, connection.transaction():
        await connection.execute(_INSERT_APPOINTMENT, appointment_id, body.customer_name, body.phone, starts_at,
                                 body.timezone, body.notes, now, timeout=10)
        await connection.executemany(_INSERT_REMINDER, reminders, timeout=10)
    return {
        "id": appointment_id, "customer_name": body.customer_name, "phone": body.phone,
        "starts_at": starts_at.isoformat(), "timezone": body.timezone, "notes": body.notes, "status": "scheduled",
        "remind_at": None, "unplanned": [], "created_at": now.isoformat(), "updated_at": now.isoformat(),
        "erased_at": None,
        "reminders": [{"id": r[0], "due_at": r[2].isoformat(), "status": "pending", "attempts": 0, "last_error": None,
                       "skip_reason": None, "sent_at": None, "provider_call_id": None, "outcome": None,
                       "answered_at": None} for r in reminders],
    }


@app.get("/bare-db/appointments")
async def bare_db_list(request: Request, limit: int = 100) -> dict[str, Any]:
    return await _page(request.app.state.pool, limit)


@app.get("/bare-db/{appointment_id}")
async def bare_db(appointment_id: str, request: Request) -> dict[str, Any]:
    found = await read_appointment(request.app.state.pool, appointment_id)
    if found is None:
        raise HTTPException(404, "appointment not found")
    return found


@app.post("/bare-db/appointments", status_code=201)
async def bare_db_create(body: Body, request: Request) -> dict[str, Any]:
    return await _create(request.app.state.pool, body)


# -- the same floors on Starlette alone (--framework starlette): what FastAPI itself costs ---------


async def starlette_read(request: Request) -> JSONResponse:
    """`GET /appointments/{id}` at its floor, on Starlette (here and beside the webhooks' floors)."""
    found = await read_appointment(request.app.state.pool, request.path_params["appointment_id"])
    return JSONResponse(found) if found is not None else JSONResponse({"detail": "appointment not found"}, 404)


async def _starlette_create(request: Request) -> JSONResponse:
    try:
        body = Body.model_validate_json(await request.body())
    except ValidationError as error:
        return JSONResponse({"detail": error.errors(include_url=False, include_context=False)}, 422)
    return JSONResponse(await _create(request.app.state.pool, body), 201)


async def _starlette_list(request: Request) -> JSONResponse:
    return JSONResponse(await _page(request.app.state.pool, int(request.query_params.get("limit", 100))))


starlette_app = Starlette(
    routes=[Route("/bare-db/appointments", _starlette_list, methods=["GET"]),
            Route("/bare-db/appointments", _starlette_create, methods=["POST"]),
            Route("/bare-db/{appointment_id}", starlette_read, methods=["GET"])],
    lifespan=_lifespan,
)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", help="PostgreSQL (postgresql://…) for the /bare-db floors")
    parser.add_argument("--framework", choices=["fastapi", "starlette"], default="fastapi",
                        help="starlette: the /bare-db floors without FastAPI")
    args = parser.parse_args()
    if args.database_url:
        os.environ["BARE_DATABASE_URL"] = args.database_url.replace("postgresql+asyncpg://", "postgresql://")
    config = uvicorn.Config(app if args.framework == "fastapi" else starlette_app, host=args.host, port=args.port,
                            log_config=None, access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
