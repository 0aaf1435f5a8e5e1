"""The API benchmark's baselines: a bare FastAPI app, served the way `reminders serve` serves.

GET /bare returns a JSON object about the size of an appointment; POST /bare validates a small
pydantic body and echoes it (201). No database, no middleware.
With --database-url, GET /bare-db/{id} also reads one appointment and its reminders in ONE
SELECT through a plain asyncpg pool (no ORM, no transaction) and returns them: the floor for a
route that makes one database round trip in this stack.

  python -m bench.bare --port 8000 [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

_ONE_APPOINTMENT = """
SELECT a.id, a.customer_name, a.phone, a.starts_at, a.timezone, a.notes, a.status,
       r.id AS reminder_id, r.due_at, r.status AS reminder_status, r.attempts, r.last_error
FROM appointments a LEFT JOIN reminders r ON r.appointment_id = a.id
WHERE a.id = $1 ORDER BY r.due_at
"""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    url = os.environ.get("BARE_DATABASE_URL")
    app.state.pool = await asyncpg.create_pool(url, min_size=4, max_size=10) if url else None
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


@app.get("/bare")
async def bare() -> dict:
    return _DOC


@app.post("/bare", status_code=201)
async def bare_post(body: Body) -> dict:
    return {**_DOC, "customer_name": body.customer_name, "starts_at": body.starts_at.isoformat()}


@app.get("/bare-db/{appointment_id}")
async def bare_db(appointment_id: str, request: Request) -> dict[str, Any]:
    rows = await request.app.state.pool.fetch(_ONE_APPOINTMENT, appointment_id, timeout=10)
    if not rows:
        raise HTTPException(404, "appointment not found")
    first = rows[0]
    return {
        "id": first["id"], "customer_name": first["customer_name"], "phone": first["phone"],
        "starts_at": first["starts_at"].isoformat(), "timezone": first["timezone"], "notes": first["notes"],
        "status": first["status"],
        "reminders": [{"id": r["reminder_id"], "due_at": r["due_at"].isoformat(), "status": r["reminder_status"],
                       "attempts": r["attempts"], "last_error": r["last_error"]} for r in rows if r["reminder_id"]],
    }


def main() -> None:
    import uvicorn  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", help="PostgreSQL (postgresql://…) for GET /bare-db/{id}")
    args = parser.parse_args()
    if args.database_url:
        os.environ["BARE_DATABASE_URL"] = args.database_url.replace("postgresql+asyncpg://", "postgresql://")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
