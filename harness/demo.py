"""`make run`: a local cluster you can watch fail over, and make fail over with one key.

Starts etcd, the fake provider (150 ms latency) and 3 replicas on one SQLite file (WAL), or on
PostgreSQL when DEMO_DATABASE_URL is set; books a few appointments through the real HTTP API
with reminders due over the next minute; then shows, redrawn in place every second, the
replicas (role, leader term, fencing token, calls placed), the last calls, a failover timer and
what happened. Keys: k kills the leader (SIGKILL: the seed's "delete the leader pod"), s stops it
(SIGSTOP: a frozen process that still holds its sockets), c resumes it (SIGCONT), r restarts the
killed ones, q quits. When stdout is not a terminal it prints plain lines instead (and prints
the `kill -9 <pid>` that kills the leader). LEADER_MAX_TERM (seconds), if set, makes leaders step
down in turn; LEASE_TTL (default 3) sets how long a dead leader is waited for. Ctrl-C, q,
SIGTERM, SIGHUP (the terminal closed) stop everything it started.

`--provider twilio` (or TELEPHONY_PROVIDER=twilio in the demo's environment) runs the replicas in
Twilio mode against the Twilio-shaped fake (calls queued at 2 per second, webhooks through a
prefix-stripping proxy), with a scripted callee per number (`TWILIO_CALLEES`: press 1, press 2, a
machine, nobody answering then retried after 20 s, a German speaker …) and shows the reminders'
outcomes and the appointments' confirmations: the calls' key column then shows what each call heard, and the count of
keys becomes the reminders heard, each once whoever leads; the customer nobody reached rings back
(`CALL_BACK_FROM`) and presses 1. `make run` runs this mode unless TELEPHONY_PROVIDER says otherwise.

In every mode a small receiver of the events for the booking system (harness.events_receiver, on
loopback, in a thread of this process) is started, the replicas deliver to it (EVENTS_URL, with an
EVENTS_SECRET generated for the run) and each event it verifies is shown: type, appointment, source.

    .venv/bin/python -m harness.demo [--replicas N] [--duration SECONDS] [--appointments N] [--provider P]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import select
import signal
import sys
import termios
import threading
import time
import tty
from base64 import b64encode
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from service.privacy import mask_phone

from .cluster import Cluster
from .events_receiver import Receiver
from .ports import free_port

__all__ = [
    "Controller", "EventsReceiver", "FailoverClock", "KeyReader", "LiveView", "Snapshot", "Stop", "TerminalGone",
    "event_line", "main", "plain_status", "provider_calls", "screen",
]

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
# Twilio mode: what the person at each number does (the fake's scripted callee), and in which
# language the appointment is booked: every flow of the outcomes issue in one run.
TWILIO_CALLEES = {
    "+442071838750": ({"behaviour": "answer", "digits": "1"}, "en-GB"),  # confirms
    "+14155552671": ({"behaviour": "answer", "digits": "2"}, "en-US"),  # declines: appointment cancelled
    "+12125550123": ({"behaviour": "machine"}, "en-US"),  # voicemail, no question
    "+33142685300": ({"behaviour": "no-answer"}, "fr-FR"),  # retried after NO_ANSWER_RETRY_DELAY
    "+4930901820": ({"behaviour": "answer", "digits": ["5", "1"]}, "de-DE"),  # a wrong key, the question again, 1
    "+34915550100": ({"behaviour": "busy"}, "es-ES"),  # busy: retried too
    "+61293744000": ({"behaviour": "answer"}, "en-US"),  # presses nothing: question twice, goodbye
    "+81335811111": ({"behaviour": "answer", "digits": "9"}, "en-US"),  # opts out: never called again
}
# Twilio mode: the customer who missed the call (nobody answered) rings the number back before
# the retry, with a caller ID attested A, hears the reminder and presses 1 (docs/decisions/0252).
CALL_BACK_FROM = "+33142685300"
SERVICE_NUMBER = "+15550000000"  # TELEPHONY_FROM's default: the number reminders call from
# Built-in phrases for these languages (MESSAGE_TEMPLATES: each an empty object of phrases).
DEMO_TEMPLATES = {"en-US": {}, "en-GB": {}, "de-DE": {}, "fr-FR": {}, "es-ES": {}}
KEYS_HELP = "k kill the leader (SIGKILL) · s stop it (SIGSTOP) · c continue (SIGCONT) · r restart killed · q quit"


class Stop(Exception):
    """A signal (SIGINT, SIGTERM, SIGHUP), the q key or a closed terminal asked the demo to stop."""


class TerminalGone(Stop):
    """The terminal the keys came from went away: nobody is watching any more."""


def _detach_from_terminal() -> None:
    """The terminal is gone (SIGHUP): what is still written (teardown, summary) goes nowhere
    instead of failing with EIO half-way through the teardown."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        try:
            os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


def _install_signal_handlers() -> dict[str, bool]:
    """SIGINT/SIGTERM/SIGHUP raise Stop once; set the returned state's "stopping" to ignore them
    after. The replicas, etcd and the provider run in sessions of their own (a Ctrl-C or a hangup
    does not reach them): only this process's teardown stops them."""
    state = {"stopping": False}

    def handler(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            _detach_from_terminal()
        if state["stopping"]:
            return  # already tearing down: let it finish (every step is bounded)
        state["stopping"] = True
        raise Stop(signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)
    return state


def book_appointments(cluster: Cluster, count: int, first_in: float, last_in: float) -> int:
    """POST /appointments on replica-0; reminders spread from `first_in` to `last_in` s ahead (in
    Twilio mode each in its callee's language)."""
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
        if cluster.telephony_provider == "twilio":
            body["language"] = TWILIO_CALLEES[phone][1]
        response = entry.post("/appointments", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"POST /appointments answered {response.status_code}: {response.text}")
        reminders += len(response.json()["reminders"])
    return reminders


# -- what one tick sees --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaRow:
    name: str
    pid: int | None
    role: str  # LEADER, follower, paused, down, no answer
    term: int | None  # ordinal of the leader term it holds (1 = the first leader)
    token: int | None  # that term's fencing token
    calls: int  # new calls it placed at the provider


@dataclass(frozen=True)
class Snapshot:
    elapsed: float
    rows: list[ReplicaRow]
    leader: str | None
    failover: str  # the failover timer's line
    leaderless: bool
    statuses: Counter[str]
    calls: int
    keys: int
    outcomes: Counter[str]  # Twilio mode: reminders' outcomes and appointments' confirmations
    last_calls: list[dict[str, Any]]  # newest first
    events: list[str]


@dataclass
class FailoverClock:
    """Times the stretch without a leader: from the moment it was lost (a key press knows it
    before the next poll does) until a replica leads again."""

    leader: str | None = None
    since: float = field(default_factory=time.monotonic)  # the current leader's (or vacancy's) start
    lost_at: float | None = None
    lost_from: str | None = None  # who led before the vacancy
    last: tuple[float, str | None, str] | None = None  # (seconds, from, to) of the last failover

    def lost(self, now: float) -> None:
        if self.lost_at is None:
            self.lost_at, self.since, self.lost_from = now, now, self.leader

    def observe(self, leader: str | None, now: float) -> float | None:
        """The leader this poll saw; returns the failover's length when one just ended."""
        if leader == self.leader:
            return None
        if leader is None:
            self.lost(now)
            self.leader = None
            return None
        self.leader = leader
        gap = None if self.lost_at is None else now - self.lost_at
        if gap is not None:
            self.last = (gap, self.lost_from, leader)
        self.lost_at, self.since = None, now
        return gap

    def line(self, now: float) -> str:
        last = f" · last failover {self.last[0]:.1f} s ({self.last[1] or '?'} → {self.last[2]})" if self.last else ""
        if self.leader is None:
            since = self.lost_at if self.lost_at is not None else self.since
            return f"NO LEADER for {now - since:.1f} s{last}"
        return f"{self.leader} leads for {now - self.since:.0f} s{last}"


def provider_calls(cluster: Cluster) -> list[dict[str, Any]]:
    """The fake provider's calls in the generic fake's shape (id, to, placed_by, created_at,
    idempotency_key). Twilio mode: the key column says what the call heard, and "keys" count the
    reminders heard (a call that heard nothing counts as one key of its own)."""
    calls = cluster.provider.client.calls()  # type: ignore[union-attr]
    if cluster.telephony_provider != "twilio":
        return calls
    shaped = []
    for call in calls:
        if call.get("direction") == "inbound":
            continue  # a customer's call-back: not a reminder's call
        created = parsedate_to_datetime(call["date_created"]).astimezone(UTC).isoformat()
        words = f"heard #{call['stamp'].get('r', '?')[:8]}" if call["heard"] else f"silent {call['sid'][-6:]}"
        shaped.append({"id": call["sid"], "to": call["to"], "placed_by": call.get("placed_by") or "?",
                       "created_at": created, "idempotency_key": words if call["status"] != "queued" else "queued"})
    return shaped


class EventsReceiver:
    """harness.events_receiver's Receiver on a free loopback port, in a thread with its own event
    loop: the replicas' EVENTS_URL, verifying each delivery with a secret generated for this run."""

    def __init__(self) -> None:
        self.secret = "whsec_" + b64encode(secrets.token_bytes(24)).decode()
        self.receiver = Receiver(self.secret, free_port())
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="events-receiver", daemon=True)

    @property
    def settings(self) -> dict[str, str]:
        return {"EVENTS_URL": self.receiver.url, "EVENTS_SECRET": self.secret}

    def deliveries(self) -> list[Any]:
        """What it verified and answered 200 to, in arrival order (a copy)."""
        return list(self.receiver.deliveries)

    def __enter__(self) -> EventsReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.receiver.start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.receiver.stop(), self._loop).result(5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


def event_line(event: dict[str, Any]) -> str:
    """`=> event appointment.confirmed · appointment 6f1c2a3b… · source call-back`."""
    data = event.get("data") or {}
    appointment = data.get("appointment_id")
    extra = "".join(f" · {key} {data[key]}" for key in ("status", "outcome") if data.get(key))
    return (f"=> event {event.get('type')} · appointment {f'{appointment[:8]}…' if appointment else '-'} · "
            f"source {data.get('source', '?')}{extra}")


class LiveView:
    """Polls the cluster once per tick into a Snapshot, and keeps the events since the start."""

    def __init__(self, cluster: Cluster, *, echo: Callable[[str], None] | None = None,
                 receiver: EventsReceiver | None = None) -> None:
        self.cluster = cluster
        self.receiver = receiver  # the booking system's side: each event it verified is shown once
        self.events_seen = 0
        self.echo = echo  # plain mode prints each event as it happens
        self.started = time.monotonic()
        self.clock = FailoverClock()
        self.down: set[str] = set()
        self.calls_seen = 0
        self.events: list[str] = []
        self.terms: dict[int, int] = {}  # fencing token -> the term's number, as GET /leader showed them
        self.call_back: str | None = None  # Twilio mode: the scripted call-back's sid, once it rang
        self.call_back_told = False

    def event(self, text: str) -> None:
        line = f"{datetime.now():%H:%M:%S} {text}"
        self.events = [*self.events, line][-50:]
        if self.echo is not None:
            self.echo(line)

    def _roles(self) -> dict[str, tuple[str, dict[str, Any] | None]]:
        roles: dict[str, tuple[str, dict[str, Any] | None]] = {}
        for replica in self.cluster.replicas:
            if not replica.alive:
                roles[replica.name] = ("down", None)
            elif replica.paused:  # a frozen process does not answer: do not wait for it
                roles[replica.name] = ("paused", None)
            else:
                try:
                    view = replica.status()
                except httpx.HTTPError:
                    roles[replica.name] = ("no answer", None)
                    continue
                roles[replica.name] = ("LEADER" if view["is_leader"] else "follower", view)
        return roles

    def _notice(self, roles: dict[str, tuple[str, dict[str, Any] | None]], now: float) -> str | None:
        for replica in self.cluster.replicas:
            if not replica.alive and replica.name not in self.down:
                self.down.add(replica.name)
                self.event(f"!! {replica.name} (pid {replica.pid}) is down, exit status {replica.returncode}")
            elif replica.alive:
                self.down.discard(replica.name)
        leaders = [name for name, (role, _) in roles.items() if role == "LEADER"]
        leader = leaders[0] if len(leaders) == 1 else None
        was = self.clock.leader
        gap = self.clock.observe(leader, now)
        if leader != was:
            if leader is None:
                self.event(f"** no leader (was {was})")
            else:
                token = roles[leader][1]["fencing_token"]  # type: ignore[index]
                after = f" after {gap:.1f} s without one" if gap is not None else ""
                self.event(f"** LEADER: {f'{was} → ' if was else ''}{leader} (fencing token {token}){after}")
        return leader

    def _scripted_call_back(self) -> None:
        """Twilio mode: once the call to CALL_BACK_FROM went unanswered, that customer rings back
        (attested A) and presses 1; what the call heard is told when it is over."""
        if self.cluster.telephony_provider != "twilio" or self.call_back_told:
            return
        client: Any = self.cluster.provider.client
        calls = client.calls()
        if self.call_back is None:
            if any(c["to"] == CALL_BACK_FROM and c["status"] == "no-answer" for c in calls):
                proxy = self.cluster.webhook_proxy
                assert proxy is not None
                self.call_back = client.ring_service(**{
                    "from": CALL_BACK_FROM, "to": SERVICE_NUMBER, "attestation": "A", "digits": "1",
                    "url": f"{proxy.public_url}/telephony/twilio/incoming"})["sid"]
                self.event(f"<< call-back: {mask_phone(CALL_BACK_FROM)} missed the call and rings the number back "
                           "(STIR/SHAKEN A), will press 1")
            return
        call = next((c for c in calls if c["sid"] == self.call_back), None)
        if call is not None and call["status"] == "completed":
            self.call_back_told = True
            heard = " | ".join(call["heard"]) or "nothing"
            self.event(f"<< call-back {call['sid'][-6:]} heard: {heard} (pressed {''.join(call['digits']) or '-'})")

    def tick(self) -> Snapshot:
        now = time.monotonic()
        try:
            self._scripted_call_back()
        except httpx.HTTPError as error:
            self.event(f"<< call-back: the fake did not answer ({type(error).__name__})")
        roles = self._roles()
        leader = self._notice(roles, now)
        try:
            calls = provider_calls(self.cluster)
        except httpx.HTTPError:
            calls = []
        for call in calls[self.calls_seen:]:
            self.event(f"   call {call['id'][:13]}… to {mask_phone(call['to'])} placed by {call['placed_by']}")
        self.calls_seen = max(self.calls_seen, len(calls))
        if self.receiver is not None:
            deliveries = self.receiver.deliveries()
            for delivery in deliveries[self.events_seen:]:
                self.event(event_line(delivery.event))
            self.events_seen = max(self.events_seen, len(deliveries))
        for token in sorted(view["fencing_token"] for _, view in roles.values() if view and view["is_leader"]):
            self.terms.setdefault(token, len(self.terms) + 1)
        per_replica = Counter(call["placed_by"] for call in calls)
        rows = []
        for replica in self.cluster.replicas:
            role, view = roles[replica.name]
            token = view["fencing_token"] if view and view["is_leader"] else None
            rows.append(ReplicaRow(replica.name, replica.pid, role, self.terms.get(token) if token else None, token,
                                   per_replica[replica.name]))
        return Snapshot(
            elapsed=now - self.started, rows=rows, leader=leader, failover=self.clock.line(now),
            leaderless=leader is None, statuses=self.cluster.reminder_statuses(), calls=len(calls),
            keys=len({c["idempotency_key"] for c in calls}), last_calls=calls[-8:][::-1], events=list(self.events),
            outcomes=self.cluster.outcomes() if self.cluster.telephony_provider == "twilio" else Counter(),
        )


# -- keys ----------------------------------------------------------------------------------------


class Controller:
    """What each key does to the cluster; returns what happened (also logged as an event)."""

    def __init__(self, cluster: Cluster, view: LiveView) -> None:
        self.cluster = cluster
        self.view = view

    def press(self, key: str) -> str | None:
        action = {"k": self.kill_leader, "s": self.stop_leader, "c": self.resume, "r": self.restart}.get(key)
        if key == "q":
            raise Stop("q pressed")
        if action is None:
            return None
        outcome = action()
        self.view.event(f">> [{key}] {outcome}")
        return outcome

    def _leader(self) -> Any:
        name = self.view.clock.leader
        replica = self.cluster.replica(name) if name else None
        return replica if replica is not None and replica.live else None

    def kill_leader(self) -> str:
        replica = self._leader()
        if replica is None:
            return "no leader to kill right now"
        replica.kill()
        self.view.clock.lost(time.monotonic())
        return f"SIGKILL {replica.name} (pid {replica.pid}), the leader: a follower takes over once its lease expires"

    def stop_leader(self) -> str:
        replica = self._leader()
        if replica is None:
            return "no leader to stop right now"
        replica.stop()
        self.view.clock.lost(time.monotonic())
        return f"SIGSTOP {replica.name} (pid {replica.pid}), the leader: frozen, its lease runs out; c resumes it"

    def resume(self) -> str:
        paused = [r for r in self.cluster.replicas if r.alive and r.paused]
        for replica in paused:
            replica.cont()
        return f"SIGCONT {', '.join(r.name for r in paused)}" if paused else "nothing is stopped"

    def restart(self) -> str:
        dead = [r for r in self.cluster.replicas if not r.alive]
        for replica in dead:
            replica.start()
        return f"restarted {', '.join(r.name for r in dead)} (they rejoin as followers)" if dead else "nothing is down"


class KeyReader:
    """Single key presses from a terminal on stdin (cbreak mode: Ctrl-C still signals), restored
    on exit. Without a terminal `read` just waits. A terminal that went away (end of input or an
    I/O error) raises TerminalGone: nobody is watching, so the demo cleans up and ends."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.enabled = os.isatty(self.fd)
        self._saved: list[Any] | None = None

    def __enter__(self) -> KeyReader:
        if self.enabled:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except (termios.error, OSError):
                pass  # the terminal is gone

    def read(self, timeout: float) -> str:
        """Keys pressed within `timeout` s (returns at the first one), "" when none."""
        if not self.enabled:
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return ""
        try:
            data = os.read(self.fd, 64)
        except OSError as error:
            raise TerminalGone(f"terminal gone ({error.strerror})") from None
        if not data:
            raise TerminalGone("terminal gone (end of input)")
        text = data.decode(errors="ignore")
        return "" if "\x1b" in text else text  # arrow keys and the like: not commands


# -- drawing -------------------------------------------------------------------------------------


def plain_status(snapshot: Snapshot, cluster: Cluster) -> str:
    """One line per tick for a log or a pipe."""
    parts = " | ".join(
        f"{row.name} {row.role}{f' term {row.term} token {row.token}' if row.token else ''} {row.calls} calls"
        for row in snapshot.rows
    )
    total = sum(snapshot.statuses.values())
    leader = cluster.replica(snapshot.leader) if snapshot.leader else None
    hint = f"kill -9 {leader.pid}" if leader else snapshot.failover
    outcomes = f" || {outcome_line(snapshot.outcomes)}" if snapshot.outcomes else ""
    return f"[{snapshot.elapsed:5.1f}s] {parts} || sent {snapshot.statuses['sent']}/{total}{outcomes} || {hint}"


_OUTCOME_KEYS = ("answered", "voicemail", "no_answer", "busy", "failed")


def outcome_line(outcomes: Counter[str]) -> str:
    """`outcomes answered 4 · voicemail 1 · no_answer 1 | confirmed 3 · declined 1 · opted_out 1`."""
    calls = " · ".join(f"{key} {outcomes[key]}" for key in _OUTCOME_KEYS if outcomes[key])
    answers = " · ".join(f"{key} {outcomes[key]}" for key in ("confirmed", "declined", "opted_out") if outcomes[key])
    return f"outcomes {calls or 'none yet'} | keypad {answers or 'none yet'}"


_ROLE_STYLE = {"LEADER": "bold green", "follower": "cyan", "paused": "bold yellow", "down": "bold red",
               "no answer": "red"}


def screen(snapshot: Snapshot, *, title: str, keys: bool) -> Any:
    """The live screen: replicas, failover timer and counts, the last calls, events, keys."""
    from rich.console import Group
    from rich.layout import Layout
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    replicas = Table(expand=True, box=None, header_style="bold")
    for column, justify in (("replica", "left"), ("pid", "right"), ("role", "left"), ("term", "right"),
                            ("fencing token", "right"), ("calls placed", "right")):
        replicas.add_column(column, justify=justify)  # type: ignore[arg-type]
    busiest = max([row.calls for row in snapshot.rows] + [1])
    for row in snapshot.rows:
        bar = "█" * round(10 * row.calls / busiest)
        replicas.add_row(row.name, str(row.pid or ""), Text(row.role, style=_ROLE_STYLE.get(row.role, "")),
                         str(row.term or ""), str(row.token or ""), f"{row.calls:>4} {bar:<10}")
    statuses, total = snapshot.statuses, sum(snapshot.statuses.values())
    duplicates = snapshot.calls - snapshot.keys
    counts = Text.assemble(
        (snapshot.failover + "\n\n", "bold red" if snapshot.leaderless else "bold green"),
        f"reminders  sent {statuses['sent']} of {total} · pending {statuses['pending']} · "
        f"dispatching {statuses['dispatching']}\n"
        f"provider   {snapshot.calls} calls for {snapshot.keys} reminder keys · ",
        (f"{duplicates} duplicates", "bold red" if duplicates else "green"),
        f"\n{outcome_line(snapshot.outcomes)}" if snapshot.outcomes else "",
    )
    calls = Table(expand=True, box=None, header_style="bold")
    for column in ("created", "call", "placed by", "to", "idempotency key"):
        calls.add_column(column, no_wrap=True)
    for call in snapshot.last_calls:
        calls.add_row(call["created_at"][11:19], call["id"][:18] + "…", call["placed_by"], mask_phone(call["to"]),
                      call["idempotency_key"][:24] + "…")
    layout = Layout()
    layout.split_column(
        Layout(Text(title, style="bold"), size=1),
        Layout(name="top", size=len(snapshot.rows) + 4),
        Layout(Panel(calls, title="last calls"), size=len(snapshot.last_calls) + 3 if snapshot.last_calls else 4),
        Layout(Panel(Group(*[Text(e) for e in snapshot.events[-12:]]), title="what happened")),
        Layout(Text(KEYS_HELP if keys else "keys need a terminal on stdin · Ctrl-C stops everything",
                    style="reverse"), size=1),
    )
    layout["top"].split_row(Layout(Panel(replicas, title="replicas"), ratio=3),
                            Layout(Panel(counts, title="failover"), ratio=2))
    return layout


# -- the demo ------------------------------------------------------------------------------------


def summary(cluster: Cluster, view: LiveView | None) -> None:
    """What happened: leader changes, calls per replica, keys vs calls (exactly once), reminders,
    the events the receiver got."""
    if view is not None and view.receiver is not None:
        deliveries = view.receiver.deliveries()
        kinds = Counter(d.event.get("type") for d in deliveries)
        print(f"events received and verified: {len(deliveries)} ({len({d.id for d in deliveries})} ids) "
              f"{dict(kinds)}", flush=True)
    try:
        calls = provider_calls(cluster)
        posts = cluster.provider.client.requests()  # type: ignore[union-attr]
        statuses = cluster.reminder_statuses()
    except Exception as error:  # noqa: BLE001 - a summary must not stop the teardown
        print(f"(no summary: {type(error).__name__}: {error})")
        return
    if view is not None and view.echo is None:  # the screen is gone: repeat what happened but the calls
        print("\n".join([e for e in view.events if "   call " not in e][-15:]))
    per_replica = dict(Counter(c["placed_by"] for c in calls))
    if cluster.telephony_provider == "twilio":
        heard = Counter(c["idempotency_key"] for c in calls if c["idempotency_key"].startswith("heard"))
        print(f"summary (Twilio mode): calls placed per replica {per_replica}; {len(posts)} creates, {len(calls)} "
              f"calls, {len(heard)} reminders heard (at most {max(heard.values(), default=0)} time(s) each), "
              f"{len(calls) - sum(heard.values())} calls without a message; reminders {dict(statuses)}; "
              f"{outcome_line(cluster.outcomes())}", flush=True)
        return
    print(f"summary: calls placed per replica {per_replica}; {len(calls)} calls for "
          f"{len({c['idempotency_key'] for c in calls})} distinct idempotency keys; {len(posts)} POSTs, "
          f"{sum(p['replayed'] for p in posts)} replayed; reminders {dict(statuses)}", flush=True)


def _screen_possible() -> bool:
    """stdout is a terminal that can redraw in place (not TERM=dumb), as rich's Live sees it."""
    from rich.console import Console

    return Console().is_interactive


def watch(view: LiveView, deadline: float | None, title: str) -> None:
    """Redraw the screen (or print plain lines) every second and act on keys until the deadline
    or a Stop."""
    cluster, terminal = view.cluster, view.echo is None
    controller = Controller(cluster, view)
    with KeyReader() as keys:
        live = None
        if terminal:
            from rich.live import Live

            live = Live(screen=True, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
        try:
            if live is not None:
                live.start()
            next_tick = time.monotonic()
            while deadline is None or time.monotonic() < deadline:
                snapshot = view.tick()
                if live is not None:
                    live.update(screen(snapshot, title=title, keys=keys.enabled), refresh=True)
                else:
                    print(plain_status(snapshot, cluster), flush=True)
                next_tick += 1.0
                while (left := next_tick - time.monotonic()) > 0:
                    if any([controller.press(key) for key in keys.read(left)]):
                        break  # redraw at once
                next_tick = max(next_tick, time.monotonic())
        finally:
            if live is not None:
                try:
                    live.stop()
                except OSError:
                    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C or q)")
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
    receiver = EventsReceiver()
    env.update(receiver.settings)
    if args.provider == "twilio":
        env["RECONCILE_GRACE"] = "10s"
        env["NO_ANSWER_RETRY_DELAY"] = "20s"  # the retry of an unanswered call within the demo's minute or so
        env["MESSAGE_TEMPLATES"] = json.dumps(DEMO_TEMPLATES)
    shaped = "Twilio-shaped " if args.provider == "twilio" else ""
    print(f"starting etcd, the {shaped}fake provider ({args.latency_ms:.0f} ms) and {args.replicas} replicas on "
          f"{'PostgreSQL' if database_url else 'SQLite (one file, WAL)'}, lease TTL {lease_ttl} s"
          f"{', LEADER_MAX_TERM ' + env['LEADER_MAX_TERM'] + ' s' if 'LEADER_MAX_TERM' in env else ''} …", flush=True)
    reason = "duration reached"
    try:
        with receiver, Cluster(args.replicas, database_url=database_url, provider_latency_ms=args.latency_ms,
                               lease_ttl=lease_ttl, env=env, telephony_provider=args.provider,
                               fake_calls_per_second=2) as cluster:
            view = None
            try:
                print(f"  events receiver (harness.events_receiver): {receiver.receiver.url}, EVENTS_SECRET generated",
                      flush=True)
                for replica in cluster.replicas:
                    print(f"  {replica.name}: pid {replica.pid}, {replica.url} (metrics {replica.metrics_url})",
                          flush=True)
                if args.provider == "twilio":
                    cluster.provider.client.callees(  # type: ignore[union-attr]
                        {phone: script for phone, (script, _) in TWILIO_CALLEES.items()})
                booked = book_appointments(cluster, args.appointments, first_in=4, last_in=60)
                print(f"booked {args.appointments} appointments through POST /appointments on replica-0: "
                      f"{booked} reminders due over the next minute", flush=True)
                deadline = None if args.duration is None else time.monotonic() + args.duration
                title = (f"reminders demo — {args.replicas} replicas, lease TTL {lease_ttl} s, "
                         f"{'PostgreSQL' if database_url else 'SQLite'} — Ctrl-C or q stops everything")
                view = LiveView(cluster, echo=None if _screen_possible() else lambda line: print(line, flush=True),
                                receiver=receiver)
                watch(view, deadline, title)
            except Stop as signalled:
                if isinstance(signalled, TerminalGone):
                    _detach_from_terminal()
                reason = str(signalled)
            except OSError as error:  # writing to a terminal that went away (EIO)
                _detach_from_terminal()
                reason = f"terminal gone ({error})"
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
