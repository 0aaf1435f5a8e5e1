"""The webhook routes against their floors (issue 26): each provider webhook route of ONE replica
beside the same signature check and the same SQL on Starlette + asyncpg (bench/bare_webhooks.py),
measured in the same run, in A-B-A order (replica, floor, replica), as `python -m bench api` does.

The replica is a full `reminders serve` in the provider's mode: the leader of a one-replica
cluster (harness.cluster.Cluster with the provider's fake; nothing is due, its dispatcher idles).
Every request does its route's real first-time work on rows seeded beforehand, in one INSERT …
SELECT … generate_series per table (a template appointment and reminder planned as the API plans
them, bench/seeding.py, cloned with ids of their own); no request repeats one:

| route | request | the rows it works on |
|---|---|---|
| twilio/status | `CallStatus=ringing`, `SequenceNumber=1` | a placed call with no status yet (one UPDATE) |
| twilio/voice | the first answer, `AnsweredBy=human` | a `sent`, unbound reminder's call: bound, speaks |
| twilio/gather | `Digits=1`, round 1 | the reminder's bound call: the appointment confirmed |
| telnyx/initiated | `call.initiated` with its event id | a placed call with no status yet |

The requests are generated and signed beforehand (Twilio: `TwilioSignature.sign` with the
cluster's auth token over PUBLIC_URL + path + query; Telnyx: the fake's Ed25519 test key,
`reminders_fakes.telnyx.sign`), written to a file that a wrk Lua script sends in turn. They go
straight to the replica (no proxy): PUBLIC_URL is the one the replica was started with, and the
floor checks the signatures against the same PUBLIC_URL. Each measured run (and its warm-up) starts
at the first request not yet sent, so every request meets fresh rows (`wrapped`: the rows ran out).

Per run: requests/s, latency p50/p99, non-2xx, and the CPU (utime + stime from /proc, the process
and its children) of the replica or the floor per request. Afterwards the rows are counted (calls
ringing, reminders bound, appointments confirmed, calls initiated), and the floor's SQL is compared
with what the ledger sends for the same route (captured with `before_cursor_execute`).

Then, the same way, `GET /appointments/{id}` over the seeded appointments: the replica's against
the same read at its floor (bench/bare.py's one joined SELECT, served by the floor's app), the
answers' fields compared. Issue 26 measures a call against that GET: its webhooks at the replica's
cost and at the floors' (`call_webhooks`), each in GETs of its own side, show how much of the
per-call budget ((webhooks + 2) × the GET) the webhooks alone take, and whether even the floors fit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from .common import ROOT, log, tree_cpu_seconds

CONNECTIONS = 16
WARMUP_S = 1.0
ROUTES_BY_MODE = {"twilio": ("twilio/status", "twilio/voice", "twilio/gather"), "telnyx": ("telnyx/initiated",)}
# requests/s assumed at most when sizing the rows (a run that sends more wraps around: `wrapped`)
MAX_REPLICA_RPS, MAX_FLOOR_RPS = 2500, 5000
IDLE_S = 3.0  # the replica's CPU while nothing is sent (the leader's loops), measured before the runs
CAPTURE_ROWS = 2  # the first rows of each route's range: the ledger run once on them, its SQL captured
CUSTOMER = "+14155550100"
TWILIO_NUMBER = "+14155550199"
GET_ROUTE = "GET /appointments/{id}"
PATHS = {"twilio/status": "/telephony/twilio/status", "twilio/voice": "/telephony/twilio/voice",
         "twilio/gather": "/telephony/twilio/gather", "telnyx/initiated": "/telephony/telnyx/events"}


# -- ids: the same in SQL (md5(text)::uuid::text) and here ------------------------------------------


def row_id(kind: str, index: int) -> str:
    return str(uuid.UUID(hashlib.md5(f"{kind}{index}".encode()).hexdigest()))


def call_id(mode: str, index: int) -> str:
    digest = hashlib.md5(f"ws{index}".encode()).hexdigest()
    return f"CA{digest}" if mode == "twilio" else f"v3:{digest}"


def _sql_call_id(mode: str) -> str:
    return "'CA' || md5('ws' || i)" if mode == "twilio" else "'v3:' || md5('ws' || i)"


# -- seeding -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    route: str
    first: int  # row indexes [first, first + count)
    count: int
    bound: bool = False  # the reminder is bound to its call (the keypad's rows)


async def seed(url: str, mode: str, spans: list[Span]) -> float:
    """The rows of every span: appointment, reminder (`sent`) and its call attempt (placed, with the
    provider's call id; bound spans: answered by a person, bound), cloned in SQL from a template
    appointment and reminder planned as the API plans them. Returns the seconds it took."""
    import asyncpg

    from service.db import Appointment, Reminder
    from service.ledger.consent import phone_hasher

    from .seeding import database, planned, planning

    started = time.monotonic()
    due = datetime.now(UTC) + timedelta(days=1)
    async with database(url) as db:
        hashed = (await phone_hasher(db))(CUSTOMER)
        appointments, reminders = planned(1, due, datetime.now(UTC), planning(), hashed)
        appointments[0]["phone"] = CUSTOMER
        async with db.engine.begin() as connection:
            await connection.execute(Appointment.__table__.insert(), appointments)
            await connection.execute(Reminder.__table__.insert(), reminders)
    template_a, template_r = appointments[0]["id"], reminders[0]["id"]
    a_columns = [c.name for c in Appointment.__table__.columns]
    r_columns = [c.name for c in Reminder.__table__.columns]
    a_exprs = {"id": "md5('wa' || i)::uuid::text"}  # the template's name: its words (wording) say it
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=10)
    try:
        async with connection.transaction():
            for span in spans:
                lo, hi = span.first, span.first + span.count - 1
                await connection.execute(
                    f"INSERT INTO appointments ({', '.join(a_columns)}) "
                    f"SELECT {', '.join(a_exprs.get(c, 't.' + c) for c in a_columns)} "
                    f"FROM appointments t, generate_series($1::int, $2::int) i WHERE t.id = $3", lo, hi, template_a,
                    timeout=120)
                bound = span.bound
                r_exprs = {
                    "id": "md5('wr' || i)::uuid::text", "appointment_id": "md5('wa' || i)::uuid::text",
                    "idempotency_key": "'webhooks-bench-' || i", "status": "'sent'", "attempts": "1",
                    "sent_at": "now()", "fence_token": "1",
                    "bound_call_id": _sql_call_id(mode) if bound else "NULL",
                    "bound_attempt_id": "md5('wc' || i)::uuid::text" if bound else "NULL",
                    "outcome": "'answered'" if bound else "NULL", "answered_at": "now()" if bound else "NULL",
                }
                await connection.execute(
                    f"INSERT INTO reminders ({', '.join(r_columns)}) "
                    f"SELECT {', '.join(r_exprs.get(c, 't.' + c) for c in r_columns)} "
                    f"FROM reminders t, generate_series($1::int, $2::int) i WHERE t.id = $3", lo, hi, template_r,
                    timeout=120)
                await connection.execute(
                    "INSERT INTO call_attempts (id, reminder_id, fencing_token, state, provider_call_id, call_status, "
                    "answered_by, rang_at, last_event_at, keypad_rounds, created_at, updated_at) "
                    f"SELECT md5('wc' || i)::uuid::text, md5('wr' || i)::uuid::text, 1, 'created', "
                    f"{_sql_call_id(mode)}, "
                    + ("'in-progress', 'human', now(), now(), " if bound else "NULL, NULL, NULL, NULL, ")
                    + "0, now(), now() FROM generate_series($1::int, $2::int) i", lo, hi, timeout=120)
            await connection.execute("DELETE FROM reminders WHERE id = $1", template_r)
            await connection.execute("DELETE FROM appointments WHERE id = $1", template_a)
        await connection.execute("ANALYZE", timeout=120)
    finally:
        await connection.close()
    return round(time.monotonic() - started, 1)


# -- the requests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """One pre-signed request: path (with query), headers, body, method."""

    path: str
    headers: dict[str, str]
    body: str
    method: str = "POST"

    def line(self) -> str:
        fields = [self.method, self.path, self.body]
        for name, value in self.headers.items():
            fields += [name, value]
        if any("\t" in f or "\n" in f for f in fields):
            raise ValueError("a request field holds a tab or a newline")
        return "\t".join(fields)


def twilio_request(route: str, index: int, public_url: str, token: str, account: str) -> Signed:
    from service.providers.twilio.signature import SIGNATURE_HEADER, TwilioSignature
    from service.telephony.provider import Stamp

    stamp = Stamp(row_id("wr", index), row_id("wc", index))
    query = {**stamp.query(), **({"n": "1"} if route == "twilio/gather" else {})}
    params = {"CallSid": call_id("twilio", index), "AccountSid": account, "From": TWILIO_NUMBER, "To": CUSTOMER,
              "Direction": "outbound-api", "ApiVersion": "2010-04-01"}
    if route == "twilio/status":
        params.update(CallStatus="ringing", SequenceNumber="1", Timestamp="Mon, 07 Dec 2026 07:00:00 +0000")
    elif route == "twilio/voice":
        params.update(CallStatus="in-progress", AnsweredBy="human")
    else:
        params.update(CallStatus="in-progress", Digits="1", FinishedOnKey="")
    path = f"{PATHS[route]}?{urlencode(query)}"
    signature = TwilioSignature(token, public_url)
    signed = signature.sign(signature.signed_url(PATHS[route], urlencode(query)), params)
    return Signed(path, {"Content-Type": "application/x-www-form-urlencoded", SIGNATURE_HEADER: signed},
                  urlencode(params))


def telnyx_request(index: int, seed_bytes: bytes, connection_id: str, now: float) -> Signed:
    from reminders_fakes.telnyx import sign
    from service.telephony.provider import Stamp

    stamp = Stamp(row_id("wr", index), row_id("wc", index))
    occurred = datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    data = {"record_type": "event", "event_type": "call.initiated", "id": row_id("we", index),
            "occurred_at": occurred,
            "payload": {"call_control_id": call_id("telnyx", index), "call_leg_id": row_id("wl", index),
                        "call_session_id": row_id("wx", index), "connection_id": connection_id,
                        "client_state": stamp.encode(), "direction": "outgoing", "from": TWILIO_NUMBER,
                        "to": CUSTOMER, "state": "bridging"}}
    body = json.dumps({"data": data, "meta": {"attempt": 1, "delivered_to": "bench"}}, separators=(",", ":"))
    timestamp = str(int(now))
    return Signed(PATHS["telnyx/initiated"], {"Content-Type": "application/json", "telnyx-timestamp": timestamp,
                                              "telnyx-signature-ed25519": sign(seed_bytes, timestamp, body.encode())},
                  body)


# -- wrk ---------------------------------------------------------------------------------------------

WRK_SCRIPT = r"""
local reqs, n, counter = {}, 0, 0
local function split(line)
  local out, start = {}, 1
  while true do
    local stop = string.find(line, "\t", start, true)
    if not stop then out[#out + 1] = string.sub(line, start); return out end
    out[#out + 1] = string.sub(line, start, stop - 1)
    start = stop + 1
  end
end
init = function(args)
  for line in io.lines(args[1]) do
    local f = split(line)
    local headers = {}
    for k = 4, #f - 1, 2 do headers[f[k]] = f[k + 1] end
    n = n + 1
    reqs[n] = wrk.format(f[1], f[2], headers, f[3])
  end
end
request = function()
  counter = counter + 1
  return reqs[((counter - 1) % n) + 1]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"errors_connect": %d, "errors_read": %d, "errors_write": %d, "errors_status": %d, "errors_timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass
class Requests:
    """A route's pre-signed requests, handed out in order: each run starts at the first one not sent."""

    lines: list[str]
    cursor: int = 0
    wrapped: bool = False
    sent: list[tuple[int, int]] = field(default_factory=list)  # (first, count) of each run

    def take(self, tmp: Path) -> tuple[Path, int]:
        if self.cursor >= len(self.lines):
            self.wrapped, self.cursor = True, 0
        path = tmp / f"requests-{self.cursor}.txt"
        path.write_text("\n".join(self.lines[self.cursor:]) + "\n")
        return path, len(self.lines) - self.cursor

    def advance(self, completed: int) -> None:
        # requests in flight when wrk stopped were sent too: skip one per connection
        self.sent.append((self.cursor, completed))
        self.cursor += completed + CONNECTIONS


def wrk(base_url: str, requests_file: Path, available: int, duration: float, tmp: Path) -> dict[str, Any]:
    script = tmp / "webhooks.lua"
    script.write_text(WRK_SCRIPT)
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "--latency",
            "-s", str(script), base_url.rstrip("/") + "/", "--", str(requests_file)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120, check=False)
    line = next((row for row in result.stdout.splitlines() if row.startswith("WRKJSON ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stdout[-1500:]} {result.stderr[-1500:]}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw[f"errors_{kind}"] for kind in ("connect", "read", "write", "status", "timeout"))
    return {"requests": raw["requests"], "duration_s": round(seconds, 3), "rps": round(raw["requests"] / seconds, 1),
            "p50_ms": round(raw["p50_us"] / 1000, 2), "p90_ms": round(raw["p90_us"] / 1000, 2),
            "p99_ms": round(raw["p99_us"] / 1000, 2), "max_ms": round(raw["max_us"] / 1000, 2),
            "errors": errors, "non_2xx": raw["errors_status"], "fresh_requests": min(raw["requests"], available)}


def measure(base_url: str, pid: int, requests: Requests, duration: float, tmp: Path) -> dict[str, Any]:
    """A warm-up, then the measured run with the server's CPU per request (each on requests not sent before)."""
    path, available = requests.take(tmp)
    warm = wrk(base_url, path, available, WARMUP_S, tmp)
    requests.advance(warm["requests"])
    path, available = requests.take(tmp)
    before = tree_cpu_seconds(pid)
    run = wrk(base_url, path, available, duration, tmp)
    used = tree_cpu_seconds(pid) - before
    requests.advance(run["requests"])
    run["cpu_s"] = round(used, 3)
    run["cpu_ms_per_request"] = round(used / run["requests"] * 1000, 3) if run["requests"] else None
    run["warmup"] = {"requests": warm["requests"], "rps": warm["rps"], "errors": warm["errors"]}
    return run


def aba(route: str, replica: tuple[str, int], floor: tuple[str, int], requests: Requests, duration: float,
        tmp: Path) -> dict[str, Any]:
    log(f"webhooks: {route}: replica, floor, replica ({duration:.0f} s each, {len(requests.lines):,} requests)")
    first = measure(*replica, requests, duration, tmp)
    base = measure(*floor, requests, duration, tmp)
    second = measure(*replica, requests, duration, tmp)
    rps = round(statistics.mean([first["rps"], second["rps"]]), 1)
    cpu = [r["cpu_ms_per_request"] for r in (first, second) if r["cpu_ms_per_request"] is not None]
    return {
        "replica": [first, second], "floor": base, "replica_rps": rps,
        "ratio": round(rps / base["rps"], 3) if base["rps"] else None,
        "replica_cpu_ms_per_request": round(statistics.mean(cpu), 3) if cpu else None,
        "floor_cpu_ms_per_request": base["cpu_ms_per_request"],
        "replica_p50_ms": max(first["p50_ms"], second["p50_ms"]), "replica_p99_ms": max(first["p99_ms"],
                                                                                          second["p99_ms"]),
        "errors": first["errors"] + base["errors"] + second["errors"],
        "non_2xx": first["non_2xx"] + base["non_2xx"] + second["non_2xx"],
        "wrapped": requests.wrapped,
        "requests_sent": requests.cursor,
    }


def _send(base_url: str, line: str) -> tuple[int, str]:
    import httpx

    fields = line.split("\t")
    headers = dict(zip(fields[3::2], fields[4::2], strict=True))
    response = httpx.request(fields[0], base_url + fields[1], content=fields[2].encode() or None, headers=headers,
                             timeout=10)
    return response.status_code, response.text


def same_answer(replica_url: str, floor_url: str, for_replica: str, for_floor: str,
                indexes: tuple[int, int]) -> dict[str, Any]:
    """One request to the replica, the next to the floor (each on rows of its own): the same status
    and the same body, once each answer's own ids are replaced by placeholders."""
    answers = []
    for (url, line), index in zip(((replica_url, for_replica), (floor_url, for_floor)), indexes, strict=True):
        status, text = _send(url, line)
        for kind in ("wr", "wc", "wa"):
            text = text.replace(row_id(kind, index), f"{{{kind}}}")
        answers.append((status, text))
    return {"status": answers[0][0], "same": answers[0] == answers[1], "replica": answers[0][1][:300],
            **({} if answers[0] == answers[1] else {"floor_status": answers[1][0], "floor": answers[1][1][:300]})}


# -- the ledger's SQL for each route, captured, against the floor's ---------------------------------


async def ledger_sql(url: str, mode: str, spans: list[Span], public_key_seed: bytes | None) -> dict[str, list[str]]:
    """What the ledger sends for each route, run once on the span's first rows (`before_cursor_execute`)."""
    from sqlalchemy import event

    from service.ledger import calls
    from service.reminders import Answerer
    from service.telephony.provider import Stamp

    from .seeding import database

    def fallback(_row: Any) -> Any:
        raise AssertionError("the bench's reminders have their wording")

    out: dict[str, list[str]] = {}
    async with database(url, pool_size=2) as db:
        captured: list[str] = []

        def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            captured.append(statement)

        for engine in db.sync_engines:
            event.listen(engine, "before_cursor_execute", on_statement)
        for span in spans:
            index = span.first
            stamp, cid = Stamp(row_id("wr", index), row_id("wc", index)), call_id(mode, index)
            captured.clear()
            if span.route == "twilio/status":
                await calls.record_event(db, stamp, cid, "ringing", 1)
            elif span.route == "twilio/voice":
                await calls.answer(db, stamp, cid, who=Answerer.PERSON, answered_by="human", fallback=fallback)
            elif span.route == "twilio/gather":
                await calls.keypad(db, stamp, cid, "1", round_=1, fallback=fallback)
            else:
                await calls.record_event(db, stamp, cid, "initiated", 1, event_id=row_id("wq", index))
            out[span.route] = list(captured)
    return out


# -- the GET a call is measured against (issue 26), at the same replica and at its floor ------------


def get_request(index: int) -> Signed:
    """`GET /appointments/{id}` of a seeded appointment (the cluster's API needs no token)."""
    return Signed(f"/appointments/{row_id('wa', index)}", {}, "", method="GET")


def same_fields(replica_url: str, floor_url: str, line: str) -> dict[str, Any]:
    """The same GET to both: the same status, and the same fields in the answer and its reminders."""
    answers = [_send(url, line) for url in (replica_url, floor_url)]

    def fields(text: str) -> list[str]:
        body = json.loads(text)
        return sorted(body) + [f"reminders.{key}" for key in sorted(set().union(*body.get("reminders") or [{}]))]

    statuses = [status for status, _ in answers]
    found = [fields(text) if status == 200 else [] for status, text in answers]
    return {"status": statuses[0], "same": statuses[0] == statuses[1] == 200 and found[0] == found[1],
            **({} if found[0] == found[1] else {"replica_only": sorted(set(found[0]) - set(found[1])),
                                                "floor_only": sorted(set(found[1]) - set(found[0]))})}


# The webhooks of one answered call that confirms (issue 26's scripted callee), by the routes
# measured here: Twilio's four status callbacks (initiated, ringing, in-progress, completed: each
# counted at `ringing`'s cost, one UPDATE; `completed` makes two), the voice request, the keypad.
CALL_WEBHOOKS = {"twilio": {"twilio/status": 4, "twilio/voice": 1, "twilio/gather": 1}}


def call_webhooks(mode: str, routes: dict[str, Any], get: dict[str, Any]) -> dict[str, Any] | None:
    """A call's webhooks at the replica's and at the floors' CPU per request, each against its own
    GET: what issue 26's per-call budget ((webhooks + 2) × the GET, the dispatch included) leaves."""
    per_call = CALL_WEBHOOKS.get(mode)
    if not per_call or any(route not in routes for route in per_call):
        return None
    webhooks = sum(per_call.values())
    out: dict[str, Any] = {"per_call": per_call, "webhooks_per_call": webhooks, "budget_in_gets": webhooks + 2}
    for side in ("replica", "floor"):
        cost = [routes[route][f"{side}_cpu_ms_per_request"] for route in per_call]
        per_get = get.get(f"{side}_cpu_ms_per_request")
        if None in cost or not per_get:
            continue
        total = sum(n * c for n, c in zip(per_call.values(), cost, strict=True))
        out[side] = {"webhooks_cpu_ms": round(total, 3), "get_cpu_ms": per_get, "in_gets": round(total / per_get, 2)}
    return out


def _normal(sql: str) -> str:
    return " ".join(sql.split())


def compare_sql(ledger: dict[str, list[str]]) -> dict[str, Any]:
    from .bare_webhooks import FloorSQL

    floor = FloorSQL()
    result = {}
    for route, statements in ledger.items():
        mine = floor.sequence(route)
        result[route] = {
            "statements": len(statements),
            "same_as_floor": [_normal(s) for s in statements] == [_normal(s) for s in mine],
            "ledger": [_normal(s)[:120] for s in statements],
        }
        if not result[route]["same_as_floor"]:
            result[route]["floor"] = [_normal(s)[:120] for s in mine]
    return result


async def counts(url: str, mode: str, spans: list[Span]) -> dict[str, Any]:
    """What the runs did to each route's rows: the rows changed as the route changes them."""
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=10)
    checks = {
        "twilio/status": "SELECT count(*) FROM call_attempts c, generate_series($1::int, $2::int) i "
                         "WHERE c.id = md5('wc' || i)::uuid::text AND c.call_status = 'ringing'",
        "twilio/voice": "SELECT count(*) FROM reminders r, generate_series($1::int, $2::int) i "
                        "WHERE r.id = md5('wr' || i)::uuid::text AND r.bound_call_id IS NOT NULL "
                        "AND r.outcome = 'answered'",
        "twilio/gather": "SELECT count(*) FROM appointments a, generate_series($1::int, $2::int) i "
                         "WHERE a.id = md5('wa' || i)::uuid::text AND a.confirmation = 'confirmed'",
        "telnyx/initiated": "SELECT count(*) FROM call_attempts c, generate_series($1::int, $2::int) i "
                            "WHERE c.id = md5('wc' || i)::uuid::text AND c.call_status = 'initiated'",
    }
    out = {}
    try:
        for span in spans:
            done = await connection.fetchval(checks[span.route], span.first, span.first + span.count - 1)
            out[span.route] = {"rows": span.count, "rows_done": done}
        out["events"] = await connection.fetchval("SELECT count(*) FROM events")
        out["provider_events"] = await connection.fetchval("SELECT count(*) FROM provider_events")
    finally:
        await connection.close()
    return out


# -- the run -----------------------------------------------------------------------------------------


def _start_floor(database_url: str, public_url: str, mode: str) -> tuple[subprocess.Popen[bytes], str]:
    from harness.cluster import TELNYX_CONNECTION, TWILIO_TOKEN
    from harness.ports import free_port, wait_for_port

    argv = [sys.executable, "-m", "bench.bare_webhooks", "--port", "0", "--database-url", database_url,
            "--public-url", public_url]
    if mode == "twilio":
        argv += ["--twilio-token", TWILIO_TOKEN]
    else:
        from reminders_fakes.telnyx import TEST_PUBLIC_KEY

        argv += ["--telnyx-public-key", TEST_PUBLIC_KEY, "--telnyx-connection-id", TELNYX_CONNECTION]
    port = free_port()
    argv[argv.index("0")] = str(port)
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        wait_for_port(port, timeout=30)
    except Exception:
        process.kill()
        raise
    return process, f"http://127.0.0.1:{port}"


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def rows_per_route(duration: float) -> int:
    """Enough rows for two replica runs and a floor run, each with its warm-up, at the assumed maxima."""
    return int((2 * MAX_REPLICA_RPS + MAX_FLOOR_RPS) * (duration + WARMUP_S)) + 8 * CONNECTIONS


def _mode(pg: Any, etcd: Any, mode: str, duration: float, rows: int) -> dict[str, Any]:
    from harness.cluster import TELNYX_CONNECTION, TWILIO_SID, TWILIO_TOKEN, Cluster

    database_url = pg.create_database(f"webhooks_{mode}")
    routes = ROUTES_BY_MODE[mode]
    spans = [Span(route, k * (rows + CAPTURE_ROWS), rows + CAPTURE_ROWS, bound=route == "twilio/gather")
             for k, route in enumerate(routes)]
    with Cluster(1, database_url=database_url, etcd_endpoint=etcd.endpoint, telephony_provider=mode,
                 fake_calls_per_second=0.0, env={"LOG_LEVEL": "warning"}) as cluster:
        replica = cluster.replica(cluster.leader(timeout=60))
        public_url = replica.env["PUBLIC_URL"]
        log(f"webhooks {mode}: seeding {sum(s.count for s in spans):,} appointments, reminders and calls")
        seeded_s = asyncio.run(seed(database_url, mode, spans))
        ledger = asyncio.run(ledger_sql(database_url, mode, spans, None))
        sql = compare_sql(ledger)
        before = tree_cpu_seconds(replica.pid or 0)
        time.sleep(IDLE_S)
        idle_share = round((tree_cpu_seconds(replica.pid or 0) - before) / IDLE_S, 4)
        floor, floor_url = _start_floor(database_url, public_url, mode)
        assert floor.pid is not None and replica.pid is not None
        results: dict[str, Any] = {}
        try:
            with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
                for span in spans:
                    indexes = range(span.first + CAPTURE_ROWS, span.first + span.count)
                    log(f"webhooks {mode}: signing {len(indexes):,} {span.route} requests")
                    if mode == "twilio":
                        lines = [twilio_request(span.route, i, public_url, TWILIO_TOKEN, TWILIO_SID).line()
                                 for i in indexes]
                    else:
                        from reminders_fakes.telnyx import TEST_SIGNING_SEED

                        now = time.time()  # Telnyx refuses a timestamp older than 5 minutes: signed just before
                        lines = [telnyx_request(i, TEST_SIGNING_SEED, TELNYX_CONNECTION, now + i * 1e-6).line()
                                 for i in indexes]
                    first = span.first + CAPTURE_ROWS
                    requests = Requests(lines)
                    answers = same_answer(replica.url, floor_url, lines[0], lines[1], (first, first + 1))
                    requests.cursor = 2
                    results[span.route] = aba(span.route, (replica.url, replica.pid), (floor_url, floor.pid),
                                              requests, duration, Path(tmp))
                    results[span.route]["answers"] = answers
                get_lines = [get_request(i).line() for span in spans
                             for i in range(span.first + CAPTURE_ROWS, span.first + span.count)]
                fields = same_fields(replica.url, floor_url, get_lines[0])
                get = aba(GET_ROUTE, (replica.url, replica.pid), (floor_url, floor.pid), Requests(get_lines),
                          duration, Path(tmp))
                get["answers"] = fields
        finally:
            _stop(floor)
        done = asyncio.run(counts(database_url, mode, spans))
    for route, result in results.items():
        result["sql"] = sql.get(route)
        result["rows"] = done.get(route)
    return {"public_url": public_url, "seed_s": seeded_s, "routes": results, "replica_idle_cpu_share": idle_share,
            "idle_s": IDLE_S, "get": get, "call": call_webhooks(mode, results, get),
            "events": done.get("events"), "provider_events": done.get("provider_events")}


def run(quick: bool = False, duration: float | None = None, rows: int | None = None,
        modes: tuple[str, ...] = ("twilio", "telnyx")) -> dict[str, Any]:
    from harness.etcd import EtcdServer
    from harness.postgres import PostgresServer

    duration = duration or (2.0 if quick else 5.0)
    rows = rows or rows_per_route(duration)
    result: dict[str, Any] = {"connections": CONNECTIONS, "duration_s": duration, "warmup_s": WARMUP_S,
                              "rows_per_route": rows, "order": "replica, floor, replica", "routes": {}}
    with EtcdServer() as etcd, PostgresServer() as pg:
        for mode in modes:
            part = _mode(pg, etcd, mode, duration, rows)
            result["routes"].update(part.pop("routes"))
            result[mode] = part
    routes = result["routes"].values()
    result["errors"] = sum(r["errors"] for r in routes)
    result["non_2xx"] = sum(r["non_2xx"] for r in routes)
    result["not_built"] = ["telnyx/events call.answered (it sends the greeting command to the provider "
                           "after the response: no floor without a provider)"]
    return result
