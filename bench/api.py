"""API throughput: the service's routes on one replica (one uvicorn worker) against PostgreSQL,
each beside its floor — the same database work through a plain asyncpg pool (bench/bare.py) —
measured in the same run, in A-B-A order (replica, floor, replica) so a drifting machine shows.

The replica is a full `reminders serve` (harness.cluster.Cluster with one replica: it leads and
its dispatcher scans, idle). Load: wrk -t1 with 16 connections (a Python load generator would cap
the floor and flatter the ratio); GET rotates over 1,000 appointments created beforehand; POST
creates a new appointment (with its reminder planned 24 h before it) on every request; the list
reads the first page of 100. A short warm-up precedes each measured run.

| pair | replica | floor |
|---|---|---|
| get | GET /appointments/{id} | GET /bare-db/{id}: one joined SELECT |
| post | POST /appointments | POST /bare-db/appointments: one transaction, two INSERTs |
| list | GET /appointments?limit=100 | GET /bare-db/appointments?limit=100: one SELECT |

Also, once each: PATCH /appointments/{id} (a `notes` change; no floor), the bare FastAPI routes
without a database (GET and POST /bare): what the framework alone serves, and the three floors on
Starlette alone (`bench.bare --framework starlette`): what FastAPI costs a floor.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from harness.cluster import Cluster
from harness.etcd import EtcdServer
from harness.ports import free_port, wait_for_port
from harness.postgres import PostgresServer

from .common import ROOT, log
from .loadgen import run_load

CONNECTIONS = 16
WARMUP_S = 2  # wrk's warm-up before each measured run
APPOINTMENTS = 1000  # created through the API before the runs; GET and PATCH rotate over them
PATCH_BODY = '{"notes": "bring the referral letter"}'


def body_json() -> str:
    """A POST /appointments body: an appointment 30 days ahead (one reminder by the default offsets)."""
    starts = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    return json.dumps({"customer_name": "Bench Customer", "phone": "+14155552671",
                       "starts_at": starts.isoformat(), "timezone": "Europe/Paris"})


def seed(base_url: str, count: int) -> list[str]:
    """Create `count` appointments through the API; their ids."""
    log(f"api: creating {count:,} appointments")
    body, ids = body_json(), []
    with httpx.Client(base_url=base_url, timeout=10) as http:
        for _ in range(count):
            response = http.post("/appointments", content=body, headers={"Content-Type": "application/json"})
            response.raise_for_status()
            ids.append(response.json()["id"])
    return ids


def analyze(database_url: str) -> None:
    """ANALYZE after seeding: without statistics on the just-filled tables, PostgreSQL may give a
    connection's prepared statement a generic plan that scans, and keep it for the connection's
    life (seen: the replica's GET at a third of its steady rate for a whole run)."""
    import asyncio

    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"), timeout=10)
        try:
            await connection.execute("ANALYZE", timeout=60)
        finally:
            await connection.close()

    asyncio.run(run())


def _measure(url: str, duration: float, **options: Any) -> dict[str, Any]:
    run_load(url, connections=CONNECTIONS, duration=WARMUP_S, tool="wrk", **options)
    return run_load(url, connections=CONNECTIONS, duration=duration, tool="wrk", **options)


def _aba(label: str, replica: dict[str, Any], floor: dict[str, Any], duration: float) -> dict[str, Any]:
    """Replica, floor, replica: both replica runs, their mean as the figure, the ratio to the floor."""
    log(f"api: {label}: replica, floor, replica ({duration:.0f} s each)")
    first = _measure(duration=duration, **replica)
    base = _measure(duration=duration, **floor)
    second = _measure(duration=duration, **replica)
    rps = round(statistics.mean([first["rps"], second["rps"]]), 1)
    return {
        "replica": [first, second],
        "floor": base,
        "replica_rps": rps,
        "ratio": round(rps / base["rps"], 3) if base["rps"] else None,
        "errors": first["errors"] + base["errors"] + second["errors"],
    }


def run(quick: bool = False) -> dict[str, Any]:
    duration = 4.0 if quick else 10.0
    result: dict[str, Any] = {"connections": CONNECTIONS, "duration_s": duration, "warmup_s": WARMUP_S,
                              "appointments": APPOINTMENTS, "order": "replica, floor, replica"}
    floors: list[subprocess.Popen[bytes]] = []
    try:
        with EtcdServer() as etcd, PostgresServer() as pg:
            database_url = pg.create_database("api")
            with Cluster(1, database_url=database_url, etcd_endpoint=etcd.endpoint,
                         env={"LOG_LEVEL": "warning"}) as cluster:
                urls = {}
                for framework in ("fastapi", "starlette"):
                    port = free_port()
                    floors.append(subprocess.Popen(
                        [sys.executable, "-m", "bench.bare", "--port", str(port), "--database-url", database_url,
                         "--framework", framework],
                        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
                    wait_for_port(port, timeout=30)
                    urls[framework] = f"http://127.0.0.1:{port}"
                cluster.leader(timeout=60)
                result.update(_load_all(cluster.replicas[0].url, urls["fastapi"], urls["starlette"], database_url,
                                        duration))
    finally:
        for floor in floors:
            floor.terminate()
            try:
                floor.wait(timeout=10)
            except subprocess.TimeoutExpired:
                floor.kill()
    runs = [r for pair in result["pairs"].values() for r in (*pair["replica"], pair["floor"])]
    runs += [result["patch_appointment"], result["bare_get"], result["bare_post"], *result["starlette_floors"].values()]
    result["errors"] = sum(r["errors"] for r in runs)
    return result


def _load_all(replica: str, bare: str, starlette: str, database_url: str, duration: float) -> dict[str, Any]:
    ids = seed(replica, APPOINTMENTS)
    analyze(database_url)
    body = body_json()
    pairs = {
        "get": _aba("GET /appointments/{id}", dict(url=f"{replica}/appointments/{{id}}", ids=ids),
                    dict(url=f"{bare}/bare-db/{{id}}", ids=ids), duration),
        "post": _aba("POST /appointments", dict(url=f"{replica}/appointments", method="POST", body=body),
                     dict(url=f"{bare}/bare-db/appointments", method="POST", body=body), duration),
        "list": _aba("GET /appointments?limit=100", dict(url=f"{replica}/appointments?limit=100"),
                     dict(url=f"{bare}/bare-db/appointments?limit=100"), duration),
    }
    log(f"api: PATCH /appointments/{{id}} ({duration:.0f} s)")
    patch = _measure(f"{replica}/appointments/{{id}}", duration, method="PATCH", body=PATCH_BODY, ids=ids)
    log(f"api: bare GET and POST, no database ({duration:.0f} s each)")
    bare_get = _measure(f"{bare}/bare", duration)
    bare_post = _measure(f"{bare}/bare", duration, method="POST", body=body)
    log(f"api: the floors on Starlette alone, once each ({duration:.0f} s each)")
    starlette_floors = {
        "get": _measure(f"{starlette}/bare-db/{{id}}", duration, ids=ids),
        "post": _measure(f"{starlette}/bare-db/appointments", duration, method="POST", body=body),
        "list": _measure(f"{starlette}/bare-db/appointments?limit=100", duration),
    }
    return {"pairs": pairs, "patch_appointment": patch, "bare_get": bare_get, "bare_post": bare_post,
            "starlette_floors": starlette_floors}
