"""API throughput: GET /appointments/{id} and POST /appointments on one replica (one uvicorn
worker) against PostgreSQL, and a bare FastAPI JSON route (bench/bare.py) in the same run.

The replica is a full `reminders serve` (harness.cluster.Cluster with one replica: it leads and
its dispatcher scans, idle). Load: wrk -t1 (or the aiohttp generator) with 16 connections; GET
rotates over 1,000 appointments created beforehand; POST creates a new appointment (with its
reminder planned 24 h before it) on every request. A short warm-up precedes each measured run.
"""

from __future__ import annotations

import json
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


def _body() -> str:
    starts = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    return json.dumps({"customer_name": "Bench Customer", "phone": "+14155552671",
                       "starts_at": starts.isoformat(), "timezone": "Europe/Paris"})


def _measure(url: str, duration: float, **options: Any) -> dict[str, Any]:
    run_load(url, connections=CONNECTIONS, duration=2, **options)  # warm-up
    return run_load(url, connections=CONNECTIONS, duration=duration, **options)


def run(quick: bool = False) -> dict[str, Any]:
    duration = 4.0 if quick else 10.0
    body = _body()
    result: dict[str, Any] = {"connections": CONNECTIONS, "duration_s": duration}
    bare_port = free_port()
    bare: subprocess.Popen[bytes] | None = None
    try:
        with EtcdServer() as etcd, PostgresServer() as pg:
            database_url = pg.create_database("api")
            with Cluster(1, database_url=database_url, etcd_endpoint=etcd.endpoint,
                         env={"LOG_LEVEL": "warning"}) as cluster:
                bare = subprocess.Popen(
                    [sys.executable, "-m", "bench.bare", "--port", str(bare_port), "--database-url", database_url],
                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                wait_for_port(bare_port, timeout=30)
                result.update(_load_all(cluster, bare_port, body, duration))
    finally:
        if bare is not None:
            bare.terminate()
            try:
                bare.wait(timeout=10)
            except subprocess.TimeoutExpired:
                bare.kill()
    result["get_vs_bare"] = round(result["get_appointment"]["rps"] / result["bare_get"]["rps"], 3)
    result["get_vs_bare_db"] = round(result["get_appointment"]["rps"] / result["bare_db_get"]["rps"], 3)
    result["post_vs_bare_post"] = round(result["post_appointment"]["rps"] / result["bare_post"]["rps"], 3)
    result["post_vs_bare_get"] = round(result["post_appointment"]["rps"] / result["bare_get"]["rps"], 3)
    return result


def _load_all(cluster: Cluster, bare_port: int, body: str, duration: float) -> dict[str, Any]:
    """The measured runs: bare GET, bare GET with one SELECT, the service's GET and POST, bare POST."""
    result: dict[str, Any] = {}
    replica = cluster.replicas[0]
    cluster.leader(timeout=60)
    log("api: creating 1,000 appointments for the GET rotation")
    ids = []
    with httpx.Client(base_url=replica.url, timeout=10) as http:
        for _ in range(1000):
            response = http.post("/appointments", content=body, headers={"Content-Type": "application/json"})
            response.raise_for_status()
            ids.append(response.json()["id"])
    bare_url = f"http://127.0.0.1:{bare_port}/bare"
    log(f"api: bare GET ({duration:.0f} s)")
    result["bare_get"] = _measure(bare_url, duration)
    log(f"api: bare GET with one SELECT through asyncpg ({duration:.0f} s)")
    result["bare_db_get"] = _measure(f"http://127.0.0.1:{bare_port}/bare-db/{{id}}", duration, ids=ids)
    log(f"api: GET /appointments/{{id}} ({duration:.0f} s)")
    result["get_appointment"] = _measure(f"{replica.url}/appointments/{{id}}", duration, ids=ids)
    log(f"api: POST /appointments ({duration:.0f} s)")
    result["post_appointment"] = _measure(f"{replica.url}/appointments", duration, method="POST", body=body)
    log(f"api: bare POST ({duration:.0f} s)")
    result["bare_post"] = _measure(bare_url, duration, method="POST", body=body)
    return result
