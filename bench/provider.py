"""A real provider's call at the cost of its webhooks: `python -m bench provider --mode twilio|telnyx`.

Issue 26's measuring tool, in one invocation per mode (bench/results/provider_<mode>.json):

1. **The provider's path.** Three `reminders serve` replicas (harness.cluster.Cluster) on
   PostgreSQL, in Twilio or Telnyx mode against its fake (0 ms per REST request, no rate limit of
   its own, no ring, speech and machine detection at once), their webhooks through the front that
   strips PUBLIC_URL's prefix (harness/webhook_proxy.py, which counts them); every reminder its own
   number, whose scripted callee answers at once and presses 1; EVENTS_URL at a verifying receiver
   (harness/events_receiver.py) and the caps per number on, high enough to hold nobody back.
   - a first warm-up burst (`CALIBRATION` reminders at once, not counted): the CPU per call of every
     process on the machine gives the calls/s its cores would carry; the provider account's rate
     (CALLS_PER_SECOND on every replica, as an operator sets it to the account's) is set to
     `_HEADROOM` of that (`--rate` sets it instead; 0: none). Without a rate, N calls answered at
     once queue their webhooks behind each other past the providers' timeouts (Twilio's status
     callbacks retried and given up, voice requests sent to the fallback, Telnyx's events
     delivered again): the run then measures that spiral, and never ends once final events are
     given up — issue 26's burst problem, not a webhook's cost;
   - a second warm-up at that rate (not counted), then the replicas idle for as long as the run is
     expected to last: their CPU (utime + stime of each replica and its children, /proc) per second
     is what is subtracted from the run's;
   - the run: N reminders (2,000 by default) committed due at once. Measured: first create the
     fake received → last call attempt recorded over (calls/s end to end); the replicas' CPU from
     before the commit until every call is over and every event delivered, less the idle rate over
     the same time (per call, per webhook = all of it ÷ the webhooks, and the followers' alone ÷
     theirs: they answer webhooks only); webhooks per call and p50/p99 of each webhook route at the
     front (the time to the replica's answer); database statements per call from PostgreSQL's
     pg_stat_statements (the replicas' role only: the bench's own queries run as another role) and
     per route from the replicas' own count (bench/statements.py, enabled by BENCH_STATEMENTS=1,
     which only this bench sets);
   - every reminder heard exactly once: the chaos harness's promise (`harness.chaos_providers.judge`)
     on the fake's record and the database's rows, and every appointment confirmed — else the
     run fails;
   - `GET /appointments/{id}` on one follower under wrk (16 connections, over the run's
     appointments, after ANALYZE and a warm-up): its CPU per request, idle subtracted; and again
     paced at the rate that follower answered webhooks in the run (the aiohttp generator, 4
     connections): a request's CPU depends on the load it comes in, and that GET is the one
     measured at the webhooks' own load (three runs of 8 s, their median: one run's figure moved
     by a third from one to the next);
   - py-spy on the other follower (webhooks only, no dispatch) and on the leader (the dispatch,
     the events relay, the sweeps and its share of the webhooks) through another burst: where a
     webhook's CPU goes, and where the rest of a call's (inclusive and own time per function).
2. **The generic path.** The same three replicas' settings with TELEPHONY_PROVIDER=generic against
   the generic fake (same PostgreSQL server, a database of its own), no rate (its calls have no
   webhooks to back up), the same warm-up, idle interval and N: calls/s end to end (first create →
   last `sent`) and CPU per call.

The ratios issue 26 is judged by: CPU per webhook ÷ CPU per GET (≤ 3) and CPU per call ÷ CPU per
GET against (webhooks per call + 2), each against the GET flat out and paced.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness.cluster import Cluster, ReplicaProcess, _LoopThread, planned_appointments
from harness.etcd import EtcdServer
from harness.ports import free_port
from harness.postgres import PostgresServer

from .common import ROOT, loadavg, log, percentile, tree_cpu_seconds, wait_until
from .loadgen import run_load
from .profile import NAMED, summarise
from .seeding import database
from .statements import ENV

MODES = ("twilio", "telnyx")
REPLICAS = 3
N_REMINDERS, QUICK_REMINDERS = 2000, 300
CONCURRENCY = 400  # DISPATCH_CONCURRENCY, as the dispatch benchmark runs it
LEASE_TTL = 10
# caps per number on (their check runs for every call) and far above the one call each number gets
CAPS = {"MAX_CALLS_PER_NUMBER_PER_DAY": "10", "MAX_CALLS_PER_NUMBER_PER_WEEK": "20"}
# the fakes' controls: no REST latency, no rate, the callee answers at once, speech and detection instant
FAKE_CONTROLS = {"latency_ms": 0.0, "calls_per_second": 0.0, "ring_ms": 0.0, "speak_ms": 0.0, "detection_ms": 0.0}
CALLEE = {"behaviour": "answer", "digits": "1", "ring_ms": 0.0}
# the webhook that ends a call (its final status), by mode: the run is over when each call's came back
FINAL = {"twilio": ("twilio/status:completed",), "telnyx": ("telnyx/events:call.hangup",)}
# each phase's numbers (harness.chaos_providers.number): its own range
WARMUP_FROM, PACED_WARMUP_FROM, RUN_FROM, PROFILE_FROM = 0, 50_000, 100_000, 200_000
GET_CONNECTIONS, GET_WARMUP_S = 16, 2
# the paced GET: as few connections as the front keeps busy at that rate, long enough for a few hundred
GET_PACED_CONNECTIONS, GET_PACED_MIN_S = 4, 8.0
# its CPU per request moves by a third from one 8 s run to the next at so low a rate: the median of three
GET_PACED_ROUNDS = 3
PROFILE_RATE = 200  # py-spy samples per second (bench/profile.py's)
BENCH_ROLE = "bench"  # the bench's own connections: not counted by pg_stat_statements' filter
HOOKS = ROOT / "bench" / "replica_hooks"


# -- the database -------------------------------------------------------------------------------


def _bench_url(url: str) -> str:
    return url.replace("postgresql+asyncpg://postgres@", f"postgresql+asyncpg://{BENCH_ROLE}@")


async def _sql(url: str, *statements: str) -> list[Any]:
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=10)
    try:
        return [await connection.fetch(statement, timeout=60) for statement in statements]
    finally:
        await connection.close()


async def _seed(bench_url: str, first: int, count: int) -> tuple[float, list[str], list[str]]:
    """`count` appointments, the i-th with number `number(first + i)` and one reminder due now, as
    the API plans them (harness.cluster.planned_appointments), committed in ONE transaction.
    Returns (time.time() after the commit, appointment ids, reminder ids)."""
    from harness.chaos_providers import number
    from service.db import Appointment, Reminder
    from service.ledger.consent import phone_hasher
    from service.ledger.plans import APPOINTMENT_INSERT_COLUMNS

    plans = planned_appointments(count, due_in_seconds=0.0, spread_seconds=0.0, starts_in_seconds=7200.0,
                                 timezone="UTC", phone=lambda i: number(first + i))
    async with database(bench_url) as db:
        hasher = await phone_hasher(db)
        appointments = [{**{k: a[k] for k in APPOINTMENT_INSERT_COLUMNS}, "phone_hash": hasher(a["phone"])}
                        for a, _ in plans]
        reminders = [r for _, rows in plans for r in rows]
        async with db.engine.begin() as connection:
            await connection.execute(Appointment.__table__.insert(), appointments)
            await connection.execute(Reminder.__table__.insert(), reminders)
        return time.time(), [a["id"] for a in appointments], [r["id"] for r in reminders]


async def _progress(bench_url: str, reminder_ids: list[str]) -> dict[str, Any]:
    """The burst's reminders by status, its call attempts (how many, how many not ended, when the
    last was recorded), whether every appointment has its callee's answer, and the events not yet
    delivered (all of them, the warm-up's too)."""
    from sqlalchemy import func, select

    from service.db import Appointment, CallAttempt, Reminder
    from service.db.models import Event

    async with database(bench_url) as db, db.session() as session:
        statuses = dict((await session.execute(
            select(Reminder.status, func.count()).where(Reminder.id.in_(reminder_ids))
            .group_by(Reminder.status))).all())
        last_reminder = (await session.execute(select(func.max(Reminder.updated_at))
                                               .where(Reminder.id.in_(reminder_ids)))).scalar_one()
        attempts, open_, last_attempt = (await session.execute(
            select(func.count(), func.count().filter(CallAttempt.ended_at.is_(None)), func.max(CallAttempt.updated_at))
            .where(CallAttempt.reminder_id.in_(reminder_ids)))).one()
        unanswered = (await session.execute(
            select(func.count()).select_from(Reminder).join(Appointment)
            .where(Reminder.id.in_(reminder_ids), Appointment.confirmation.is_(None)))).scalar_one()
        pending = (await session.execute(select(func.count()).select_from(Event)
                                         .where(Event.delivery == "pending"))).scalar_one()
    return {"statuses": {str(k): v for k, v in statuses.items()}, "events_pending": pending,
            "attempts": attempts, "attempts_open": open_, "unconfirmed": unanswered,
            "last_reminder_recorded": last_reminder.timestamp() if last_reminder else None,
            "last_attempt_recorded": last_attempt.timestamp() if last_attempt else None}


async def _pg_statements(bench_url: str, dbname: str) -> dict[str, Any]:
    """What pg_stat_statements counted for the replicas' role in `dbname` since its last reset:
    statements (executions) other than transaction control, BEGINs, COMMITs and ROLLBACKs, and the
    most executed statements."""
    rows = (await _sql(bench_url, f"""
        SELECT s.calls, s.query FROM pg_stat_statements s
        JOIN pg_roles r ON r.oid = s.userid JOIN pg_database d ON d.oid = s.dbid
        WHERE r.rolname = 'postgres' AND d.datname = '{dbname}' ORDER BY s.calls DESC"""))[0]
    control: Counter[str] = Counter()
    statements, top = 0, []
    for row in rows:
        word = row["query"].split(None, 1)[0].upper() if row["query"].strip() else ""
        if word in ("BEGIN", "COMMIT", "ROLLBACK", "START", "END"):
            control[word] += row["calls"]
            continue
        statements += row["calls"]
        if len(top) < 12:
            top.append([row["calls"], " ".join(row["query"].split())[:160]])
    return {"statements": statements, "begin": control["BEGIN"] + control["START"],
            "commit": control["COMMIT"] + control["END"], "rollback": control["ROLLBACK"], "top": top}


async def _reset_pg_statements(bench_url: str) -> None:
    await _sql(bench_url, "SELECT pg_stat_statements_reset()")


def _prepare_database(pg: PostgresServer, name: str) -> tuple[str, str]:
    """A database for one cluster with pg_stat_statements in it; (replicas' URL, the bench role's URL)."""
    url = pg.create_database(name)
    asyncio.run(_sql(url, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
    return url, _bench_url(url)


# -- the processes' CPU -------------------------------------------------------------------------


def _cpu(replicas: list[ReplicaProcess]) -> dict[str, float]:
    return {r.name: tree_cpu_seconds(r.pid) for r in replicas if r.pid is not None}


def _postmaster(pg: PostgresServer) -> int | None:
    try:
        return int(Path(pg.data_dir, "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _others_cpu(cluster: Cluster, pg: PostgresServer) -> dict[str, float]:
    """CPU seconds so far of what runs beside the replicas: PostgreSQL, the fake, the front."""
    out = {}
    postmaster = _postmaster(pg)
    if postmaster:
        out["postgresql"] = tree_cpu_seconds(postmaster)
    for name, process in (("fake", cluster.provider), ("front", cluster.webhook_proxy)):
        if process is not None and process.pid is not None:
            out[name] = tree_cpu_seconds(process.pid)
    return out


def _idle(replicas: list[ReplicaProcess], seconds: float) -> dict[str, Any]:
    """Each replica's CPU per wall second (cores) over `seconds` of doing nothing asked of it."""
    before, started = _cpu(replicas), time.monotonic()
    time.sleep(seconds)
    after, wall = _cpu(replicas), time.monotonic() - started
    cores = {name: (after[name] - before[name]) / wall for name in after}
    return {"seconds": round(wall, 2), "cores": {k: round(v, 5) for k, v in cores.items()},
            "total_cores": round(sum(cores.values()), 5)}


# -- the replicas' own counts -----------------------------------------------------------------------


def _replica_counts(replicas: list[ReplicaProcess]) -> dict[str, Counter[str]]:
    """bench/statements.py's counters, summed over the replicas: kind → route label → count."""
    found = {"statements": Counter(), "transactions": Counter(), "requests": Counter()}
    pattern = re.compile(r'^reminders_bench_(statements|transactions|requests)_total\{route="(.*)"\}$')
    for replica in replicas:
        for name, value in replica.metrics().items():
            matched = pattern.match(name)
            if matched:
                found[matched.group(1)][matched.group(2)] += value
    return found


def _delta(after: dict[str, Counter[str]], before: dict[str, Counter[str]]) -> dict[str, Counter[str]]:
    return {kind: Counter({k: v - before[kind].get(k, 0) for k, v in counts.items() if v - before[kind].get(k, 0)})
            for kind, counts in after.items()}


# -- the events receiver ----------------------------------------------------------------------------


class _Events:
    """harness.events_receiver.Receiver in a thread of its own: verifies each delivery, answers 200."""

    def __init__(self) -> None:
        import secrets
        from base64 import b64encode

        from harness.events_receiver import Receiver

        self.secret = "whsec_" + b64encode(secrets.token_bytes(24)).decode()
        self.receiver = Receiver(self.secret, free_port())
        self._thread = _LoopThread("bench-events")

    def __enter__(self) -> _Events:
        self._thread.run(self.receiver.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._thread.run(self.receiver.stop())
        finally:
            self._thread.close()

    @property
    def delivered(self) -> int:
        return len(self.receiver.deliveries)

    def env(self) -> dict[str, str]:
        return {"EVENTS_URL": self.receiver.url, "EVENTS_SECRET": self.secret}


# -- one burst --------------------------------------------------------------------------------------


def _settings(concurrency: int, events: _Events) -> dict[str, str]:
    """Every replica's settings beyond the cluster's own (both paths alike; LOG_LEVEL left at the
    service's default, `info`, as a deployment runs), and the bench's statement counter."""
    return {"DISPATCH_CONCURRENCY": str(concurrency), **CAPS, **events.env(), ENV: "1",
            "PYTHONPATH": f"{HOOKS}{os.pathsep}{ROOT}"}


def _shown(settings: dict[str, str]) -> dict[str, str]:
    """The settings as the result records them: the secret and the receiver's port left out."""
    return {k: v for k, v in settings.items() if k not in ("EVENTS_SECRET", "EVENTS_URL", "PYTHONPATH")}


def _reset_fake(cluster: Cluster, first: int, count: int) -> None:
    """The real provider's fake emptied (calls, creates), its controls and the burst's callees set."""
    from harness.chaos_providers import number

    assert cluster.provider is not None
    client = cluster.provider.client
    client.reset()
    client.control(**FAKE_CONTROLS)  # type: ignore[call-arg]
    client.callees({number(first + i): dict(CALLEE) for i in range(count)})  # type: ignore[attr-defined]


def _final_count(stats: dict[str, Any], mode: str) -> int:
    return sum(stats["counts"].get(label, 0) for label in FINAL[mode])


def _wait_over(cluster: Cluster, mode: str | None, bench_url: str, reminder_ids: list[str], timeout: float,
               events: _Events) -> dict[str, Any]:
    """Until every call of the burst is over — as many final webhooks answered at the front as
    calls (redeliveries count there too), then in the database every call attempt ended; the
    generic path: every reminder `sent` — and every event delivered."""
    count = len(reminder_ids)
    if mode is not None:
        assert cluster.webhook_proxy is not None
        front = cluster.webhook_proxy
        wait_until(lambda: _final_count(front.stats(), mode) >= count, timeout=timeout,
                   what=f"{count} calls' final webhooks", interval=0.2)

    def finished() -> dict[str, Any] | None:
        progress = asyncio.run(_progress(bench_url, reminder_ids))
        open_ = sum(n for status, n in progress["statuses"].items() if status in ("pending", "dispatching"))
        calls_over = mode is None or (progress["attempts"] >= count and not progress["attempts_open"])
        return progress if calls_over and not open_ and not progress["events_pending"] else None

    progress = wait_until(finished, timeout=timeout, what="every reminder finished and its events delivered",
                          interval=0.1)
    progress["events_delivered_total"] = events.delivered
    return progress


def _burst(cluster: Cluster, pg: PostgresServer, mode: str | None, bench_url: str, first: int, count: int,
           events: _Events, *, during: Any = None) -> dict[str, Any]:
    """Commit `count` due reminders and wait until they are done; the replicas' CPU (raw) and the
    others' over it, the times that bound it, and what `during(commit_time)` returned (a profile)."""
    if mode is not None:
        _reset_fake(cluster, first, count)
        assert cluster.webhook_proxy is not None
        cluster.webhook_proxy.record_stats(True)
    else:
        assert cluster.provider is not None
        cluster.provider.client.reset()
    replicas = cluster.live_replicas()
    others_before, cpu_before, started = _others_cpu(cluster, pg), _cpu(replicas), time.monotonic()
    bench_before = time.process_time()
    load = loadavg()
    committed, appointment_ids, reminder_ids = asyncio.run(_seed(bench_url, first, count))
    outcome: dict[str, Any] = {}
    watcher = None
    if during is not None:
        watcher = threading.Thread(target=lambda: outcome.update(during(committed)), name="bench-during")
        watcher.start()
    progress = _wait_over(cluster, mode, bench_url, reminder_ids, max(180.0, count / 2), events)
    cpu_after, wall = _cpu(replicas), time.monotonic() - started
    others_after = {**_others_cpu(cluster, pg), "bench": time.process_time()}
    others_before["bench"] = bench_before
    if watcher is not None:
        watcher.join(120)
    return {"reminders": count, "appointment_ids": appointment_ids, "reminder_ids": reminder_ids,
            "committed": committed, "loadavg_at_start": load, "cpu_interval_s": wall,
            "cpu_s": {name: cpu_after[name] - cpu_before[name] for name in cpu_after},
            "others_cpu_s": {name: others_after[name] - others_before.get(name, 0.0) for name in others_after},
            "progress": progress, "during": outcome}


def _net_cpu(burst: dict[str, Any], idle: dict[str, Any]) -> dict[str, float]:
    """Each replica's CPU over the burst less its idle rate over the same time (seconds)."""
    return {name: used - idle["cores"].get(name, 0.0) * burst["cpu_interval_s"]
            for name, used in burst["cpu_s"].items()}


def _first_create(cluster: Cluster) -> float | None:
    assert cluster.provider is not None
    return min((r["received_at"] for r in cluster.provider.client.requests()), default=None)


def _warm_rate(burst: dict[str, Any], end: float | None, first: float | None) -> float | None:
    return round(burst["reminders"] / (end - first), 1) if end and first and end > first else None


def _pace(warm: dict[str, Any], cores: int) -> dict[str, Any]:
    """The rate the provider's account is given (CALLS_PER_SECOND on every replica): `_HEADROOM` of
    the calls/s this machine's cores would carry at the warm-up's CPU per call of every process on
    it (the replicas, PostgreSQL, the fake, the front, this bench and its events receiver)."""
    used = sum(warm["cpu_s"].values()) + sum(warm["others_cpu_s"].values())
    per_call = used / warm["reminders"]
    ceiling = cores / per_call if per_call else None
    return {"cpu_ms_per_call_all_processes": round(per_call * 1000, 3), "cores": cores,
            "ceiling_calls_per_s": round(ceiling, 1) if ceiling else None, "headroom": _HEADROOM,
            "calls_per_s": round(max(1.0, _HEADROOM * ceiling), 1) if ceiling else None}


_HEADROOM = 0.8
CALIBRATION = 100  # the first warm-up's reminders when the rate is measured: a burst that does not back up


def _idle_seconds(count: int, rate: float | None, quick: bool) -> float:
    """How long the idle interval lasts: the measured run's length as the warm-up's rate estimates it."""
    low, high = (3.0, 20.0) if quick else (5.0, 90.0)
    return min(high, max(low, count / rate if rate else high))


# -- the figures ------------------------------------------------------------------------------------


def _latency(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {"p50_ms": percentile(ordered, 50), "p90_ms": percentile(ordered, 90), "p99_ms": percentile(ordered, 99),
            "max_ms": ordered[-1] if ordered else None}


def _routes(front: dict[str, Any], counts: dict[str, Counter[str]], calls: int) -> dict[str, dict[str, Any]]:
    """Per webhook label and per route (the path: the labels before their `:`): answers at the
    front per call, latency there, non-2xx, and the replicas' statements and transactions per request."""
    groups: dict[str, list[str]] = {}
    for label in front["counts"]:
        groups.setdefault(label, []).append(label)
        if ":" in label:
            groups.setdefault(label.split(":", 1)[0] + " (all)", []).append(label)
    out = {}
    for key, labels in sorted(groups.items()):
        answered = sum(front["counts"][label] for label in labels)
        statuses: Counter[str] = Counter()
        for label in labels:
            statuses.update(front["statuses"].get(label, {}))
        requests = sum(counts["requests"].get(label, 0) for label in labels)
        out[key] = {
            "webhooks": answered, "per_call": round(answered / calls, 3),
            **_latency([v for label in labels for v in front["latencies_ms"].get(label, [])]),
            "non_2xx": sum(n for status, n in statuses.items() if not status.startswith("2")),
            "replica_requests": requests,
            "statements_per_request": (round(sum(counts["statements"].get(label, 0) for label in labels)
                                             / requests, 2) if requests else None),
            "transactions_per_request": (round(sum(counts["transactions"].get(label, 0) for label in labels)
                                               / requests, 2) if requests else None),
        }
    return out


def _statements(pg_counts: dict[str, Any], counts: dict[str, Counter[str]], calls: int) -> dict[str, Any]:
    background = {label: n for label, n in counts["statements"].items() if label.startswith("background")}
    return {
        "pg_stat_statements": {**pg_counts, "per_call": round(pg_counts["statements"] / calls, 2),
                               "transactions_per_call": round((pg_counts["commit"] + pg_counts["rollback"]) / calls,
                                                              2)},
        "sqlalchemy_per_call": round(sum(counts["statements"].values()) / calls, 2),
        "sqlalchemy_by_label": dict(sorted(counts["statements"].items(), key=lambda kv: -kv[1])),
        "transactions_by_label": dict(sorted(counts["transactions"].items(), key=lambda kv: -kv[1])),
        "background_per_call": round(sum(background.values()) / calls, 2),
    }


def _heard_once(cluster: Cluster, mode: str, burst: dict[str, Any]) -> dict[str, Any]:
    """The chaos harness's promise on the burst (harness.chaos_providers.judge: every person heard
    the message exactly once, on its reminder's bound call, every reminder `sent` and `answered`,
    no extra call beyond those in doubt) and every appointment confirmed by its callee's 1."""
    from harness.chaos_providers import MODES as CHAOS_MODES
    from harness.chaos_providers import PERSON, ProviderFaults, ProviderRun, judge, number

    assert cluster.provider is not None
    ids, appointment_ids = set(burst["reminder_ids"]), set(burst["appointment_ids"])
    run = ProviderRun(CHAOS_MODES[mode], ProviderFaults(), scenario="bench")
    run.kinds = {number(RUN_FROM + i): PERSON for i in range(burst["reminders"])}
    rows = [r for r in cluster.reminders() if r["id"] in ids]
    appointments = {a["id"]: a for a in cluster.appointments() if a["id"] in appointment_ids}
    calls = [c for c in cluster.provider.client.calls() if c["stamp"].get("r") in ids]
    attempts = [a for a in cluster.call_attempts() if a["reminder_id"] in ids]
    result = judge("bench", rows, appointments, calls, attempts, run)
    confirmations = Counter(str(a.get("confirmation")) for a in appointments.values())
    violations = list(result.violations)
    if confirmations.get("confirmed", 0) != len(appointment_ids):
        violations.append(f"appointments not all confirmed by their callee's 1: {dict(confirmations)}")
    if len(rows) != len(ids):
        violations.append(f"{len(ids) - len(rows)} reminder(s) of the burst not found")
    deliveries = [d for c in calls for d in c.get("deliveries", [])]
    return {"reminders": len(rows), "calls": len(calls), "duplicates": result.duplicates, "misses": result.misses,
            "extra_calls": result.redundant, "confirmed": confirmations.get("confirmed", 0),
            "event_deliveries": len(deliveries),
            "event_redeliveries": sum(1 for d in deliveries if (d.get("attempt") or 1) > 1),
            "violations": violations}


def _generic_once(cluster: Cluster, burst: dict[str, Any]) -> dict[str, Any]:
    """The generic path's promise: one call per reminder (its idempotency key), every reminder `sent`."""
    assert cluster.provider is not None
    calls = cluster.provider.client.calls()
    keys = Counter(c["idempotency_key"] for c in calls)
    statuses = burst["progress"]["statuses"]
    violations = []
    if len(keys) != burst["reminders"] or any(n != 1 for n in keys.values()):
        violations.append(f"{len(calls)} calls for {len(keys)} keys; {burst['reminders']} reminders")
    if statuses.get("sent") != burst["reminders"]:
        violations.append(f"reminders not all sent: {statuses}")
    return {"calls": len(calls), "distinct_keys": len(keys), "violations": violations}


# -- GET /appointments/{id} -------------------------------------------------------------------------


def _get_cost(replica: ReplicaProcess, idle: dict[str, Any], ids: list[str], duration: float,
              database_url: str, webhook_rate: float | None) -> dict[str, Any]:
    """One replica's GET /appointments/{id} over `ids`, its CPU per request, idle subtracted: flat
    out (wrk), and paced at `webhook_rate` (the requests/s the replica answered webhooks at in the
    run): a request's CPU depends on the load it comes in (at a low rate each one wakes the event
    loop and the database connection alone), so the paced GET is the like-for-like one."""
    from .api import analyze

    analyze(database_url)
    url = f"{replica.url}/appointments/{{id}}"
    run_load(url, connections=GET_CONNECTIONS, duration=GET_WARMUP_S, ids=ids, tool="wrk")
    load, wall, used, net = _get_load(replica, idle, url, ids, duration, tool="wrk")
    result = {"replica": replica.name, "connections": GET_CONNECTIONS, "warmup_s": GET_WARMUP_S, "load": load,
              "cpu_interval_s": round(wall, 3), "cpu_s": round(used, 3),
              "cpu_ms_per_get": round(net / load["requests"] * 1000, 4) if load["requests"] else None}
    if webhook_rate and webhook_rate >= 1.0:
        rate = round(webhook_rate, 1)
        rounds = []
        for _ in range(GET_PACED_ROUNDS):
            paced, wall, used, net = _get_load(replica, idle, url, ids, max(duration, GET_PACED_MIN_S),
                                               connections=GET_PACED_CONNECTIONS, rate=rate)
            rounds.append({"load": paced, "cpu_interval_s": round(wall, 3), "cpu_s": round(used, 3),
                           "cpu_ms_per_get": round(net / paced["requests"] * 1000, 4) if paced["requests"] else None})
        measured = sorted((r for r in rounds if r["cpu_ms_per_get"]), key=lambda r: r["cpu_ms_per_get"])
        median = measured[len(measured) // 2] if measured else rounds[0]
        result["paced"] = {"rate": rate, "connections": GET_PACED_CONNECTIONS, **median,
                           "rounds_cpu_ms_per_get": [r["cpu_ms_per_get"] for r in rounds]}
    return result


def _get_load(replica: ReplicaProcess, idle: dict[str, Any], url: str, ids: list[str], duration: float,
              **options: Any) -> tuple[dict[str, Any], float, float, float]:
    """(the load's figures, its wall time, the replica's CPU over it, that CPU less the idle rate's)."""
    before, started = tree_cpu_seconds(replica.pid or 0), time.monotonic()
    load = run_load(url, duration=duration, ids=ids, **{"connections": GET_CONNECTIONS, **options})
    used, wall = tree_cpu_seconds(replica.pid or 0) - before, time.monotonic() - started
    return load, wall, used, used - idle["cores"].get(replica.name, 0.0) * wall


# -- the profile ------------------------------------------------------------------------------------


def _py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def inclusive(raw: str, top: int = 20) -> dict[str, Any]:
    """py-spy's raw stacks (one line per stack: frames root first, `;`-separated, then a count) as
    shares of the busy samples, in percent: the functions with the most samples on the stack (own +
    children; each function once per stack, whatever its line), their own share beside; the same
    for the service's own functions; and the three places the samples are in: the event loop's
    own C code (uvloop), the HTTP requests (uvicorn's request cycle, under which every middleware
    and route runs), and SQLAlchemy's greenlets (the database work of `Database.read`/`write`: a
    greenlet's stack starts at the function it runs, so py-spy shows it apart from the request
    that awaits it); `in_routes` is the part of the requests' share under the route's function
    (FastAPI's `run_endpoint_function`, or a webhook route's own endpoint), the rest being the
    server's and the middlewares' own work.
    Left out of the lists: the frames above the event loop (the process's start, `Runner.run`) and
    those a request goes through on its way to the route (the middlewares and the routing: above
    the endpoint's call on some stack), named apart; the grpc.aio poller thread is left out of the
    samples (as bench/profile.py does)."""
    total = 0
    on_stack: Counter[str] = Counter()
    wrappers: set[str] = set()
    own: Counter[str] = Counter()
    where: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame(frame) for frame in stack.split(";")]
        if frames[0].startswith("Thread._bootstrap"):
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for name in set(frames):
            on_stack[name] += n
        if not frames[0].startswith(_MAIN):
            where["greenlets"] += n
        elif frames[-1].startswith(_LOOP):
            where["event_loop_own"] += n
        elif any(frame.startswith(_REQUEST) for frame in frames):
            where["requests"] += n
            endpoint = next((i for i, frame in enumerate(frames) if frame.startswith(_ENDPOINTS)), None)
            if endpoint is not None:
                where["in_routes"] += n
                wrappers.update(frames[:endpoint + 1])
        else:
            where["other_tasks"] += n

    def pct(n: int) -> float:
        return round(100 * n / total, 1) if total else 0.0

    above = _above_the_loop(on_stack)
    wrappers -= above
    listed = [(name, n) for name, n in on_stack.most_common() if name not in above and name not in wrappers]
    ours = [(name, n) for name, n in listed if " (service/" in name]
    return {"samples": total, "where": {key: pct(where[key]) for key in _WHERE},
            "request_wrappers": sorted(wrappers, key=lambda name: -on_stack[name]),
            "top_inclusive": [[name, pct(n), pct(own[name])] for name, n in listed[:top]],
            "top_service": [[name, pct(n), pct(own[name])] for name, n in ours[:top]]}


_MAIN = "_run_module_as_main"  # the main thread's first frame (python -m service.cli)
_LOOP = "Runner.run ("  # asyncio's runner: uvloop's C code shows as its own time
_REQUEST = "RequestResponseCycle.run_asgi ("  # uvicorn: one HTTP request
# FastAPI calls an API route's function; a webhook route's is its own (service/providers/routes.py)
_ENDPOINTS = ("run_endpoint_function (", "_endpoint.<locals>.endpoint (")
_WHERE = ("requests", "in_routes", "greenlets", "event_loop_own", "other_tasks")


def _above_the_loop(on_stack: Counter[str]) -> set[str]:
    """The main thread's frames from the process's start down to the event loop (`Runner.run`):
    on every main-thread stack, so in no list."""
    loop = next((n for name, n in on_stack.items() if name.startswith(_LOOP)), 0)
    return {name for name, n in on_stack.items() if n >= loop and not name.startswith("_in_transaction")} if loop \
        else set()


def _frame(frame: str) -> str:
    """'function (path/to/module.py:123)' → 'function (path/to/module.py)': one entry per function."""
    return re.sub(r":\d+\)$", ")", frame)


def _profile(replica: ReplicaProcess, seconds: float, rate: int) -> dict[str, Any]:
    spy = _py_spy()
    if spy is None:
        return {"error": "py-spy is not installed (pip install -e '.[dev]')"}
    with tempfile.TemporaryDirectory(prefix="bench-provider-prof-") as tmp:
        out = Path(tmp) / "raw.txt"
        result = subprocess.run([spy, "record", "-d", str(max(1, round(seconds))), "-r", str(rate), "-p",
                                 str(replica.pid), "--format", "raw", "-o", str(out)],
                                capture_output=True, text=True, timeout=seconds + 60, check=False)
        if result.returncode != 0 or not out.exists():
            return {"error": f"py-spy failed: {result.stderr[-800:]}"}
        raw = out.read_text()
    summary = summarise(raw)
    return {"replica": replica.name, "seconds": round(seconds, 1), "rate_hz": rate, **inclusive(raw),
            "own_by_package": summary["own_by_package"], "top_own_functions": summary["top_own_functions"],
            "named_inclusive": summary["named_inclusive"], "named": list(NAMED)}


# -- the two paths ----------------------------------------------------------------------------------


def _provider_path(pg: PostgresServer, etcd: EtcdServer, events: _Events, mode: str, count: int, warmup: int,
                   concurrency: int, quick: bool, rate: float | None) -> dict[str, Any]:
    name = f"provider_{mode}_{uuid.uuid4().hex[:6]}"
    db_url, bench_url = _prepare_database(pg, name)
    with Cluster(REPLICAS, database_url=db_url, etcd_endpoint=etcd.endpoint, lease_ttl=LEASE_TTL,
                 env=_settings(concurrency, events), telephony_provider=mode, fake_calls_per_second=0.0,
                 fake_ring_ms=0.0) as cluster:
        cluster.leader(timeout=60)
        front = cluster.webhook_proxy
        assert front is not None
        first_warmup = min(warmup, CALIBRATION) if rate is None else warmup
        log(f"provider {mode}: warm-up, {first_warmup} reminders at once (not counted)")
        warm = _burst(cluster, pg, mode, bench_url, WARMUP_FROM, first_warmup, events)
        pace = _pace(warm, os.cpu_count() or 1) if rate is None else {"calls_per_s": rate or None}
        if pace["calls_per_s"]:
            log(f"provider {mode}: the provider's rate set to {pace['calls_per_s']} calls/s "
                f"(CALLS_PER_SECOND; {pace})")
            cluster.scenario_env({"CALLS_PER_SECOND": str(pace["calls_per_s"])})  # restarts the replicas
            cluster.leader(timeout=60)
            log(f"provider {mode}: warm-up at that rate, {warmup} reminders (not counted)")
            warm = _burst(cluster, pg, mode, bench_url, PACED_WARMUP_FROM, warmup, events)
        leader = cluster.leader(timeout=60)
        warm_rate = _warm_rate(warm, warm["progress"]["last_attempt_recorded"], _first_create(cluster))
        idle_s = _idle_seconds(count, pace["calls_per_s"] or warm_rate, quick)
        log(f"provider {mode}: warm-up {warm_rate} calls/s; the replicas idle for {idle_s:.0f} s")
        idle = _idle(cluster.live_replicas(), idle_s)

        log(f"provider {mode}: {count} reminders due at once")
        counts_before = _replica_counts(cluster.live_replicas())
        asyncio.run(_reset_pg_statements(bench_url))
        burst = _burst(cluster, pg, mode, bench_url, RUN_FROM, count, events)
        pg_counts = asyncio.run(_pg_statements(bench_url, name))
        counts = _delta(_replica_counts(cluster.live_replicas()), counts_before)
        stats = front.stats(full=True)
        first, last = _first_create(cluster), burst["progress"]["last_attempt_recorded"]
        heard = _heard_once(cluster, mode, burst)
        if heard["violations"]:
            raise RuntimeError(f"provider {mode}: not every reminder heard exactly once: {heard['violations']}")
        webhooks = stats["total"]
        net = _net_cpu(burst, idle)
        total_net = sum(net.values())
        by_url = {r.url: r.name for r in cluster.replicas}
        answered = {by_url.get(url, url): n for url, n in stats.get("upstreams", {}).items()}
        follower_webhooks = sum(n for name, n in answered.items() if name != leader)
        follower_cpu = sum(cpu for name, cpu in net.items() if name != leader)
        run = {
            "reminders": count, "loadavg_at_start": burst["loadavg_at_start"],
            "first_create_to_last_final_s": round(last - first, 3) if first and last else None,
            "calls_per_s": round(count / (last - first), 1) if first and last and last > first else None,
            "commit_to_first_create_s": round(first - burst["committed"], 3) if first else None,
            "cpu_interval_s": round(burst["cpu_interval_s"], 3),
            "replicas_cpu_s": round(sum(burst["cpu_s"].values()), 3),
            "idle_subtracted_s": round(sum(burst["cpu_s"].values()) - total_net, 3),
            "cpu_ms_per_call": round(total_net / count * 1000, 3),
            "webhooks": webhooks, "webhooks_per_call": round(webhooks / count, 3),
            "cpu_ms_per_webhook": round(total_net / webhooks * 1000, 3) if webhooks else None,
            # the followers only answer webhooks (the leader dispatches too): a webhook's own cost
            "followers_cpu_ms_per_webhook": (round(follower_cpu / follower_webhooks * 1000, 3)
                                             if follower_webhooks else None),
            "replicas": {r: {"leader": r == leader, "cpu_s_net": round(net[r], 3),
                             "cores_busy": round(net[r] / burst["cpu_interval_s"], 2), "webhooks": answered.get(r, 0)}
                         for r in sorted(net)},
            "others_cpu_ms_per_call": {k: round(v / count * 1000, 3) for k, v in burst["others_cpu_s"].items()},
            "events_delivered": burst["progress"]["events_delivered_total"] - warm["progress"][
                "events_delivered_total"],
        }
        log(f"provider {mode}: {run['calls_per_s']} calls/s, {run['cpu_ms_per_call']} ms CPU per call, "
            f"{run['webhooks_per_call']} webhooks per call, {run['cpu_ms_per_webhook']} ms per webhook")

        followers = [r for r in cluster.live_replicas() if r.name != leader]
        log(f"provider {mode}: GET /appointments/{{id}} on {followers[0].name}")
        # the rate that follower answered webhooks at while calls were placed (not over the seeding)
        span = run["first_create_to_last_final_s"] or burst["cpu_interval_s"]
        webhook_rate = answered.get(followers[0].name, 0) / span
        get = _get_cost(followers[0], idle, burst["appointment_ids"], 3.0 if quick else 8.0, db_url, webhook_rate)
        log(f"provider {mode}: GET {get['load']['rps']} req/s, {get['cpu_ms_per_get']} ms CPU per GET; paced at "
            f"{followers[0].name}'s webhook rate: {(get.get('paced') or {}).get('cpu_ms_per_get')} ms")

        profiled, leading = followers[-1], cluster.replica(leader)
        size = count if quick else max(200, count // 4)
        seconds = min(30.0, max(4.0, size / run["calls_per_s"] if run["calls_per_s"] else 10.0))
        log(f"provider {mode}: py-spy on {profiled.name} and on the leader {leading.name} through a burst of {size} "
            f"({seconds:.0f} s)")

        def profiles(_committed: float) -> dict[str, Any]:
            with ThreadPoolExecutor(2) as spies:
                follower = spies.submit(_profile, profiled, seconds, PROFILE_RATE)
                lead = spies.submit(_profile, leading, seconds, PROFILE_RATE)
                return {"profile": follower.result(), "leader_profile": lead.result()}

        profile_burst = _burst(cluster, pg, mode, bench_url, PROFILE_FROM, size, events, during=profiles)
        profile = profile_burst["during"].get("profile", {"error": "no profile"})
        leader_profile = profile_burst["during"].get("leader_profile", {"error": "no profile"})
        profile["burst"] = leader_profile["burst"] = size
    return {"warmup": {"reminders": warmup, "calls_per_s": warm_rate}, "pace": pace, "idle": idle, "run": run,
            "routes": _routes(stats, counts, count), "statements": _statements(pg_counts, counts, count),
            "heard_once": heard, "get": get, "profile": profile, "leader_profile": leader_profile}


def _generic_path(pg: PostgresServer, etcd: EtcdServer, events: _Events, count: int, warmup: int, concurrency: int,
                  quick: bool) -> dict[str, Any]:
    name = f"generic_{uuid.uuid4().hex[:6]}"
    db_url, bench_url = _prepare_database(pg, name)
    with Cluster(REPLICAS, database_url=db_url, etcd_endpoint=etcd.endpoint, lease_ttl=LEASE_TTL,
                 env=_settings(concurrency, events)) as cluster:
        cluster.leader(timeout=60)
        log(f"generic: warm-up, {warmup} reminders (not counted)")
        warm = _burst(cluster, pg, None, bench_url, WARMUP_FROM, warmup, events)
        rate = _warm_rate(warm, warm["progress"]["last_reminder_recorded"], _first_create(cluster))
        idle_s = _idle_seconds(count, rate, quick)
        log(f"generic: warm-up {rate} calls/s; the replicas idle for {idle_s:.0f} s")
        idle = _idle(cluster.live_replicas(), idle_s)
        log(f"generic: {count} reminders due at once")
        asyncio.run(_reset_pg_statements(bench_url))
        burst = _burst(cluster, pg, None, bench_url, RUN_FROM, count, events)
        pg_counts = asyncio.run(_pg_statements(bench_url, name))
        first, last = _first_create(cluster), burst["progress"]["last_reminder_recorded"]
        once = _generic_once(cluster, burst)
        if once["violations"]:
            raise RuntimeError(f"generic: not one call per reminder: {once['violations']}")
    total_net = sum(_net_cpu(burst, idle).values())
    result = {
        "reminders": count, "warmup": {"reminders": warmup, "calls_per_s": rate}, "idle": idle,
        "loadavg_at_start": burst["loadavg_at_start"],
        "first_create_to_last_sent_s": round(last - first, 3) if first and last else None,
        "calls_per_s": round(count / (last - first), 1) if first and last and last > first else None,
        "cpu_interval_s": round(burst["cpu_interval_s"], 3),
        "cpu_ms_per_call": round(total_net / count * 1000, 3),
        "statements_per_call": round(pg_counts["statements"] / count, 2),
        "transactions_per_call": round((pg_counts["commit"] + pg_counts["rollback"]) / count, 2),
        "others_cpu_ms_per_call": {k: round(v / count * 1000, 3) for k, v in burst["others_cpu_s"].items()
                                   if k != "front"},
        "once": once,
    }
    log(f"generic: {result['calls_per_s']} calls/s, {result['cpu_ms_per_call']} ms CPU per call")
    return result


def _ratios(run: dict[str, Any], get: dict[str, Any]) -> dict[str, Any]:
    """Against the GET flat out (`webhook_to_get`, `call_to_get`) and paced at the webhooks' own rate
    (`…_paced`; `follower_webhook_to_get_paced`: a follower's CPU per webhook, dispatch apart)."""
    per_get = get.get("cpu_ms_per_get")
    if not per_get:
        return {}
    ratios = {"webhook_to_get": round(run["cpu_ms_per_webhook"] / per_get, 2) if run["cpu_ms_per_webhook"] else None,
              "call_to_get": round(run["cpu_ms_per_call"] / per_get, 2),
              "call_budget_in_gets": round(run["webhooks_per_call"] + 2, 2)}
    paced = (get.get("paced") or {}).get("cpu_ms_per_get")
    if paced:
        follower = run.get("followers_cpu_ms_per_webhook")
        ratios.update({
            "webhook_to_get_paced": round(run["cpu_ms_per_webhook"] / paced, 2) if run["cpu_ms_per_webhook"] else None,
            "call_to_get_paced": round(run["cpu_ms_per_call"] / paced, 2),
            "follower_webhook_to_get_paced": round(follower / paced, 2) if follower else None,
        })
    return ratios


def run(quick: bool = False, mode: str = "twilio", reminders: int | None = None,
        concurrency: int = CONCURRENCY, rate: float | None = None) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    count = reminders or (QUICK_REMINDERS if quick else N_REMINDERS)
    warmup = max(50, count // 10)
    server = {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track_utility": "on"}
    with EtcdServer() as etcd, PostgresServer(settings=server) as pg, _Events() as events:
        pg.sql(f"CREATE ROLE {BENCH_ROLE} LOGIN SUPERUSER")
        version = str(asyncio.run(_sql(pg.url, "SHOW server_version"))[0][0][0])
        provider = _provider_path(pg, etcd, events, mode, count, warmup, concurrency, quick, rate)
        generic = _generic_path(pg, etcd, events, count, warmup, concurrency, quick)
        settings = _shown(_settings(concurrency, events))
    return {"mode": mode, "reminders": count, "replicas": REPLICAS, "concurrency": concurrency, "lease_ttl": LEASE_TTL,
            "caps": {k.lower(): int(v) for k, v in CAPS.items()}, "postgresql": version,
            "fake_controls": FAKE_CONTROLS, "callee": CALLEE, "settings": settings,
            **provider, "generic": generic,
            "ratios": _ratios(provider["run"], provider["get"])}
