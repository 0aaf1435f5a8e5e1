"""`make run`: a local cluster you can watch fail over.

Starts etcd, the fake provider (150 ms latency) and 3 replicas on one SQLite file (WAL), or on
PostgreSQL when DEMO_DATABASE_URL is set; books a few appointments through the real HTTP API
with reminders due over the next minute; then shows, every second, who leads, the fencing token,
the calls each replica placed and the reminders sent. Kill the leader with the printed
`kill -9 <pid>` and watch a follower take over and keep calling. LEADER_MAX_TERM (seconds), if
set, makes leaders step down in turn; LEASE_TTL (default 3) sets how long a dead leader is waited
for. Ctrl-C or SIGTERM stops everything it started.

`--provider twilio` (or TELEPHONY_PROVIDER=twilio in the demo's environment) runs the replicas in
Twilio mode against the Twilio-shaped fake (calls queued at 2 per second, webhooks through a
prefix-stripping proxy): the view then shows what each call heard and that every reminder's
message is heard once, whoever leads.

    .venv/bin/python -m harness.demo [--replicas N] [--duration SECONDS] [--appointments N] [--provider P]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from service.privacy import mask_phone

from .cluster import Cluster

PEOPLE = [
    ("Ada Lovelace", "+442071838750", "Europe/London"),
    ("Alan Turing", "+14155552671", "America/Los_Angeles"),
    ("Grace Hopper", "+12125550123", "America/New_York"),
    ("Marie Curie", "+33142685300", "Europe/Paris"),
    ("Emmy Noether", "+4930901820", "Europe/Berlin"),
    ("Edsger Dijkstra", "+34915550100", "Europe/Madrid"),
    ("Barbara Liskov", "+61293744000", "Australia/Sydney"),
    ("Leslie Lamport", "+81335811111", "Asia/Tokyo"),
]


class Stop(Exception):
    """SIGTERM (or SIGINT) asked the demo to stop."""


def _install_signal_handlers() -> dict[str, bool]:
    """SIGINT/SIGTERM raise Stop once; set the returned state's "stopping" to ignore them after."""
    state = {"stopping": False}

    def handler(signum: int, _frame: object) -> None:
        if state["stopping"]:
            return  # already tearing down: let it finish (every step is bounded)
        state["stopping"] = True
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return state


def book_appointments(cluster: Cluster, count: int, first_in: float, last_in: float) -> int:
    """POST /appointments on replica-0; reminders spread from `first_in` to `last_in` s ahead."""
    entry = cluster.replicas[0]
    now = datetime.now(UTC)
    reminders = 0
    for index in range(count):
        name, phone, zone = PEOPLE[index % len(PEOPLE)]
        due = now + timedelta(seconds=first_in + (last_in - first_in) * index / max(1, count - 1))
        body = {
            "customer_name": name,
            "phone": phone,
            "timezone": zone,
            "starts_at": (now + timedelta(hours=2, minutes=15 * index)).isoformat(),
            "remind_at": [due.isoformat()],
            "notes": "booked by the demo",
        }
        response = entry.post("/appointments", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"POST /appointments answered {response.status_code}: {response.text}")
        reminders += len(response.json()["reminders"])
    return reminders


class LiveView:
    """Polls the cluster once per tick and prints the view and the events since the last tick."""

    def __init__(self, cluster: Cluster, *, tty: bool) -> None:
        self.cluster = cluster
        self.tty = tty
        self.started = time.monotonic()
        self.leader: str | None = None
        self.leader_lost_at: float | None = None
        self.down: set[str] = set()
        self.calls_seen = 0
        self.finished_seen: set[str] = set()
        self.events: list[str] = []

    def event(self, text: str) -> None:
        line = f"{datetime.now():%H:%M:%S} {text}"
        self.events = [*self.events, line][-12:]
        if not self.tty:
            print(line, flush=True)

    def roles(self) -> dict[str, tuple[str, dict[str, Any] | None]]:
        roles: dict[str, tuple[str, dict[str, Any] | None]] = {}
        for replica in self.cluster.replicas:
            if not replica.alive:
                roles[replica.name] = ("down", None)
                continue
            try:
                view = replica.status()
            except httpx.HTTPError:
                roles[replica.name] = ("no answer", None)
                continue
            roles[replica.name] = ("LEADER" if view["is_leader"] else "follower", view)
        return roles

    def tick(self) -> None:
        cluster = self.cluster
        roles = self.roles()
        for replica in cluster.replicas:
            if not replica.alive and replica.name not in self.down:
                self.down.add(replica.name)
                self.event(f"!! {replica.name} (pid {replica.pid}) is down, exit status {replica.returncode}")
        leaders = [name for name, (role, _) in roles.items() if role == "LEADER"]
        leader = leaders[0] if len(leaders) == 1 else None
        if leader != self.leader:
            now = time.monotonic()
            if leader is None:
                self.leader_lost_at = now
                self.event(f"** no leader (was {self.leader})")
            else:
                token = roles[leader][1]["fencing_token"]  # type: ignore[index]
                gap = f" after {now - self.leader_lost_at:.1f} s without one" if self.leader_lost_at else ""
                was = f"{self.leader} → " if self.leader else ""
                self.event(f"** LEADER: {was}{leader} (fencing token {token}){gap}")
                self.leader_lost_at = None
            self.leader = leader
        try:
            calls = cluster.provider.client.calls()
        except httpx.HTTPError:
            calls = []
        if cluster.telephony_provider == "twilio":
            self.twilio_tick(roles, calls)
            return
        for call in calls[self.calls_seen:]:
            self.event(f"   call {call['id'][:13]}… placed by {call['placed_by']} (key {call['idempotency_key'][:17]}…)")
        self.calls_seen = max(self.calls_seen, len(calls))
        per_replica = Counter(call["placed_by"] for call in calls)
        statuses = cluster.reminder_statuses()
        self.render(roles, per_replica, statuses, len(calls), len({c["idempotency_key"] for c in calls}))

    def twilio_tick(self, roles: dict, calls: list[dict[str, Any]]) -> None:
        """Twilio mode: a line per finished call (what it heard), messages heard per reminder."""
        finished = [c for c in calls if c["status"] in ("completed", "canceled", "busy", "no-answer", "failed")]
        for call in finished:
            if call["sid"] not in self.finished_seen:
                self.finished_seen.add(call["sid"])
                words = f"heard: {call['heard'][0][:48]}…" if call["heard"] else "heard nothing"
                self.event(f"   call {call['sid'][:10]}… to {mask_phone(call['to'])} {call['status']}, {words}")
        heard = Counter(c["stamp"].get("r") for c in calls if c["heard"])
        statuses = self.cluster.reminder_statuses()
        twice = sum(1 for n in heard.values() if n > 1)
        self.render(roles, Counter(), statuses, len(calls), len(heard),
                    provider_line=f"provider: {len(calls)} calls, {len(heard)} reminders heard, "
                                  f"{twice} heard twice, {len(calls) - len(heard)} calls without a message")

    def render(self, roles: dict, per_replica: Counter, statuses: Counter, calls: int, keys: int,
               provider_line: str | None = None) -> None:
        elapsed = time.monotonic() - self.started
        total = sum(statuses.values())
        summary = (f"reminders: sent {statuses['sent']}, pending {statuses['pending']}, dispatching "
                   f"{statuses['dispatching']}, other {total - statuses['sent'] - statuses['pending'] - statuses['dispatching']}"
                   f" of {total} | " + (provider_line or f"provider: {calls} calls, {keys} distinct idempotency keys"))
        leader = self.cluster.replica(self.leader) if self.leader else None
        hint = (f"to watch a failover, in another shell: kill -9 {leader.pid}   ({leader.name}, the leader)"
                if leader else "no leader right now: a follower takes over once the old lease expires")
        if not self.tty:
            parts = " | ".join(
                f"{name} {role}{' t' + str(view['fencing_token']) if view and view['is_leader'] else ''} "
                f"{per_replica[name]} calls" for name, (role, view) in roles.items()
            )
            print(f"[{elapsed:5.1f}s] {parts} || sent {statuses['sent']}/{total} || "
                  f"{'kill -9 ' + str(leader.pid) if leader else 'no leader'}", flush=True)
            return
        lines = [f"reminders demo — {len(roles)} replicas — {elapsed:.0f} s — Ctrl-C stops everything", ""]
        lines.append(f"  {'replica':<11}{'pid':>8}  {'role':<10}{'token':>7}  {'calls placed':>12}")
        for replica in self.cluster.replicas:
            role, view = roles[replica.name]
            token = view["fencing_token"] if view and view["fencing_token"] is not None else ""
            lines.append(f"  {replica.name:<11}{replica.pid or '':>8}  {role:<10}{token!s:>7}  {per_replica[replica.name]:>12}")
        lines += ["", f"  {summary}", "", f"  >>> {hint}", "", *[f"  {e}" for e in self.events]]
        sys.stdout.write("\033[H\033[J" + "\n".join(lines) + "\n")
        sys.stdout.flush()


def summary(cluster: Cluster, view: LiveView | None) -> None:
    """What happened: leader changes, calls per replica, keys vs calls (exactly once), reminders."""
    try:
        calls = cluster.provider.client.calls()
        posts = cluster.provider.client.requests()
        statuses = cluster.reminder_statuses()
    except Exception as error:  # noqa: BLE001 - a summary must not stop the teardown
        print(f"(no summary: {type(error).__name__}: {error})")
        return
    if view is not None and view.tty:
        print("\n".join(view.events[-8:]))
    if cluster.telephony_provider == "twilio":
        heard = Counter(c["stamp"].get("r") for c in calls if c["heard"])
        print(f"summary (Twilio mode): {len(posts)} creates, {len(calls)} calls, {len(heard)} reminders heard "
              f"(at most {max(heard.values(), default=0)} time(s) each), {len(calls) - len(heard)} calls without a "
              f"message; reminders {dict(statuses)}", flush=True)
        return
    per_replica = dict(Counter(c["placed_by"] for c in calls))
    print(f"summary: calls placed per replica {per_replica}; {len(calls)} calls for "
          f"{len({c['idempotency_key'] for c in calls})} distinct idempotency keys; {len(posts)} POSTs, "
          f"{sum(p['replayed'] for p in posts)} replayed; reminders {dict(statuses)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument("--appointments", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=150.0, help="fake provider latency")
    parser.add_argument("--provider", choices=("generic", "twilio"),
                        default=os.environ.get("TELEPHONY_PROVIDER", "generic"))
    args = parser.parse_args(argv)
    if args.replicas < 1 or args.appointments < 1:
        parser.error("--replicas and --appointments must be at least 1")
    signals = _install_signal_handlers()

    env: dict[str, str] = {}
    if os.environ.get("LEADER_MAX_TERM"):
        env["LEADER_MAX_TERM"] = os.environ["LEADER_MAX_TERM"]
    database_url = os.environ.get("DEMO_DATABASE_URL") or None
    lease_ttl = int(os.environ.get("LEASE_TTL", "3"))
    print(f"starting etcd, the {'Twilio-shaped ' if args.provider == 'twilio' else ''}fake provider ({args.latency_ms:.0f} ms) and {args.replicas} replicas on "
          f"{'PostgreSQL' if database_url else 'SQLite (one file, WAL)'}, lease TTL {lease_ttl} s"
          f"{', LEADER_MAX_TERM ' + env['LEADER_MAX_TERM'] + ' s' if env else ''} …", flush=True)
    reason = "duration reached"
    try:
        if args.provider == "twilio":
            env["RECONCILE_GRACE"] = "10s"
        with Cluster(args.replicas, database_url=database_url, provider_latency_ms=args.latency_ms,
                     lease_ttl=lease_ttl, env=env, telephony_provider=args.provider,
                     twilio_calls_per_second=2) as cluster:
            view = None
            try:
                for replica in cluster.replicas:
                    print(f"  {replica.name}: pid {replica.pid}, {replica.url}", flush=True)
                booked = book_appointments(cluster, args.appointments, first_in=4, last_in=60)
                print(f"booked {args.appointments} appointments through POST /appointments on replica-0: "
                      f"{booked} reminders due over the next minute", flush=True)
                view = LiveView(cluster, tty=sys.stdout.isatty())
                deadline = None if args.duration is None else time.monotonic() + args.duration
                while deadline is None or time.monotonic() < deadline:
                    tick = time.monotonic()
                    view.tick()
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
            except Stop as signalled:
                reason = str(signalled)
            signals["stopping"] = True  # from here on every step is bounded: no interrupting it
            summary(cluster, view)
            print("stopping the replicas, the provider and etcd …", flush=True)
    except Stop as signalled:  # while starting: the cluster has already been killed
        print(f"stopped while starting ({signalled})", file=sys.stderr)
        return 1
    except FileNotFoundError as error:  # etcd or PostgreSQL binaries missing
        print(f"demo: {error}", file=sys.stderr)
        return 1
    print(f"stopped ({reason}): everything the demo started is down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
