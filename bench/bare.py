"""The API benchmark's baseline: a bare FastAPI app, served the way `reminders serve` serves.

GET /bare returns a JSON object about the size of an appointment; POST /bare validates a small
pydantic body and echoes it (201). No database, no middleware.

  python -m bench.bare --port 8000
"""

from __future__ import annotations

import argparse
from datetime import datetime

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()

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


def main() -> None:
    import uvicorn  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
