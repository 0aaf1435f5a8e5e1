"""Run the app in-process for tests: lifespan entered, an httpx client on ASGI."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx

from service.app import create_app
from service.config import Settings
from service.db import Database


async def migrate(database_url: str) -> None:
    """`reminders migrate`, as an operator runs it before starting replicas on PostgreSQL."""
    db = Database(database_url)
    try:
        await db.upgrade()
    finally:
        await db.dispose()


def make_settings(database_url: str, etcd_endpoint: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "etcd_endpoints": etcd_endpoint,
        "election_prefix": f"/test/{uuid.uuid4().hex}",
        "pod_name": "test-replica",
        "lease_ttl": 3,
        "telephony_url": "http://127.0.0.1:9",
        "call_window": "00:00-24:00",
        "metrics_port": 0,  # several apps in one process (and other suites on this host): none unless asked
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    if not settings.is_sqlite:
        await migrate(settings.database_url)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


PHONE = "+14155552671"  # FIXED_LINE_OR_MOBILE: a number the service calls


def future(**delta: float) -> str:
    """An ISO 8601 instant `delta` from now, whole seconds, UTC offset."""
    return (datetime.now(UTC) + timedelta(**delta)).replace(microsecond=0).isoformat()


def body(**overrides: object) -> dict:
    """A valid POST /appointments body three days ahead, with `overrides` applied."""
    data = {"customer_name": "Ada Lovelace", "phone": PHONE, "starts_at": future(days=3), "timezone": "UTC"}
    data.update(overrides)
    return data
