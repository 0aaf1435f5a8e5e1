"""Where a replica's CPU goes per API route: py-spy on one `reminders serve` under wrk load.

One replica (one uvicorn worker) against PostgreSQL, as `python -m bench api` runs it. For each of
GET /appointments/{id}, POST /appointments, GET /appointments?limit=100 and PATCH
/appointments/{id} (a `notes` change): wrk with 16 connections for 11 s, and py-spy sampling the
replica for 8 s of it (`py-spy record --format raw`, 200 Hz). The samples are summed as own time
by package (the function at the top of each stack: SQLAlchemy's async work runs in greenlets, so
the route's inclusive time misses part of it) and as the inclusive share of a few named costs.
The grpc.aio poller thread (a C poll loop that py-spy counts as busy) is left out.

Needs py-spy (dev extra) and root or ptrace rights.  python -m bench profile [--result-name N]
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from harness.cluster import Cluster
from harness.etcd import EtcdServer
from harness.postgres import PostgresServer

from .api import APPOINTMENTS, CONNECTIONS, PATCH_BODY, analyze, body_json, seed
from .common import log
from .loadgen import run_load

SECONDS, LOAD_SECONDS, RATE = 8, 11, 200

# label → pattern of the function (as py-spy names it) whose inclusive share is reported
NAMED = {
    "pool pre-ping (BEGIN; ; ROLLBACK)": r"^AsyncAdapt_asyncpg_connection\._async_ping ",
    "FastAPI dependency solving": r"^solve_dependencies ",
    "FastAPI's response validation + JSON": r"^serialize_response ",
    "one validation + orjson (`_answer`)": r"^_answer ",
    "response model built in the route": r"^AppointmentOut\.of ",
    "ORM flush (unit of work)": r"^Session\._flush ",
    "ORM row loading (instances)": r"^instances ",
    "SQL cache key generation": r"^HasCacheKey\._generate_cache_key ",
    "SQLAlchemy ⇄ asyncpg (greenlet_spawn)": r"^greenlet_spawn ",
    "asyncpg (execute/fetch, incl. Cython)": (r"^(Connection\._execute|PreparedStatement\.__bind_execute"
                                              r"|Connection\.execute|Connection\._executemany) \(asyncpg"),
}


def _package(frame: str) -> tuple[str, str]:
    """(function, package) of one py-spy frame 'func (path:line)'."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame, "?"
    function, path = match.groups()
    top = path.split("/")[0].removesuffix(".py")
    if path.startswith("asyncio/runners") and function == "Runner.run":
        return function, "event loop (uvloop, C)"
    if path.startswith("<frozen") or top in sys.stdlib_module_names:
        return function, "stdlib"
    if path.startswith("<"):
        return function, "generated code"
    return function, top


def summarise(raw: str) -> dict[str, Any]:
    """Own time by package, top functions by own time, and the NAMED inclusive shares (percent)."""
    own_package: Counter[str] = Counter()
    own_function: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[0].startswith("Thread._bootstrap"):
            continue  # grpc.aio's poller thread
        n = int(count)
        total += n
        function, package = _package(frames[-1])
        own_package[package] += n
        own_function[f"{function} ({package})"] += n
        for label, pattern in NAMED.items():
            if any(re.search(pattern, frame) for frame in frames):
                inclusive[label] += n

    def pct(n: int) -> float:
        return round(100 * n / total, 1) if total else 0.0

    return {
        "samples": total,
        "own_by_package": [[p, pct(n)] for p, n in own_package.most_common(8)],
        "top_own_functions": [[f, pct(n)] for f, n in own_function.most_common(8)],
        "named_inclusive": {label: pct(inclusive[label]) for label in NAMED},
    }


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: pip install -e '.[dev]'")
    return found


def _profile(pid: int, url: str, tmp: Path, name: str, **load: Any) -> dict[str, Any]:
    out = tmp / f"{name}.txt"
    outcome: dict[str, Any] = {}
    loader = threading.Thread(target=lambda: outcome.update(
        run_load(url, connections=CONNECTIONS, duration=LOAD_SECONDS, tool="wrk", **load)))
    loader.start()
    threading.Event().wait(1.5)  # wrk connected and the route warm
    spy = subprocess.run(
        [_py_spy(), "record", "-d", str(SECONDS), "-r", str(RATE), "-p", str(pid),
         "--format", "raw", "-o", str(out)],
        capture_output=True, text=True, timeout=SECONDS + 60, check=False)
    loader.join(LOAD_SECONDS + 70)
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {spy.stderr[-1500:]}")
    return {"load": outcome, **summarise(out.read_text())}


def run(quick: bool = False) -> dict[str, Any]:
    _py_spy()
    result: dict[str, Any] = {"connections": CONNECTIONS, "seconds": SECONDS, "rate_hz": RATE, "routes": {}}
    with EtcdServer() as etcd, PostgresServer() as pg, tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        database_url = pg.create_database("api")
        with Cluster(1, database_url=database_url, etcd_endpoint=etcd.endpoint,
                     env={"LOG_LEVEL": "warning"}) as cluster:
            replica = cluster.replicas[0]
            cluster.leader(timeout=60)
            ids = seed(replica.url, APPOINTMENTS)
            analyze(database_url)
            pid = replica.pid
            assert pid is not None
            routes = {
                "get": ("GET /appointments/{id}", dict(url=f"{replica.url}/appointments/{{id}}", ids=ids)),
                "post": ("POST /appointments", dict(url=f"{replica.url}/appointments", method="POST",
                                                   body=body_json())),
                "list": ("GET /appointments?limit=100", dict(url=f"{replica.url}/appointments?limit=100")),
                "patch": ("PATCH /appointments/{id} (notes)", dict(url=f"{replica.url}/appointments/{{id}}",
                                                                   method="PATCH", body=PATCH_BODY, ids=ids)),
            }
            for key, (label, load) in routes.items():
                log(f"profile: {label} ({SECONDS} s of samples under wrk)")
                result["routes"][key] = {"label": label, **_profile(pid, tmp=Path(tmp), name=key, **load)}
    return result
