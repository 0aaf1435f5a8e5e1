"""Dispatch with events on: does delivering the events slow the reminder calls?
`python -m bench dispatch --events` (bench/results/dispatch_events.json).

One `reminders serve` replica leads (as in bench/dispatch.py: PostgreSQL, the fake provider at 0 ms,
DISPATCH_CONCURRENCY); each run commits 10,000 due reminders at once and measures end-to-end
calls/s (first call received by the provider → last reminder recorded `sent`). Every `sent`
reminder writes a `reminder.finished` event in its outcome's transaction, so each run also makes
10,000 events for the relay. Three ways, in one invocation, against the same processes:

- `none`: no EVENTS_URL (the events are written and numbered for the feed, never sent);
- `accepting`: EVENTS_URL at a receiver that verifies each delivery's signature and answers 204 at once;
- `stalled`: EVENTS_URL at a receiver that accepts the TCP connection, reads, and never answers
  (every try waits for EVENTS_TIMEOUT).

The replica is restarted with the mode's settings before each run (the same name, ports and
election; it waits until it leads again), the tables are emptied, and the modes are interleaved
in rounds whose order alternates (A-B-C, C-B-A, A-B-C), after one warm-up run without events
delivery that is not counted (the first run after the cluster starts is slower): a machine that
drifts shows as spread within a mode rather than as a difference between modes. Each mode's figure is its median run;
the ratios are to `none`'s median.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import uuid
from base64 import b64encode
from typing import Any

from harness.cluster import Cluster, free_port
from harness.etcd import EtcdServer
from harness.postgres import PostgresServer

from .common import log
from .dispatch import N_REMINDERS, _median_run, _server_version, _service_run, service_defaults
from .seeding import database

MODES = ("none", "accepting", "stalled")
LATENCY_MS = 0
EVENTS_TIMEOUT_S = 10.0  # the service's default EVENTS_TIMEOUT, written out: what a stalled try waits


class Receivers:
    """Both receivers on loopback, in a thread of this process with its own event loop: one that
    verifies and answers 204 at once, one that accepts connections and never answers."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.accepting_port, self.stalled_port = free_port(), free_port()
        self.verified = self.refused = self.stalled_connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-receivers", daemon=True)
        self._closers: list[Any] = []
        self._held: list[asyncio.StreamWriter] = []

    @property
    def accepting_url(self) -> str:
        return f"http://127.0.0.1:{self.accepting_port}/hooks/reminders"

    @property
    def stalled_url(self) -> str:
        return f"http://127.0.0.1:{self.stalled_port}/hooks/reminders"

    def counts(self) -> dict[str, int]:
        return {"verified": self.verified, "refused": self.refused, "stalled_connections": self.stalled_connections}

    def __enter__(self) -> Receivers:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> None:
        from aiohttp import web
        from standardwebhooks.webhooks import Webhook, WebhookVerificationError

        webhook = Webhook(self.secret)

        async def receive(request: web.Request) -> web.Response:
            body = await request.read()
            try:
                webhook.verify(body, dict(request.headers))
            except WebhookVerificationError:
                self.refused += 1
                return web.Response(status=401)
            self.verified += 1
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hooks/reminders", receive)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.accepting_port).start()
        self._closers.append(runner.cleanup)

        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.stalled_connections += 1
            self._held.append(writer)
            while await reader.read(65536):  # read what comes, answer nothing, until the sender gives up
                pass

        server = await asyncio.start_server(hang, "127.0.0.1", self.stalled_port)
        self._closers.append(self._close_server(server))

    def _close_server(self, server: asyncio.Server) -> Any:
        async def close() -> None:
            server.close()
            for writer in self._held:
                writer.close()

        return close

    async def _stop(self) -> None:
        for close in self._closers:
            await close()


async def _empty(url: str) -> None:
    """The tables one run fills: reminders, their calls and appointments, and their events."""
    from sqlalchemy import text

    async with database(url) as db, db.engine.begin() as connection:
        await connection.execute(text("TRUNCATE call_attempts, reminders, appointments, events"))


async def _events(url: str) -> dict[str, int]:
    """The events of the run by delivery state."""
    from sqlalchemy import func, select

    from service.db.models import Event

    async with database(url) as db, db.session() as session:
        rows = await session.execute(select(Event.delivery, func.count()).group_by(Event.delivery))
        return {str(state): n for state, n in rows.all()}


def _order(rounds: int) -> list[str]:
    order: list[str] = []
    for round_ in range(rounds):
        order.extend(MODES if round_ % 2 == 0 else tuple(reversed(MODES)))
    return order


def run(quick: bool = False, concurrency: int = 400) -> dict[str, Any]:
    rounds = 1 if quick else 3
    secret = "whsec_" + b64encode(secrets.token_bytes(24)).decode()
    with EtcdServer() as etcd, PostgresServer() as pg, Receivers(secret) as receivers:
        version = asyncio.run(_server_version(pg.create_database(f"version_{uuid.uuid4().hex[:6]}")))
        db_url = pg.create_database(f"dispatch_events_{uuid.uuid4().hex[:6]}")
        settings = {
            "none": {},
            "accepting": {"EVENTS_URL": receivers.accepting_url, "EVENTS_SECRET": secret},
            "stalled": {"EVENTS_URL": receivers.stalled_url, "EVENTS_SECRET": secret,
                        "EVENTS_TIMEOUT": str(EVENTS_TIMEOUT_S)},
        }
        env = {"DISPATCH_CONCURRENCY": str(concurrency), "LOG_LEVEL": "info"}
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        with Cluster(1, database_url=db_url, etcd_endpoint=etcd.endpoint, provider_latency_ms=LATENCY_MS,
                     lease_ttl=10, env=env) as cluster:
            replica = cluster.replica(cluster.leader())
            provider = cluster.provider
            assert provider is not None
            base_env = {k: v for k, v in replica.env.items() if not k.startswith("EVENTS_")}
            order = _order(rounds)
            warmup: dict[str, Any] | None = None
            for i, mode in enumerate(["warm-up", *order]):
                replica.terminate()
                asyncio.run(_empty(db_url))
                replica.env = {**base_env, **settings.get(mode, {})}
                replica.restart()
                cluster.leader()  # it leads again before the reminders are committed
                log(f"events [{i}/{len(order)}] {mode}: {N_REMINDERS} due reminders committed at once")
                before = receivers.counts()
                service = _service_run(pg, db_url, replica, provider, LATENCY_MS)
                after = receivers.counts()
                service["mode"] = mode
                service["receiver_during_run"] = {k: after[k] - before[k] for k in after}
                service["events"] = asyncio.run(_events(db_url))
                log(f"events [{i}/{len(order)}] {mode}: {service.get('calls_per_s')} calls/s; receiver "
                    f"{service['receiver_during_run']}; events {service['events']}")
                if mode == "warm-up":  # the first run after the cluster starts (cold caches): not counted
                    warmup = service
                else:
                    runs[mode].append(service)
    figures = {mode: _median_run(found, "calls_per_s") for mode, found in runs.items()}
    base = figures["none"].get("calls_per_s")
    ratios = {mode: round(fig["calls_per_s"] / base, 3) if base and fig.get("calls_per_s") else None
              for mode, fig in figures.items() if mode != "none"}
    log(f"events: calls/s {({m: f.get('calls_per_s') for m, f in figures.items()})}, ratios to none {ratios}")
    return {"latency_ms": LATENCY_MS, "concurrency": concurrency, "reminders": N_REMINDERS, "rounds": rounds,
            "order": order, "warmup_calls_per_s": (warmup or {}).get("calls_per_s"),
            "events_timeout_s": EVENTS_TIMEOUT_S, "figures": figures, "ratios": ratios,
            "every_run": {mode: [r.get("calls_per_s") for r in found] for mode, found in runs.items()},
            "exactly_once_every_run": all(
                r["provider_calls"] == r["distinct_keys_called"] == N_REMINDERS
                and r.get("statuses", {}).get("sent") == N_REMINDERS for found in runs.values() for r in found),
            "postgresql": version, "service_defaults": service_defaults()}
