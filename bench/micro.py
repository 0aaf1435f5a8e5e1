"""Micro-benchmarks behind the "what limits" paragraphs of BENCHMARKS.md, each side by side in one run.

1. client — CPU per POST to the fake provider (0 ms), rounds interleaved: httpx.AsyncClient on
   httpx-aiohttp's transport (how HttpTelephonyClient sent before it went to the transport
   directly), HttpTelephonyClient without and with a `may_send` check, a bare aiohttp session;
2. provider — the fake provider under uvicorn on h11 + asyncio and on httptools + uvloop, each
   taking POSTs from the load tool (what adding uvloop and httptools changed);
3. read — CPU per read of one appointment with its reminder on PostgreSQL, in this process: an
   ORM load + response model (the API's read before issue 16), the service's read now (Core, one
   greenlet hop) + response model, a joined SELECT through SQLAlchemy Core (AsyncConnection), and
   through asyncpg on a connection of the same pool.

  python -m bench micro [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from harness.cluster import ProviderProcess, with_checkout_fakes
from harness.ports import free_port, wait_for_port
from harness.postgres import PostgresServer

from .common import ROOT, log
from .dispatch import _requests, call_body
from .loadgen import run_load
from .seeding import database, seed


def _cpu_per_call(samples: list[float]) -> dict[str, Any]:
    return {"median_ms": round(statistics.median(samples), 3), "min_ms": round(min(samples), 3),
            "max_ms": round(max(samples), 3), "rounds": [round(s, 3) for s in samples]}


async def _timed(n: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    """CPU milliseconds per call of `one(i)` for i < n, `concurrency` at a time, after a warm-up."""
    semaphore = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> None:
        async with semaphore:
            await one(i)

    await asyncio.gather(*(bounded(i) for i in range(min(n, 300))))
    cpu = time.process_time()
    await asyncio.gather(*(bounded(i) for i in range(n)))
    return (time.process_time() - cpu) / n * 1000


async def _client_round(url: str, n: int, concurrency: int) -> dict[str, float]:
    import aiohttp
    import httpx
    from httpx_aiohttp import AiohttpTransport

    from service.providers.generic.client import HttpTelephonyClient

    requests = _requests(n, f"micro-{time.monotonic_ns()}")
    bodies = [json.dumps(r.payload(), ensure_ascii=False, separators=(",", ":")).encode() for r in requests]
    headers = [{"Content-Type": "application/json", "Idempotency-Key": r.idempotency_key} for r in requests]
    result: dict[str, float] = {}

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=10.0) as http:
        async def via_async_client(i: int) -> None:
            (await http.post(f"{url}/v1/calls", content=bodies[i], headers=headers[i])).json()

        result["httpx_async_client"] = await _timed(n, concurrency, via_async_client)

    for name, may_send in (("telephony_client", None), ("telephony_client_may_send", lambda: True)):
        async with HttpTelephonyClient(url, max_connections=concurrency) as client:
            fresh = _requests(n, f"micro-{name}-{time.monotonic_ns()}")

            async def via_client(i: int, client: HttpTelephonyClient = client, fresh: list = fresh,
                                 may_send: Any = may_send) -> None:
                await client.place_call(fresh[i], may_send=may_send)

            result[name] = await _timed(n, concurrency, via_client)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def via_aiohttp(i: int) -> None:
            key = {**headers[i], "Idempotency-Key": f"{headers[i]['Idempotency-Key']}-aiohttp"}
            async with session.post(f"{url}/v1/calls", data=bodies[i], headers=key) as response:
                await response.json()

        result["bare_aiohttp"] = await _timed(n, concurrency, via_aiohttp)
    return result


def _client(n: int, concurrency: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        provider = ProviderProcess(Path(scratch) / "provider.log").start()
        try:
            samples: dict[str, list[float]] = {}
            for round_ in range(1, rounds + 1):
                log(f"micro: client round {round_}/{rounds} ({n} POSTs per variant, {concurrency} in flight)")
                provider.client.reset()
                for name, ms in asyncio.run(_client_round(provider.url, n, concurrency)).items():
                    samples.setdefault(name, []).append(ms)
        finally:
            provider.close()
    return {"posts": n, "concurrency": concurrency, "latency_ms": provider.latency_ms,
            "cpu_per_call": {k: _cpu_per_call(v) for k, v in samples.items()}}


_PROVIDER = (
    "import uvicorn; from reminders_fakes import create_fake_provider; "
    "uvicorn.run(create_fake_provider(), host='127.0.0.1', port={port}, log_level='warning', "
    "access_log=False, lifespan='off', loop='{loop}', http='{http}')"
)


def _provider(duration: float, connections: int, rounds: int) -> dict[str, Any]:
    stacks = {"h11+asyncio": ("asyncio", "h11"), "httptools+uvloop": ("uvloop", "httptools")}
    rps: dict[str, list[float]] = {}
    for round_ in range(1, rounds + 1):
        for name, (loop, http) in stacks.items():
            log(f"micro: provider round {round_}/{rounds}, {name} ({duration:.0f} s of POSTs, "
                f"{connections} connections)")
            port = free_port()
            server = subprocess.Popen([sys.executable, "-c", _PROVIDER.format(port=port, loop=loop, http=http)],
                                      cwd=ROOT, env=with_checkout_fakes(dict(os.environ)), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_for_port(port, timeout=30)
                load = run_load(f"http://127.0.0.1:{port}/v1/calls", method="POST", connections=connections,
                                duration=duration, body=call_body(), unique_key=True)
                rps.setdefault(name, []).append(load["rps"])
            finally:
                server.terminate()
                server.wait(timeout=10)
    return {"connections": connections, "duration_s": duration,
            "rps": {name: {"median": statistics.median(v), "rounds": v} for name, v in rps.items()}}


async def _read_round(url: str, reads: int) -> dict[str, float]:
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import joinedload

    from service import appointments as service
    from service.api.schemas import AppointmentOut
    from service.db import Appointment, Reminder

    appointments, reminders = Appointment.__table__, Reminder.__table__
    core = (
        select(appointments, reminders.c.id.label("reminder_id"), reminders.c.due_at,
               reminders.c.status.label("reminder_status"), reminders.c.attempts, reminders.c.last_error)
        .select_from(appointments.outerjoin(reminders, reminders.c.appointment_id == appointments.c.id))
    )
    raw = ("SELECT a.*, r.id AS reminder_id, r.due_at, r.status AS reminder_status, r.attempts, r.last_error "
           "FROM appointments a LEFT JOIN reminders r ON r.appointment_id = a.id WHERE a.id = $1 ORDER BY r.due_at")
    async with database(url, pool_size=2) as db:
        async with db.session() as session:
            ids = list((await session.execute(select(Appointment.id))).scalars())
        autocommit = db.engine.execution_options(isolation_level="AUTOCOMMIT")
        one = select(Appointment).options(joinedload(Appointment.reminders)).execution_options(populate_existing=True)
        model = AppointmentOut.model_validate

        async def orm(i: int) -> None:  # how GET /appointments/{id} read before issue 16
            async with AsyncSession(autocommit, expire_on_commit=False) as session:
                found = (await session.execute(one.where(Appointment.id == ids[i % len(ids)]))).unique().scalar_one()
                model(found, from_attributes=True)

        async def service_read(i: int) -> None:  # how it reads now: service.appointments.read + one validation
            model(await service.read(db, ids[i % len(ids)]))

        async def core_rows(i: int) -> None:
            async with autocommit.connect() as connection:
                (await connection.execute(core.where(appointments.c.id == ids[i % len(ids)])
                                          .order_by(reminders.c.due_at))).all()

        async def asyncpg_rows(i: int) -> None:
            async with db.engine.connect() as connection:
                driver = (await connection.get_raw_connection()).driver_connection
                await driver.fetch(raw, ids[i % len(ids)])

        return {"orm_and_response_model": await _timed(reads, 1, orm),
                "service_read_and_response_model": await _timed(reads, 1, service_read),
                "core_rows": await _timed(reads, 1, core_rows),
                "asyncpg_rows": await _timed(reads, 1, asyncpg_rows)}


def _read(reads: int, rounds: int) -> dict[str, Any]:
    with PostgresServer() as pg:
        url = pg.create_database("micro_read")

        async def prepare() -> None:
            async with database(url) as db:
                await db.upgrade()
            await seed(url, 200, datetime.now(UTC) + timedelta(days=1))

        asyncio.run(prepare())
        samples: dict[str, list[float]] = {}
        for round_ in range(1, rounds + 1):
            log(f"micro: read round {round_}/{rounds} ({reads} reads per variant)")
            for name, ms in asyncio.run(_read_round(url, reads)).items():
                samples.setdefault(name, []).append(ms)
    return {"reads": reads, "cpu_per_read": {k: _cpu_per_call(v) for k, v in samples.items()}}


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 3
    return {
        "client": _client(n=2000 if quick else 4000, concurrency=100, rounds=rounds),
        "provider": _provider(duration=3 if quick else 4, connections=100, rounds=1 if quick else 2),
        "read": _read(reads=300 if quick else 1000, rounds=1 if quick else 2),
    }
