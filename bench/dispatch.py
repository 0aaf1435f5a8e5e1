"""Dispatch throughput: 10,000 reminders due at once, PostgreSQL, one leader, the fake provider.

For each provider latency (0 ms and 100 ms), in one invocation and against one provider process:

1. provider ceiling — wrk (or the aiohttp generator) POSTs new calls at the dispatcher's
   concurrency for a few seconds: what the provider itself can take (not our client);
2. sequential loop — the naive cron job: read the due reminders, then call and UPDATE one at a
   time with the same client (time-boxed; the time for 10,000 is extrapolated from its rate);
3. three rounds (one with --quick) of, in this order:
   - raw client ceiling — 10,000 `HttpTelephonyClient.place_call` at the same concurrency, no DB;
   - the same POSTs through a bare aiohttp session (what httpx's layer costs);
   - at 0 ms, the service's Dispatcher with a client that answers at once (what the rest costs);
   - the service — one `reminders serve` replica (harness.cluster.Cluster) that leads; 10,000 due
     reminders, planned and worded as the API's create plans them (bench/seeding.py), are committed
     in one transaction (the tables are emptied before each round; `seed_s` is how long that took);
     measured: first call received by the provider to the last reminder recorded `sent`
     (end-to-end calls/s), commit to all `sent`, the replica's peak RSS (VmHWM), and that every
     reminder produced exactly one call.
   Each figure is the median round's, with every round's value kept beside it: this machine's
   shared vCPUs move single runs by 30 % and more.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from harness.cluster import Cluster
from harness.etcd import EtcdServer
from harness.postgres import PostgresServer

from .common import cpu_seconds, log, peak_rss_mb, rss_mb, tree_cpu_seconds
from .loadgen import run_load
from .seeding import REPLICA_CALL_WINDOW, database, planned, planning, seed

N_REMINDERS = 10_000
CALLER_ID = "+15550000000"


@functools.cache
def call_body() -> str:
    """A provider request body as the dispatcher sends one for a seeded reminder (its planned
    words), for the load tool's ceiling and the client baselines."""
    appointments, reminders = planned(1, datetime.now(UTC) + timedelta(hours=1), datetime.now(UTC), planning())
    return json.dumps({
        "to": appointments[0]["phone"],
        "from": CALLER_ID,
        "message": reminders[0]["wording"]["message"],
        "metadata": {"appointment_id": appointments[0]["id"], "reminder_id": reminders[0]["id"]},
    })


# -- database helpers (each opens and disposes its own engine) ---------------------------------


async def _count_sent(db: Any) -> int:
    from sqlalchemy import func, select

    from service.db import Reminder

    async with db.session() as session:
        return (await session.execute(
            select(func.count()).select_from(Reminder).where(Reminder.status == "sent"))).scalar_one()


async def _status_counts(url: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from service.db import Reminder

    async with database(url) as db, db.session() as session:
        rows = await session.execute(select(Reminder.status, func.count()).group_by(Reminder.status))
        return {str(status): n for status, n in rows.all()}


async def _wait_all_sent(url: str, count: int, timeout: float) -> tuple[float | None, dict[str, int]]:
    """Poll every 50 ms until `count` reminders are sent; (time.time() when seen, counts)."""
    deadline = time.monotonic() + timeout
    async with database(url) as db:
        while True:
            sent = await _count_sent(db)
            if sent >= count:
                return time.time(), {"sent": sent}
            if time.monotonic() > deadline:
                return None, {"sent": sent}
            await asyncio.sleep(0.05)


async def _sent_span(url: str) -> dict[str, Any]:
    """When the sent reminders were recorded: min/max of sent_at and updated_at (epoch seconds)."""
    from sqlalchemy import func, select

    from service.db import Reminder

    async with database(url) as db, db.session() as session:
        row = (await session.execute(
            select(func.min(Reminder.sent_at), func.max(Reminder.sent_at), func.max(Reminder.updated_at),
                   func.max(Reminder.attempts), func.count(func.distinct(Reminder.provider_call_id)))
            .where(Reminder.status == "sent"))).one()
    return {
        "first_sent": row[0].timestamp() if row[0] else None,
        "last_sent_at": row[1].timestamp() if row[1] else None,
        "last_recorded": row[2].timestamp() if row[2] else None,
        "max_attempts": row[3],
        "distinct_call_ids": row[4],
    }


async def _truncate(url: str) -> None:
    """Empty the reminders and appointments of `url` (the fence row stays: the leader keeps its term)."""
    from sqlalchemy import text

    async with database(url) as db, db.engine.begin() as connection:
        await connection.execute(text("TRUNCATE call_attempts, reminders, appointments"))


# -- baselines -----------------------------------------------------------------------------------


def _requests(n: int, prefix: str) -> list[Any]:
    from service.providers.generic.client import CallRequest

    body = json.loads(call_body())
    return [
        CallRequest(to=body["to"], from_=body["from"], message=body["message"], appointment_id=str(uuid.uuid4()),
                    reminder_id=f"{prefix}-{i}", idempotency_key=f"{prefix}-{uuid.uuid4()}")
        for i in range(n)
    ]


async def _raw_client(base_url: str, n: int, concurrency: int) -> dict[str, Any]:
    """n POSTs through HttpTelephonyClient with `concurrency` in flight (semaphore inside each task),
    each with a `may_send` check as the dispatcher passes one."""
    from service.providers.generic.client import HttpTelephonyClient, OutcomeKind

    requests = _requests(n, "raw")
    client = HttpTelephonyClient(base_url, max_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    kinds: dict[str, int] = {}

    def may_send() -> bool:
        return True

    async def one(request: Any) -> None:
        async with semaphore:
            outcome = await client.place_call(request, may_send=may_send)
        kinds[outcome.kind.value] = kinds.get(outcome.kind.value, 0) + 1

    try:
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(r) for r in requests))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await client.aclose()
    return {"calls": n, "seconds": round(elapsed, 3), "calls_per_s": round(n / elapsed, 1),
            "client_cores_busy": round(cpu / elapsed, 2), "client_cpu_ms_per_call": round(cpu / n * 1000, 3),
            "sent": kinds.get(OutcomeKind.SENT.value, 0), "outcomes": kinds}


async def _bare_aiohttp(base_url: str, n: int, concurrency: int) -> dict[str, Any]:
    """The same n POSTs (bodies, headers, concurrency) through a bare aiohttp.ClientSession: what
    the HTTP exchange costs without httpx's layer, which HttpTelephonyClient sends through."""
    import aiohttp

    requests = _requests(n, "aiohttp")
    url = f"{base_url}/v1/calls"
    semaphore = asyncio.Semaphore(concurrency)
    statuses: dict[str, int] = {}
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                    timeout=aiohttp.ClientTimeout(total=10))

    async def one(request: Any) -> None:
        body = json.dumps(request.payload(), ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"Accept": "application/json", "Content-Type": "application/json",
                   "Idempotency-Key": request.idempotency_key}
        async with semaphore, session.post(url, data=body, headers=headers) as response:
            await response.json()
        statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1

    try:
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(r) for r in requests))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await session.close()
    return {"calls": n, "seconds": round(elapsed, 3), "calls_per_s": round(n / elapsed, 1),
            "client_cores_busy": round(cpu / elapsed, 2), "client_cpu_ms_per_call": round(cpu / n * 1000, 3),
            "statuses": statuses}


async def _dispatcher_alone(db_url: str, n: int, concurrency: int) -> dict[str, Any]:
    """The service's Dispatcher in this process with a client that answers at once (no HTTP): what
    the claims, the term checks and the batched outcome writes cost per reminder by themselves."""
    from service.config import CallWindow
    from service.dispatch.dispatcher import DispatchConfig, Dispatcher
    from service.providers.generic import GenericProvider
    from service.providers.generic.client import CallOutcome, OutcomeKind

    class InstantClient:
        async def place_call(self, request: Any, *, may_send: Any = None) -> CallOutcome:
            await asyncio.sleep(0)  # one loop iteration, as the shortest real exchange takes
            return CallOutcome(OutcomeKind.SENT, call_id=f"instant-{request.reminder_id}", status_code=201)

        async def aclose(self) -> None:
            pass

    class Term:
        fencing_token = 1

        def __init__(self) -> None:
            self.ended = asyncio.Event()

        def valid(self) -> bool:
            return not self.ended.is_set()

    config = DispatchConfig(instance="bench-alone", caller_id=CALLER_ID,
                            call_window=CallWindow.parse(REPLICA_CALL_WINDOW), misfire_grace=timedelta(hours=1),
                            concurrency=concurrency)
    term = Term()
    async with database(db_url, pool_size=min(50, max(5, concurrency // 2))) as db:
        await db.upgrade()
        await seed(db_url, n, datetime.now(UTC) - timedelta(seconds=1))
        started, cpu = time.perf_counter(), time.process_time()
        leading = asyncio.create_task(Dispatcher(db, GenericProvider(InstantClient()), config).lead(term))
        while (sent := await _count_sent(db)) < n and not leading.done():
            await asyncio.wait({leading}, timeout=0.02)  # poll the count; wake at once if the leader ends
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        term.ended.set()
        await leading
    return {"reminders": n, "sent": sent, "seconds": round(elapsed, 3), "reminders_per_s": round(n / elapsed, 1),
            "cpu_ms_per_reminder": round(cpu / n * 1000, 3)}


async def _sequential(db_url: str, base_url: str, n: int, budget: float) -> dict[str, Any]:
    """The naive cron job: SELECT the due reminders, then for each: call, UPDATE … sent, COMMIT."""
    from sqlalchemy import select, update

    from service.db import Appointment, Reminder
    from service.dispatch.dispatcher import message_for
    from service.ledger import Claim
    from service.providers.generic.client import CallRequest, HttpTelephonyClient, OutcomeKind

    done = sent = 0
    async with database(db_url, pool_size=2) as db, HttpTelephonyClient(base_url) as client:
        await db.upgrade()
        await seed(db_url, n, datetime.now(UTC) - timedelta(seconds=1))
        started = time.perf_counter()
        async with db.session() as session:
            rows = (await session.execute(
                select(Reminder, Appointment).join(Appointment)
                .where(Reminder.status == "pending", Reminder.next_attempt_at <= datetime.now(UTC))
                .order_by(Reminder.next_attempt_at))).all()
        for reminder, appointment in rows:
            if time.perf_counter() - started > budget:
                break
            claim = Claim(reminder_id=reminder.id, appointment_id=appointment.id,
                          idempotency_key=reminder.idempotency_key, due_at=reminder.due_at,
                          scheduled_at=reminder.next_attempt_at, attempts=0, orphaned=False, phone=appointment.phone,
                          customer_name=appointment.customer_name, starts_at=appointment.starts_at,
                          timezone=appointment.timezone, appointment_cancelled=False, wording=reminder.wording)
            outcome = await client.place_call(CallRequest(
                to=claim.phone, from_=CALLER_ID, message=message_for(claim), appointment_id=claim.appointment_id,
                reminder_id=claim.reminder_id, idempotency_key=claim.idempotency_key))
            async with db.session() as session:
                await session.execute(update(Reminder).where(Reminder.id == reminder.id).values(
                    status="sent" if outcome.kind is OutcomeKind.SENT else "failed", attempts=1,
                    provider_call_id=outcome.call_id, sent_at=datetime.now(UTC), updated_at=datetime.now(UTC)))
                await session.commit()
            done += 1
            sent += outcome.kind is OutcomeKind.SENT
        elapsed = time.perf_counter() - started
    rate = done / elapsed
    return {"calls": done, "sent": sent, "seconds": round(elapsed, 3), "calls_per_s": round(rate, 1),
            "time_boxed_s": budget, "extrapolated_s_for_10000": round(N_REMINDERS / rate, 1)}


def _postmaster_pid(pg: PostgresServer) -> int | None:
    try:
        with open(f"{pg.data_dir}/postmaster.pid") as handle:
            return int(handle.readline())
    except (OSError, ValueError):
        return None


def _cpu(replica: int, provider: int | None, postmaster: int | None) -> dict[str, float]:
    return {
        "replica": cpu_seconds(replica) or 0.0,
        "provider": (cpu_seconds(provider) or 0.0) if provider else 0.0,
        "postgresql": tree_cpu_seconds(postmaster) if postmaster else 0.0,
    }


# -- one latency ---------------------------------------------------------------------------------


def _median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median `key` (the lower middle of an even count), with every run's `key`
    and their range beside it: the figure reported, and how much it moved."""
    ordered = sorted(runs, key=lambda r: r.get(key) or 0.0)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    values = [r.get(key) for r in runs]
    chosen["runs"] = len(runs)
    chosen[f"{key}_all"] = values
    present = [v for v in values if v is not None]
    chosen[f"{key}_range"] = [min(present), max(present)] if present else None
    return chosen


def _service_run(pg: PostgresServer, db_url: str, replica: Any, provider: Any, latency_ms: int) -> dict[str, Any]:
    """Commit N_REMINDERS due reminders, wait until all are sent, and measure the leader doing it."""
    asyncio.run(_truncate(db_url))
    provider.client.reset()
    rss_idle = rss_mb(replica.pid)
    due_at = datetime.now(UTC)
    postmaster = _postmaster_pid(pg)
    seeding = time.time()
    committed = asyncio.run(seed(db_url, N_REMINDERS, due_at))
    cpu_before = _cpu(replica.pid, provider.pid, postmaster)
    seen_all, _counts = asyncio.run(_wait_all_sent(db_url, N_REMINDERS, timeout=180))
    cpu_after = _cpu(replica.pid, provider.pid, postmaster)
    time.sleep(0.3)  # let the last HTTP exchanges settle before reading the provider's log
    span = asyncio.run(_sent_span(db_url))
    statuses = asyncio.run(_status_counts(db_url))
    peak = peak_rss_mb(replica.pid)
    requests = [r for r in provider.client.requests() if r["placed_by"] == replica.name]
    calls = provider.client.calls(placed_by=replica.name)
    first_call = min((r["received_at"] for r in requests), default=None)
    last = span["last_recorded"] or span["last_sent_at"]
    service: dict[str, Any] = {
        "all_sent": seen_all is not None,
        "statuses": statuses,
        "replica_rss_idle_mb": rss_idle,
        "replica_peak_rss_mb": peak,
        "provider_requests": len(requests),
        "provider_calls": len(calls),
        "distinct_keys_called": len({c["idempotency_key"] for c in calls}),
        "replayed_requests": sum(1 for r in requests if r["replayed"]),
        "max_attempts": span["max_attempts"],
        "seed_s": round(committed - seeding, 3),  # planning and inserting the reminders, before the commit
    }
    if first_call and last:
        service["first_call_to_last_sent_s"] = round(last - first_call, 3)
        service["calls_per_s"] = round(N_REMINDERS / (last - first_call), 1)
        service["commit_to_first_call_s"] = round(first_call - committed, 3)
        service["commit_to_all_sent_s"] = round(last - committed, 3)
    if seen_all:
        service["commit_to_all_sent_observed_s"] = round(seen_all - committed, 3)
        wall = seen_all - committed
        # CPU seconds each process used while the 10,000 were dispatched, per second of wall
        # time: 1.0 = one core busy all along (the machine has 2).
        service["cores_busy"] = {name: round((cpu_after[name] - cpu_before[name]) / wall, 2) for name in cpu_after}
    log(f"[{latency_ms} ms] service: {service.get('calls_per_s')} calls/s end-to-end, all sent "
        f"{service.get('commit_to_all_sent_s')} s after commit, peak RSS {peak} MB")
    return service


def run_latency(
    pg: PostgresServer, etcd: EtcdServer, latency_ms: int, concurrency: int, quick: bool, repeats: int = 3
) -> dict[str, Any]:
    """One provider latency: the provider's ceiling once, then `repeats` rounds of (raw client,
    bare aiohttp client, dispatcher alone at 0 ms, the service), each figure the median round's."""
    tag = f"{latency_ms}ms_{uuid.uuid4().hex[:6]}"
    db_url = pg.create_database(f"dispatch_{tag}")
    seq_url = pg.create_database(f"sequential_{tag}")
    env = {"DISPATCH_CONCURRENCY": str(concurrency), "LOG_LEVEL": "info"}
    result: dict[str, Any] = {"latency_ms": latency_ms, "concurrency": concurrency, "reminders": N_REMINDERS}
    repeats = 1 if quick else repeats
    with Cluster(1, database_url=db_url, etcd_endpoint=etcd.endpoint, provider_latency_ms=latency_ms,
                 lease_ttl=10, env=env) as cluster:
        leader = cluster.leader()
        replica = cluster.replica(leader)
        provider = cluster.provider
        assert provider is not None and replica.pid is not None

        log(f"[{latency_ms} ms] provider ceiling ({'3' if quick else '5'} s of POSTs at {concurrency} connections)")
        provider.client.reset()
        result["provider_ceiling"] = run_load(f"{provider.url}/v1/calls", method="POST", connections=concurrency,
                                              duration=3 if quick else 5, body=call_body(), unique_key=True)
        provider.client.reset()
        if result["provider_ceiling"]["tool"] != "aiohttp":
            log(f"[{latency_ms} ms] provider ceiling with the aiohttp generator too")
            result["provider_ceiling_aiohttp"] = run_load(
                f"{provider.url}/v1/calls", method="POST", connections=concurrency, duration=3 if quick else 5,
                body=call_body(), unique_key=True, tool="aiohttp")
            provider.client.reset()

        budget = 3.0 if quick else 6.0
        log(f"[{latency_ms} ms] sequential loop (time-boxed to {budget:.0f} s)")
        result["sequential"] = asyncio.run(_sequential(seq_url, f"{provider.url}/bench-seq",
                                                       N_REMINDERS if latency_ms == 0 else 200, budget))
        provider.client.reset()

        raw, bare, alone, service = [], [], [], []
        for round_ in range(1, repeats + 1):
            log(f"[{latency_ms} ms] round {round_}/{repeats}: raw client "
                f"({N_REMINDERS} POSTs, {concurrency} in flight, no DB)")
            raw.append(asyncio.run(_raw_client(f"{provider.url}/bench-raw", N_REMINDERS, concurrency)))
            provider.client.reset()
            log(f"[{latency_ms} ms] round {round_}/{repeats}: bare aiohttp client")
            bare.append(asyncio.run(_bare_aiohttp(f"{provider.url}/bench-aiohttp", N_REMINDERS, concurrency)))
            provider.client.reset()
            if latency_ms == 0:
                log(f"[{latency_ms} ms] round {round_}/{repeats}: dispatcher alone (a client that answers at once)")
                alone.append(asyncio.run(
                    _dispatcher_alone(pg.create_database(f"alone_{tag}_{round_}"), N_REMINDERS, concurrency)))
            log(f"[{latency_ms} ms] round {round_}/{repeats}: service, {N_REMINDERS} due reminders committed at once")
            service.append(_service_run(pg, db_url, replica, provider, latency_ms))
        result["raw_client"] = _median_run(raw, "calls_per_s")
        result["bare_aiohttp_client"] = _median_run(bare, "calls_per_s")
        if alone:
            result["dispatcher_alone"] = _median_run(alone, "reminders_per_s")
        result["service"] = _median_run(service, "calls_per_s")
        result["service"]["commit_to_all_sent_s_all"] = [s.get("commit_to_all_sent_s") for s in service]
        result["service"]["replica_rss_idle_mb"] = service[0]["replica_rss_idle_mb"]  # before any round dispatched
        result["service"]["exactly_once_every_run"] = all(
            s["provider_calls"] == s["distinct_keys_called"] == N_REMINDERS
            and s.get("statuses", {}).get("sent") == N_REMINDERS for s in service)
    return result


async def _server_version(url: str) -> str:
    from sqlalchemy import text

    async with database(url) as db, db.engine.connect() as connection:
        return str((await connection.execute(text("SHOW server_version"))).scalar_one())


def service_defaults() -> dict[str, Any]:
    """The service's defaults the report explains the figures with (DispatchConfig, Settings)."""
    from dataclasses import fields

    from service.config import Settings
    from service.dispatch.dispatcher import DispatchConfig

    record_batch = next(f.default for f in fields(DispatchConfig) if f.name == "record_batch")
    return {"record_batch": record_batch, "dispatch_concurrency": Settings.model_fields["dispatch_concurrency"].default}


def run(quick: bool = False, concurrency: int = 400, latencies: tuple[int, ...] = (0, 100)) -> dict[str, Any]:
    with EtcdServer() as etcd, PostgresServer() as pg:
        version = asyncio.run(_server_version(pg.create_database(f"version_{uuid.uuid4().hex[:6]}")))
        runs = [run_latency(pg, etcd, latency, concurrency, quick) for latency in latencies]
    return {"runs": runs, "postgresql": version, "service_defaults": service_defaults()}
