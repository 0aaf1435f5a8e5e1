"""A cluster of real processes on loopback: etcd, the fake provider and N `reminders serve` replicas.

Used by the multi-process tests, the demo (`make run`), the benchmarks and the chaos suite::

    with Cluster(replicas=3, database_url=postgres_url, etcd_endpoint=etcd.endpoint) as cluster:
        leader = cluster.leader()
        cluster.seed_due_reminders(200, due_in_seconds=1, spread_seconds=3)
        cluster.replica(leader).kill()
        ...

Each replica talks to etcd through its own `TcpProxy` (`replica.proxy.stall()` partitions that
one replica), places calls under its own path prefix at the provider (`placed_by` = its name),
and logs to `<workdir>/<name>.log`. Every wait has a deadline; `close()` (the context manager's
exit) tears everything down even after a failure: SIGTERM, then SIGKILL whatever is left.

For fault injection beyond one replica: `own_postgres=True` gives the cluster a PostgreSQL server
of its own (`restart_postgres()`), an etcd of its own is started unless `etcd_endpoint` is given
(`kill_etcd()` / `start_etcd()`), `add_replica()` starts one more (a rolling update's new pod),
`watch_leaders=True` samples every replica's GET /leader in the background (`LeaderWatch`:
`terms()` is what it saw, by fencing token), and `recover()` + `clear()` bring a cluster back to
"all replicas ready, one leader, no reminders, provider reset" between scenarios. Reminders are
planned as the service plans them (`seed_due_reminders`: the domain's planning and wording, the
ledger's create statement).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import httpx

from .etcd import EtcdServer
from .ports import free_port, wait_for_port
from .postgres import PostgresServer
from .proxy import TcpProxy

__all__ = [
    "FAKETIME_LIBRARIES",
    "REAL_FAKES",
    "Cluster",
    "LeaderTerm",
    "LeaderWatch",
    "ProviderClient",
    "ProviderProcess",
    "RealFakeClient",
    "RealFakeProcess",
    "RealProviderFake",
    "ReplicaProcess",
    "WebhookProxyProcess",
    "faketime_library",
    "planned_appointments",
    "wait_for",
    "with_checkout_fakes",
]

ROOT = Path(__file__).resolve().parents[1]
# The fake providers: a distribution of their own (fakes/pyproject.toml), whose package sits one
# folder down, where a child's working directory does not reach it.
FAKES = ROOT / "fakes"
T = TypeVar("T")


def with_checkout_fakes(env: dict[str, str]) -> dict[str, str]:
    """`env` with the checkout's fakes first on PYTHONPATH: a child imports them from this checkout
    (over any installed copy), as it imports the checkout's service from its working directory."""
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(FAKES)]
    return {**env, "PYTHONPATH": os.pathsep.join([str(FAKES), *rest])}


# libfaketime (Debian package `faketime`, which brings `libfaketime`): a replica started with it in
# LD_PRELOAD and FAKETIME="+8s" reads a wall clock 8 s ahead (`Cluster.skew_clocks`).
FAKETIME_LIBRARIES = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                      "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1")


def faketime_library() -> str | None:
    """The libfaketime shared object to preload, or None when it is not installed."""
    return next((path for path in FAKETIME_LIBRARIES if Path(path).is_file()), None)


def wait_for(check: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `check()` until it returns something truthy (returned); TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without any service setting (they would leak in), plus `extra`."""
    from service.config import Settings

    settings = {name.upper() for name in Settings.model_fields} | {"ETCD_ENDPOINT"}
    env = {k: v for k, v in os.environ.items() if k not in settings}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return with_checkout_fakes(env)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class LeaderTerm:
    """One leader term as the replica's GET /leader showed it (epoch seconds, `LeaderWatch`).

    `started` is the earliest moment it can have begun: when the replica's last answer without it
    was asked for (or its process started), so nothing of the term can come before it; `seen` is
    when the first answer showing it was asked for. `ended` is when the first answer without it
    came back; None while it lasts, and for a replica that died or was restarted before an answer
    showed the end (SIGKILL)."""

    token: int
    replica: str
    started: float
    ended: float | None = None
    seen: float | None = None


class _Process:
    """A child process started in its own session, logging (appending) to one file."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.started_at: float | None = None  # epoch seconds of the latest start

    def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        with open(self.log_path, "ab") as log:
            log.write(f"--- {datetime.now(UTC):%H:%M:%S.%f} starting {self.name}\n".encode())
            log.flush()
            self.started_at = time.time()
            self.process = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.paused = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        """Started and not exited (a SIGSTOPped process is alive)."""
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _signal(self, sig: int) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.process is not None:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.paused = False

    def stop(self) -> None:
        """SIGSTOP: frozen, its sockets stay open (a long GC pause, a stuck VM)."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def cont(self) -> None:
        """SIGCONT."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait up to `timeout` s for the exit code; SIGKILL and TimeoutError if it hangs."""
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        if self.paused:
            self.cont()
        self._signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"{self.name} did not exit within {timeout} s of SIGTERM") from None


class ProviderClient:
    """Small sync client for the fake provider's inspection and control endpoints."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=5.0)

    def calls(self, placed_by: str | None = None) -> list[dict[str, Any]]:
        params = {"placed_by": placed_by} if placed_by else None
        return self._http.get("/v1/calls", params=params).raise_for_status().json()["calls"]

    def requests(self) -> list[dict[str, Any]]:
        """Every POST received, in arrival order (status None while still running)."""
        return self._http.get("/v1/requests").raise_for_status().json()["requests"]

    def control(self, **settings: Any) -> dict[str, Any]:
        """Change `latency_ms`, `fail_rate`, `fail_status`, `hang`; returns the new settings."""
        return self._http.post("/v1/control", json=settings).raise_for_status().json()

    def reset(self) -> None:
        self._http.post("/v1/reset").raise_for_status()

    def close(self) -> None:
        self._http.close()


class ProviderProcess(_Process):
    """`reminders fake-provider` on a free port."""

    def __init__(self, log_path: Path, *, latency_ms: float = 0.0, port: int | None = None) -> None:
        super().__init__("provider", log_path)
        self.latency_ms = latency_ms
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = ProviderClient(self.url)

    def start(self, timeout: float = 30.0) -> ProviderProcess:
        argv = [sys.executable, "-m", "service.cli", "fake-provider", "--port", str(self.port),
                "--latency-ms", str(self.latency_ms)]
        self._spawn(argv, _child_env({}))
        wait_for_port(self.port, timeout=timeout)
        wait_for(self._answers, timeout=timeout, what="fake provider answering")
        return self

    def _answers(self) -> bool:
        try:
            self.client.calls()
        except httpx.HTTPError:
            return False
        return True

    def close(self) -> None:
        try:
            if self.alive:
                self.terminate(timeout=5)
        finally:
            self.client.close()


TWILIO_SID = "AC" + "5" * 32
TWILIO_TOKEN = "cluster-twilio-token"
TELNYX_KEY = "cluster-telnyx-key"
TELNYX_CONNECTION = "1494404757140276705"
WEBHOOK_PREFIX = "/edge"


class RealFakeClient:
    """Sync client of a real provider's fake: the inspection and control routes (`/_fake/...`)
    the Twilio- and Telnyx-shaped fakes share."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=10.0)
        # controls set again after every reset (the fake's reset restores its own defaults):
        # `time_scale` of a fake started on a clock of its own (harness.real_fake)
        self.defaults: dict[str, Any] = {}

    def _get(self, path: str, tries: int = 3) -> Any:
        """GET an inspection route; asked again after a timeout (a fake busy with a burst on a
        loaded machine answers late: a runner's poll must not end the run)."""
        for attempt in range(tries):
            try:
                return self._http.get(path).raise_for_status().json()
            except httpx.TimeoutException:
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def calls(self, placed_by: str | None = None) -> list[dict[str, Any]]:
        """Every call with what it heard (`heard`), its stamp (`stamp`: r, a) and status."""
        return self._get("/_fake/calls")["calls"]

    def requests(self) -> list[dict[str, Any]]:
        """Every create received, in arrival order (status None while still running)."""
        return self._get("/_fake/requests")["requests"]

    def _post(self, path: str, body: Any = None, tries: int = 3) -> Any:
        """POST a control route (each sets a state: asking again is harmless), again after a timeout."""
        for attempt in range(tries):
            try:
                return self._http.post(path, json=body).raise_for_status().json()
            except httpx.TimeoutException:
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def control(self, **settings: Any) -> dict[str, Any]:
        """`latency_ms`, `calls_per_second`, `ring_ms`, `reject_rate`, `fail_after_create_rate`,
        `hang`; the generic fake's `fail_rate` means a 500 after the call was created."""
        if "fail_rate" in settings:
            settings["fail_after_create_rate"] = settings.pop("fail_rate")
        settings.pop("fail_status", None)
        return self._post("/_fake/control", settings)

    def callees(self, scripts: dict[str, dict[str, Any]]) -> None:
        """Script the callee per number: {"+1…": {"behaviour": "answer|machine|no-answer|busy", "digits": "1"}}."""
        self._post("/_fake/callees", scripts)

    def ring_service(self, **call: Any) -> dict[str, Any]:
        """A customer calls the service's number (`from`, `to`, `url`: the number's voice URL or the
        connection's webhook URL, `attestation`, `digits`): `POST /_fake/incoming`."""
        return self._http.post("/_fake/incoming", json=call).raise_for_status().json()

    def reset(self) -> None:
        self._post("/_fake/reset")
        if self.defaults:
            self.control(**self.defaults)

    def close(self) -> None:
        self._http.close()


def _twilio_settings(api_url: str) -> dict[str, str]:
    return {"TWILIO_API_URL": api_url, "TWILIO_ACCOUNT_SID": TWILIO_SID, "TWILIO_AUTH_TOKEN": TWILIO_TOKEN}


def _telnyx_settings(api_url: str) -> dict[str, str]:
    from reminders_fakes.telnyx import TEST_PUBLIC_KEY  # the fake signs its events with the pair's private half

    return {"TELNYX_API_URL": api_url, "TELNYX_API_KEY": TELNYX_KEY, "TELNYX_CONNECTION_ID": TELNYX_CONNECTION,
            "TELNYX_PUBLIC_KEY": TEST_PUBLIC_KEY}


@dataclass(frozen=True)
class RealProviderFake:
    """A real provider's fake as a cluster runs it: its module, the account it serves (flags) and
    the replicas' settings for that account, given the API URL (the replica's own path prefix
    there: the fake records it as `placed_by`)."""

    provider: str
    module: str
    account: tuple[str, ...]
    settings: Callable[[str], dict[str, str]]


REAL_FAKES = {
    "twilio": RealProviderFake("twilio", "reminders_fakes.twilio",
                               ("--account-sid", TWILIO_SID, "--auth-token", TWILIO_TOKEN), _twilio_settings),
    # the fake's rate is Dials per second: over it, 429 (code 90103)
    "telnyx": RealProviderFake("telnyx", "reminders_fakes.telnyx",
                               ("--api-key", TELNYX_KEY, "--connection-id", TELNYX_CONNECTION), _telnyx_settings),
}


class RealFakeProcess(ProviderProcess):
    """`python -m reminders_fakes.<provider>` on a free port, serving the account `fake.account`
    (Telnyx: events signed with the fake's fixed test key pair). With a `time_scale` other than 1,
    `python -m harness.real_fake <provider>`: the provider's documented windows scaled, its webhook
    timeout kept real."""

    def __init__(self, log_path: Path, fake: RealProviderFake, *, latency_ms: float = 0.0,
                 calls_per_second: float = 1.0, ring_ms: float = 200.0, time_scale: float = 1.0) -> None:
        super().__init__(log_path, latency_ms=latency_ms)
        self.fake = fake
        self.name = f"{fake.provider}-fake"
        self.calls_per_second = calls_per_second
        self.ring_ms = ring_ms
        self.time_scale = time_scale
        self.client = RealFakeClient(self.url)  # type: ignore[assignment]

    def start(self, timeout: float = 30.0) -> RealFakeProcess:
        module = [self.fake.module] if self.time_scale == 1 else [
            "harness.real_fake", self.fake.provider, "--time-scale", str(self.time_scale)]
        argv = [sys.executable, "-m", *module, "--port", str(self.port), "--latency-ms",
                str(self.latency_ms), "--cps", str(self.calls_per_second), "--ring-ms", str(self.ring_ms),
                *self.fake.account]
        self.client.defaults = {} if self.time_scale == 1 else {"time_scale": self.time_scale}  # type: ignore[attr-defined]
        self._spawn(argv, _child_env({}))
        wait_for_port(self.port, timeout=timeout)
        wait_for(self._answers, timeout=timeout, what=f"{self.name} answering")
        return self


class WebhookProxyProcess(_Process):
    """`python -m harness.webhook_proxy`: the Ingress in front of the replicas' webhook routes."""

    def __init__(self, log_path: Path, prefix: str = WEBHOOK_PREFIX) -> None:
        super().__init__("webhook-proxy", log_path)
        self.prefix = prefix
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.public_url = self.url + prefix
        self._http = httpx.Client(base_url=self.url, timeout=5.0)

    def start(self, timeout: float = 30.0) -> WebhookProxyProcess:
        argv = [sys.executable, "-m", "harness.webhook_proxy", "--port", str(self.port), "--prefix", self.prefix]
        self._spawn(argv, _child_env({}))
        wait_for_port(self.port, timeout=timeout)
        return self

    def set_upstreams(self, urls: list[str]) -> None:
        self._http.put("/_proxy/upstreams", json=urls).raise_for_status()

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        """POST under the public prefix, as the provider would (`path` starts with /telephony/…)."""
        return self._http.post(self.prefix + path, **kwargs)

    def record_stats(self, on: bool = True) -> None:
        """Count the webhooks it forwards from now (afresh), or stop (harness.webhook_proxy.ProxyStats)."""
        self._http.post("/_proxy/stats", json={"record": on}).raise_for_status()

    def stats(self, full: bool = False) -> dict[str, Any]:
        """What it counted: per label, answers and the last one's time; `full`: each one's latency too."""
        return self._http.get("/_proxy/stats", params={"full": "1"} if full else None,
                              timeout=30.0).raise_for_status().json()

    def close(self) -> None:
        try:
            if self.alive:
                self.terminate(timeout=5)
        finally:
            self._http.close()


class ReplicaProcess(_Process):
    """One `reminders serve` process; `restart()` starts it again with the same name, ports and env.
    Its metrics are on a port of their own (`metrics_url`): several replicas share this host."""

    def __init__(self, name: str, log_path: Path, env: dict[str, str], proxy: TcpProxy) -> None:
        super().__init__(name, log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # a free port unless the cluster's env names one (0: no metrics port, `metrics()` fails)
        self.metrics_port = int(env.get("METRICS_PORT") or free_port())
        while self.metrics_port == self.port:  # two free ports asked in a row may be the same one
            self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.env = {**env, "METRICS_PORT": str(self.metrics_port)}
        self.proxy = proxy
        self._http = httpx.Client(base_url=self.url, timeout=2.0)

    def start(self) -> ReplicaProcess:
        argv = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self._spawn(argv, _child_env(self.env))
        return self

    def restart(self, timeout: float = 30.0) -> ReplicaProcess:
        """Start again (after kill/terminate) and wait until ready."""
        self.start()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll /readyz until 200; fails at once (with the log's tail) if the process exited."""

        def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited with {self.returncode}:\n{_tail(self.log_path)}")
            try:
                return self._http.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=timeout, what=f"{self.name} ready", interval=0.1)

    def status(self) -> dict[str, Any]:
        """GET /leader: {instance, is_leader, leader, fencing_token, lease_ttl}."""
        return self._http.get("/leader").raise_for_status().json()

    def metrics(self) -> dict[str, float]:
        """GET /metrics on the metrics port: every sample by name, labels appended as `name{label="value",…}`."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self._http.get(self.metrics_url).raise_for_status().text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return samples

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._http.get(path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._http.post(path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._http.patch(path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._http.delete(path, **kwargs)

    @property
    def live(self) -> bool:
        """Running and not SIGSTOPped: expected to answer."""
        return self.alive and not self.paused

    def close(self) -> None:
        self._http.close()


class _LoopThread:
    """An event loop in a daemon thread, so sync callers (tests, demo) can use the async Database."""

    def __init__(self, name: str = "cluster-db") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


def planned_appointments(
    count: int, *, due_in_seconds: float, spread_seconds: float, starts_in_seconds: float | Callable[[int], float],
    timezone: str, phone: str | Callable[[int], str],
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(appointment row, its reminder rows) for `Cluster.seed_due_reminders`, planned by the domain
    as of now; ValueError for a number the API would refuse or a time that cannot be planned.
    `starts_in_seconds` and `phone` may be functions of the index."""
    from service.db import AppointmentStatus
    from service.db.models import new_id
    from service.ledger.plans import reminder_row
    from service.reminders import (
        ALWAYS,
        MessageTemplates,
        NumberPolicy,
        number_refusal,
        plan_reminders,
    )

    templates, zone, policy = MessageTemplates.parse(None), ZoneInfo(timezone), NumberPolicy()
    language = templates.default_language
    now = datetime.now(UTC)
    refusals: dict[str, str | None] = {}
    planned = []
    for index in range(count):
        number = phone(index) if callable(phone) else phone
        if number not in refusals:
            try:
                refusals[number] = number_refusal(number, policy)
            except ValueError as error:  # not a number at all
                refusals[number] = str(error)
        if refusals[number]:
            raise ValueError(f"seed number {number} would be refused: {refusals[number]}")
        starts_at = now + timedelta(seconds=starts_in_seconds(index) if callable(starts_in_seconds)
                                    else starts_in_seconds)
        due = now + timedelta(seconds=due_in_seconds + spread_seconds * index / max(1, count))
        plan = plan_reminders(starts_at=starts_at, zone=zone, window=ALWAYS, now=now, explicit=[due])
        if plan.unplanned:
            raise ValueError(f"reminder {index} due {due.isoformat()} was not planned: {plan.unplanned[0].reason}")
        name = f"Customer {index}"
        appointment = {"id": new_id(), "customer_name": name, "phone": number, "phone_hash": None,
                       "starts_at": starts_at, "timezone": timezone, "notes": None, "remind_at": [due.isoformat()],
                       "status": AppointmentStatus.SCHEDULED, "language": language, "created_at": now,
                       "updated_at": now}
        wording = templates.render(language, name, starts_at, timezone).to_json()
        reminders = [reminder_row(appointment["id"], due_at, wording, now) for due_at in plan.due_times]
        planned.append((appointment, reminders))
    return planned


class LeaderWatch:
    """Leader terms as the replicas publish them: GET /leader of every replica of `replicas()`
    (asked again each time, so added and restarted replicas are followed), each every `interval`
    seconds and each request bounded by `timeout`, from a thread of its own. A term is a fencing
    token one replica showed (`is_leader`, `fencing_token`); see `LeaderTerm` for its times.

    A paused (SIGSTOPped) replica is not asked: it could not answer. A term that begins and ends
    between two answers of its replica goes unseen: `interval` is kept far below the terms that
    matter (a lease lasts seconds)."""

    def __init__(self, replicas: Callable[[], Sequence[ReplicaProcess]], *, interval: float = 0.05,
                 timeout: float = 1.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._replicas = replicas
        self.interval, self.timeout = interval, timeout
        self._transport = transport  # tests: replicas that are not processes
        self._terms: dict[int, LeaderTerm] = {}
        self._lock = threading.Lock()
        self._thread: _LoopThread | None = None
        self._task: asyncio.Task[None] | None = None  # the watch, in the thread's loop

    def start(self) -> LeaderWatch:
        if self._thread is None:
            self._thread = _LoopThread("leader-watch")

            async def spawn() -> asyncio.Task[None]:
                return asyncio.create_task(self._watch(), name="leader-watch")

            self._task = self._thread.run(spawn(), timeout=5)
        return self

    def stop(self) -> None:
        thread, task, self._thread, self._task = self._thread, self._task, None, None
        if thread is None or task is None:
            return

        async def halt() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        try:
            thread.run(halt(), timeout=10)
        finally:
            thread.close()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def terms(self) -> list[LeaderTerm]:
        """Every term seen so far, ordered by fencing token (copies)."""
        with self._lock:
            return [replace(term) for _, term in sorted(self._terms.items())]

    async def _watch(self) -> None:
        following: dict[int, asyncio.Task[None]] = {}
        async with httpx.AsyncClient(timeout=self.timeout, transport=self._transport) as http:
            try:
                while True:
                    for replica in list(self._replicas()):
                        if id(replica) not in following:
                            following[id(replica)] = asyncio.create_task(self._follow(http, replica))
                    await asyncio.sleep(self.interval)
            finally:
                for task in following.values():
                    task.cancel()
                await asyncio.gather(*following.values(), return_exceptions=True)

    async def _follow(self, http: httpx.AsyncClient, replica: ReplicaProcess) -> None:
        """One replica's answers, for as long as the watch runs."""
        incarnation: float | None = None  # the process start the answers below come from
        showing: LeaderTerm | None = None  # the term its last answer showed
        asked_before = 0.0  # when its previous answer (or its process start) was asked for
        while True:
            await asyncio.sleep(self.interval)
            if not replica.alive or replica.started_at != incarnation:
                showing = None  # died or restarted before showing the end: `ended` stays None
                incarnation = replica.started_at if replica.alive else None
                asked_before = incarnation or 0.0
            if incarnation is None or replica.paused:
                continue
            asked = time.time()
            try:
                view = (await http.get(f"{replica.url}/leader")).raise_for_status().json()
            except (httpx.HTTPError, ValueError):
                continue  # not answering (starting, overloaded): nothing learned
            answered = time.time()
            token = view.get("fencing_token") if view.get("is_leader") else None
            with self._lock:
                if showing is not None and showing.token != token:
                    showing.ended, showing = answered, None
                if token is not None and showing is None:
                    showing = self._terms.setdefault(token, LeaderTerm(token, replica.name, asked_before, seen=asked))
            asked_before = asked


class Cluster:
    """etcd + migrated DB + fake provider + N replicas, torn down on exit whatever happened.

    `keep_logs` (or CLUSTER_KEEP_LOGS=1) leaves the work dir with the logs after `close()`.
    `database_url`: PostgreSQL (an empty or migrated database) or None for a shared SQLite file in
    the work dir. `etcd_endpoint`: an existing etcd (isolation by a unique ELECTION_PREFIX) or None
    to start one. `env`: settings for every replica (e.g. {"DISPATCH_CONCURRENCY": "20"}).
    `telephony_provider`: `generic`, or a real provider run against its fake (`REAL_FAKES`; calls
    leave the Twilio fake's queue, or Telnyx Dials are accepted, at `fake_calls_per_second`).
    `watch_leaders`: a `LeaderWatch` follows every replica from the start (`terms()`).
    """

    def __init__(
        self,
        replicas: int = 3,
        *,
        database_url: str | None = None,
        etcd_endpoint: str | None = None,
        provider_latency_ms: float = 0.0,
        lease_ttl: int = 2,
        env: dict[str, str] | None = None,
        election_prefix: str | None = None,
        start_timeout: float = 45.0,
        keep_logs: bool | None = None,
        own_postgres: bool = False,
        telephony_provider: str = "generic",
        fake_calls_per_second: float = 1.0,
        fake_ring_ms: float = 200.0,
        watch_leaders: bool = False,
    ) -> None:
        if own_postgres and database_url is not None:
            raise ValueError("own_postgres and database_url exclude each other")
        self.size = replicas
        self.workdir = Path(tempfile.mkdtemp(prefix="cluster-"))
        self.database_url = database_url or f"sqlite+aiosqlite:///{self.workdir / 'reminders.db'}"
        self.etcd_endpoint = etcd_endpoint
        self.etcd: EtcdServer | None = None
        self.provider_latency_ms = provider_latency_ms
        self.lease_ttl = lease_ttl
        self.env = dict(env or {})
        self._scenario_keys: set[str] = set()  # the keys of `env` that `scenario_env` set
        self.election_prefix = election_prefix or f"/reminders-cluster/{uuid.uuid4().hex[:12]}"
        self.start_timeout = start_timeout
        # CLUSTER_KEEP_LOGS=1: leave the work dir (logs, SQLite file) in place after close().
        self.keep_logs = bool(os.environ.get("CLUSTER_KEEP_LOGS")) if keep_logs is None else keep_logs
        self.own_postgres = own_postgres
        self.postgres: PostgresServer | None = None
        self.postgres_running = False
        if telephony_provider != "generic" and telephony_provider not in REAL_FAKES:
            raise ValueError(f"telephony_provider must be generic or one of {sorted(REAL_FAKES)}")
        self.telephony_provider = telephony_provider
        self.fake_calls_per_second = fake_calls_per_second
        self.fake_ring_ms = fake_ring_ms
        self.provider: ProviderProcess | None = None
        # Real providers: webhooks reach the replicas through this proxy; PUBLIC_URL carries its prefix.
        self.webhook_proxy: WebhookProxyProcess | None = None
        self.replicas: list[ReplicaProcess] = []
        self.leader_watch = LeaderWatch(lambda: self.replicas) if watch_leaders else None
        self.retired: set[str] = set()
        self._next_index = 0
        self._db_loop: _LoopThread | None = None
        self._db: Any = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.close(graceful=False)
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:  # keep the evidence: pytest shows captured stderr of a failure
            try:
                for replica in self.replicas:
                    print(f"===== last lines of {replica.name}.log =====\n{_tail(replica.log_path)}", file=sys.stderr)
            except OSError:
                pass  # stderr is gone (a closed terminal): tear down all the same
        try:
            self.close(graceful=exc_type is None)
        except Exception as error:
            if exc_type is None:
                raise
            print(f"cluster teardown after a failure: {type(error).__name__}: {error}", file=sys.stderr)

    def start(self) -> Cluster:
        if self.etcd_endpoint is None:
            self.etcd = EtcdServer().start()
            self.etcd_endpoint = self.etcd.endpoint
        if self.own_postgres:
            self.postgres = PostgresServer().start()
            self.postgres_running = True
            self.database_url = self.postgres.create_database("reminders")
            # Production durability: the server runs with synchronous_commit=off for speed, which
            # would let a crash (`stop_postgres("immediate")`) lose acknowledged commits. A
            # per-database setting overrides the server's command line.
            self.postgres._run(
                "psql", "-h", "127.0.0.1", "-p", str(self.postgres.port), "-U", "postgres", "-d", "postgres",
                "-v", "ON_ERROR_STOP=1", "-c", "ALTER DATABASE reminders SET synchronous_commit = on",
            )
        self.migrate()
        if self.telephony_provider in REAL_FAKES:
            self.provider = RealFakeProcess(
                self.workdir / "provider.log", REAL_FAKES[self.telephony_provider],
                latency_ms=self.provider_latency_ms, calls_per_second=self.fake_calls_per_second,
                ring_ms=self.fake_ring_ms,
            ).start()
            self.webhook_proxy = WebhookProxyProcess(self.workdir / "webhook-proxy.log").start()
        else:
            self.provider = ProviderProcess(self.workdir / "provider.log", latency_ms=self.provider_latency_ms).start()
        for _ in range(self.size):
            self._new_replica()
        self._route_webhooks()
        for replica in self.replicas:  # start all, then wait: they boot in parallel
            replica.start()
        if self.leader_watch is not None:
            self.leader_watch.start()
        for replica in self.replicas:
            replica.wait_ready(self.start_timeout)
        return self

    def _new_replica(self) -> ReplicaProcess:
        """A replica named `replica-<n>` (n never reused), with its own etcd proxy; not started."""
        assert self.provider is not None and self.etcd_endpoint is not None
        name = f"replica-{self._next_index}"
        self._next_index += 1
        host, _, port = self.etcd_endpoint.removeprefix("http://").rpartition(":")
        proxy = TcpProxy(host, int(port)).start()
        env = {
            "POD_NAME": name,
            "DATABASE_URL": self.database_url,
            "ETCD_ENDPOINTS": proxy.endpoint,
            "TELEPHONY_URL": f"{self.provider.url}/{name}",
            "ELECTION_PREFIX": self.election_prefix,
            "LEASE_TTL": str(self.lease_ttl),
            "CALL_WINDOW": "00:00-24:00",
        }
        fake = REAL_FAKES.get(self.telephony_provider)
        if fake is not None:
            assert self.webhook_proxy is not None
            # a loopback test cluster whose callees live in many countries: open on purpose
            env.update({"TELEPHONY_PROVIDER": fake.provider, "PUBLIC_URL": self.webhook_proxy.public_url,
                        "ALLOW_OPEN_API": "true", "ALLOWED_COUNTRIES": "*",
                        **fake.settings(f"{self.provider.url}/{name}")})  # the fake records the prefix as placed_by
        env.update(self.env)
        replica = ReplicaProcess(name, self.workdir / f"{name}.log", env, proxy)
        self.replicas.append(replica)
        return replica

    def add_replica(self, *, wait: bool = True) -> ReplicaProcess:
        """Start one more replica (a rolling update's new pod) and, with `wait`, wait until ready."""
        replica = self._new_replica()
        self._route_webhooks()
        replica.start()
        if wait:
            replica.wait_ready(self.start_timeout)
        return replica

    def _route_webhooks(self) -> None:
        """Real providers: the proxy spreads webhooks over every replica (dead ones are skipped)."""
        if self.webhook_proxy is not None:
            self.webhook_proxy.set_upstreams([replica.url for replica in self.replicas])

    def retire(self, name: str, timeout: float = 20.0) -> int:
        """SIGTERM a replica for good (a rolling update's old pod): `recover()` will not restart it."""
        self.retired.add(name)
        return self.replica(name).terminate(timeout)

    @property
    def active_replicas(self) -> list[ReplicaProcess]:
        """Replicas that are meant to run (not retired), whatever their state."""
        return [r for r in self.replicas if r.name not in self.retired]

    # -- etcd and PostgreSQL faults --------------------------------------------------------------

    def _own_etcd(self) -> EtcdServer:
        if self.etcd is None:
            raise RuntimeError("the cluster uses an etcd it did not start: no etcd faults")
        return self.etcd

    @property
    def etcd_alive(self) -> bool:
        process = self._own_etcd().process
        return process is not None and process.poll() is None

    def kill_etcd(self) -> None:
        """SIGKILL etcd (its data dir stays: `start_etcd()` brings the same member back)."""
        self._own_etcd().kill()

    def start_etcd(self, timeout: float = 15.0) -> None:
        """Start the cluster's etcd again on the same port and data dir, and wait until healthy."""
        self._own_etcd().start(timeout)

    def _own_postgres(self) -> PostgresServer:
        if self.postgres is None:
            raise RuntimeError("the cluster has no PostgreSQL of its own (own_postgres=True)")
        return self.postgres

    def stop_postgres(self, mode: str = "fast") -> None:
        """Stop the cluster's PostgreSQL: `fast` (clean shutdown) or `immediate` (a crash)."""
        self.postgres_running = False
        self._own_postgres().stop(mode)

    def start_postgres(self) -> None:
        """Start it again (same port and data; crash recovery after `immediate`)."""
        self._own_postgres().start()
        self.postgres_running = True

    # -- the provider's clock and the replicas' clocks --------------------------------------------

    def set_fake_time_scale(self, scale: float) -> None:
        """Run the real provider's fake with its documented windows scaled by `scale` (its webhook
        timeout kept real: harness.real_fake): restarted on the same port when the scale changes.
        Its calls and controls are lost: between runs only."""
        provider = self.provider
        if not isinstance(provider, RealFakeProcess) or provider.time_scale == scale:
            return
        provider.kill()
        provider.time_scale = scale
        provider.start()

    def skew_clocks(self, offsets: dict[str, str]) -> None:
        """Replicas' wall clocks off by `offsets` (replica name → libfaketime's FAKETIME, e.g.
        "+8s", "-8s"; monotonic clocks stay true, as on a host whose NTP is off); replicas not named
        run on the true clock. A replica whose clock changes is restarted (SIGTERM, then started
        with the new environment) and waited for. FileNotFoundError when libfaketime is missing."""
        library = faketime_library() if offsets else None
        if offsets and library is None:
            raise FileNotFoundError(f"libfaketime not found ({', '.join(FAKETIME_LIBRARIES)}): "
                                    "apt-get install faketime")
        def with_clock(replica: ReplicaProcess) -> dict[str, str]:
            env = {k: v for k, v in replica.env.items() if k not in ("LD_PRELOAD", "FAKETIME",
                                                                      "FAKETIME_DONT_FAKE_MONOTONIC")}
            if replica.name in offsets:
                env.update({"LD_PRELOAD": str(library), "FAKETIME": offsets[replica.name],
                            "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
            return env

        self._restart_changed(with_clock)

    def scenario_env(self, values: Mapping[str, str]) -> None:
        """The replicas' settings of one scenario (e.g. the caps per number): set on every active
        replica and on those started later; those an earlier call set and `values` lacks are
        removed. A replica whose environment changes is restarted (SIGTERM, then started) and
        waited for. Between runs only."""
        stale = self._scenario_keys - set(values)
        for key in stale:
            self.env.pop(key, None)
        self.env.update(values)
        self._scenario_keys = set(values)
        self._restart_changed(lambda replica: {**{k: v for k, v in replica.env.items() if k not in stale}, **values})

    def _restart_changed(self, new_env: Callable[[ReplicaProcess], dict[str, str]]) -> None:
        """Give each active replica `new_env(replica)`; those whose environment changes are
        restarted (SIGTERM, then started) together, then waited for."""
        changed = []
        for replica in self.active_replicas:
            env = new_env(replica)
            if env != replica.env:
                replica.env = env
                if replica.alive:
                    replica.terminate(timeout=20)
                replica.start()
                changed.append(replica)
        for replica in changed:
            replica.wait_ready(self.start_timeout)

    # -- between scenarios -----------------------------------------------------------------------

    def recover(self, timeout: float = 60.0) -> str:
        """Undo every fault: etcd and PostgreSQL up, proxies passing, paused replicas continued,
        dead (not retired) replicas restarted, the provider healthy; wait until every active
        replica is ready and all agree on one leader, whose name is returned."""
        if self.etcd is not None and not self.etcd_alive:
            self.start_etcd()
        if self.postgres is not None and not self.postgres_running:
            self.start_postgres()
        assert self.provider is not None
        if not self.provider.alive:
            self.provider.start()
        self.provider.client.control(latency_ms=self.provider_latency_ms, fail_rate=0, hang=False)
        if self.webhook_proxy is not None and not self.webhook_proxy.alive:
            self.webhook_proxy.start()
            self._route_webhooks()
        for replica in self.active_replicas:
            if replica.paused:
                replica.cont()
            replica.proxy.pass_through()
            if not replica.alive:
                replica.start()
        deadline = time.monotonic() + timeout
        for replica in self.active_replicas:
            replica.wait_ready(max(1.0, deadline - time.monotonic()))
        return self.leader(max(1.0, deadline - time.monotonic()))

    def clear(self) -> None:
        """Delete every appointment and reminder and the do-not-call list (the fence stays: tokens
        only grow) and reset the provider's calls, keys and request log."""
        from sqlalchemy import delete

        from service.db import Appointment, CallAttempt, Reminder
        from service.db.models import DoNotCall

        async def wipe(db: Any) -> None:
            async with db.session() as session:
                await session.execute(delete(DoNotCall))
                await session.execute(delete(CallAttempt))
                await session.execute(delete(Reminder))
                await session.execute(delete(Appointment))
                await session.commit()

        self._run_db(wipe)
        assert self.provider is not None
        self.provider.client.reset()

    # -- what the replicas say -------------------------------------------------------------------

    def terms(self) -> list[LeaderTerm]:
        """Every leader term the replicas' GET /leader showed, ordered by fencing token (the
        cluster must have been made with `watch_leaders=True`)."""
        if self.leader_watch is None:
            raise RuntimeError("no leader watch: make the cluster with watch_leaders=True")
        return self.leader_watch.terms()

    def migrate(self) -> None:
        """`reminders migrate` for the cluster's database (before any replica starts)."""
        argv = [sys.executable, "-m", "service.cli", "migrate"]
        result = subprocess.run(
            argv, env=_child_env({"DATABASE_URL": self.database_url}), cwd=ROOT,
            capture_output=True, text=True, timeout=120, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"reminders migrate failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def close(self, *, graceful: bool = True, timeout: float = 8.0) -> None:
        """Stop every process (SIGTERM when graceful, SIGKILL after `timeout`), close proxies, remove the dir."""
        problems: list[BaseException] = []

        def attempt(action: Callable[[], object]) -> None:
            try:
                action()
            except BaseException as error:  # noqa: BLE001 - tear everything down, report later
                problems.append(error)

        if self.leader_watch is not None:
            attempt(self.leader_watch.stop)

        for replica in self.replicas:
            if replica.paused:
                attempt(replica.cont)
            if replica.alive:
                attempt(lambda r=replica: r._signal(signal.SIGTERM if graceful else signal.SIGKILL))
        deadline = time.monotonic() + timeout
        for replica in self.replicas:
            if replica.process is not None:
                try:
                    replica.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    attempt(replica.kill)
            attempt(replica.proxy.close)
            attempt(replica.close)
        if self.provider is not None:
            attempt(self.provider.close if graceful else lambda: (self.provider.kill(), self.provider.close()))
        if self.webhook_proxy is not None:
            attempt(self.webhook_proxy.close if graceful
                    else lambda: (self.webhook_proxy.kill(), self.webhook_proxy.close()))
        if self._db_loop is not None:
            if self._db is not None:
                attempt(lambda: self._db_loop.run(self._db.dispose(), timeout=10))
            attempt(self._db_loop.close)
            self._db_loop = self._db = None
        if self.etcd is not None:
            attempt(self.etcd.close)
            self.etcd = None
        if self.postgres is not None:
            attempt(self.postgres.close)
            self.postgres = None
        if self.keep_logs:
            print(f"cluster work dir kept: {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if problems:
            raise problems[0]

    # -- replicas and leadership -----------------------------------------------------------------

    def replica(self, name: str) -> ReplicaProcess:
        for replica in self.replicas:
            if replica.name == name:
                return replica
        raise KeyError(name)

    def live_replicas(self) -> list[ReplicaProcess]:
        return [r for r in self.replicas if r.live]

    def status(self, replica: str | ReplicaProcess) -> dict[str, Any]:
        """GET /leader of one replica."""
        return (self.replica(replica) if isinstance(replica, str) else replica).status()

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        """GET /leader of every live replica (None for one that does not answer)."""
        views: dict[str, dict[str, Any] | None] = {}
        for replica in self.live_replicas():
            try:
                views[replica.name] = replica.status()
            except httpx.HTTPError:
                views[replica.name] = None
        return views

    def leader(self, timeout: float = 30.0, *, exclude: Iterable[str] = ()) -> str:
        """Name of the one replica that leads, once all live replicas agree on it (and it is not in `exclude`)."""
        return self.leader_views(timeout, exclude=exclude)[0]

    def leader_views(
        self, timeout: float = 30.0, *, exclude: Iterable[str] = ()
    ) -> tuple[str, dict[str, dict[str, Any]]]:
        """Like `leader()`, with the GET /leader answers (per replica name) of the poll that agreed."""
        excluded = set(exclude)

        def agreed() -> tuple[str, dict[str, dict[str, Any]]] | None:
            views = self.statuses()
            if not views or any(v is None for v in views.values()):
                return None
            leaders = [name for name, view in views.items() if view and view["is_leader"]]
            if len(leaders) != 1 or leaders[0] in excluded:
                return None
            if all(view and view["leader"] == leaders[0] for view in views.values()):
                return leaders[0], views  # type: ignore[return-value]
            return None

        return wait_for(agreed, timeout=timeout, what="one leader all live replicas agree on", interval=0.1)

    # -- the database ----------------------------------------------------------------------------

    def _run_db(self, work: Callable[[Any], Coroutine[Any, Any, T]], timeout: float = 30.0) -> T:
        if self._db_loop is None:
            from service.db import Database

            self._db_loop = _LoopThread()
            # pre_ping: chaos restarts PostgreSQL under this pool; the service retries, this helper does not
            self._db = Database(self.database_url, pool_size=2, pre_ping=True)
        return self._db_loop.run(work(self._db), timeout)

    def seed_due_reminders(
        self, count: int, *, due_in_seconds: float = 0.0, spread_seconds: float = 0.0,
        starts_in_seconds: float | Callable[[int], float] = 7200.0, timezone: str = "UTC",
        phone: str | Callable[[int], str] = "+14155552671",
    ) -> list[str]:
        """`count` appointments with one pending reminder each, due from `due_in_seconds` from now,
        spread evenly over `spread_seconds`; returns the reminder ids. `phone` may be a function of
        the index (each reminder its own number), and so may `starts_in_seconds`; every number must
        be one the API would take.

        Planned as the API's create plans them, in bulk: the domain's `plan_reminders` (an explicit
        `remind_at`, an all-day call window), the wording rendered from the built-in templates and
        stored on the reminder, the ledger's create statement (`insert_appointment`), in two
        transactions side by side (2,000 take about as long as the ORM rows this replaced). The plan
        is made as of now, so a reminder due now is planned, not refused."""
        plans = planned_appointments(count, due_in_seconds=due_in_seconds, spread_seconds=spread_seconds,
                                      starts_in_seconds=starts_in_seconds, timezone=timezone, phone=phone)

        async def insert(db: Any) -> None:
            from service.ledger.consent import phone_hasher
            from service.ledger.plans import insert_appointment

            hasher = await phone_hasher(db)  # the database's key: the do-not-call list and the caps find them
            for appointment, _ in plans:
                appointment["phone_hash"] = hasher(appointment["phone"])

            def some(connection: Any, part: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
                for appointment, reminders in part:
                    insert_appointment(connection, appointment, reminders)

            await asyncio.gather(*(db.write(some, plans[half::2]) for half in range(2)))  # the pool's 2 connections

        self._run_db(insert, timeout=max(30.0, count / 20))
        return [reminder["id"] for _, reminders in plans for reminder in reminders]

    def seed_past_calls(self, phone: str, ago: Sequence[timedelta]) -> str:
        """Calls placed to `phone` before the run, as the caps per number count them: an appointment
        of the number long past, its reminder `sent`, and one call attempt per `ago` (created and
        rung that long before the database's now, answered, completed). Returns the reminder's id."""
        from sqlalchemy import func, insert, select

        from service.db import Appointment, CallAttempt, Reminder
        from service.db.models import new_id

        async def seed(db: Any) -> str:
            from service.ledger.consent import phone_hasher

            hasher = await phone_hasher(db)
            async with db.session() as session:
                now = (await session.execute(select(func.now()))).scalar_one()
                oldest = now - max(ago)
                appointment_id, reminder_id = new_id(), new_id()
                await session.execute(insert(Appointment).values(
                    id=appointment_id, customer_name="Earlier Customer", phone=phone, phone_hash=hasher(phone),
                    starts_at=oldest + timedelta(hours=1), timezone="UTC", status="scheduled", language="en-US",
                    created_at=oldest, updated_at=oldest))
                await session.execute(insert(Reminder).values(
                    id=reminder_id, appointment_id=appointment_id, due_at=oldest, next_attempt_at=oldest,
                    status="sent", attempts=len(ago), idempotency_key=f"reminder-{reminder_id}", sent_at=oldest,
                    outcome="answered", created_at=oldest, updated_at=oldest))
                for before in ago:
                    at = now - before
                    await session.execute(insert(CallAttempt).values(
                        id=new_id(), reminder_id=reminder_id, fencing_token=0, state="created",
                        provider_call_id=f"earlier-{new_id()}", call_status="completed", last_event_at=at,
                        ended_at=at, rang_at=at, created_at=at, updated_at=at))
                await session.commit()
            return reminder_id

        return self._run_db(seed)

    def reminders(self) -> list[dict[str, Any]]:
        """Every reminder row, as dicts (id, status, attempts, idempotency_key, fence_token, claimed_by, …)."""
        from sqlalchemy import select

        from service.db import Reminder

        async def rows(db: Any) -> list[dict[str, Any]]:
            async with db.session() as session:
                return [dict(row._mapping) for row in await session.execute(select(Reminder.__table__))]

        return self._run_db(rows)

    def appointments(self) -> list[dict[str, Any]]:
        """Every appointment row, as dicts (id, phone, plan, status, starts_at, …)."""
        from sqlalchemy import select

        from service.db import Appointment

        async def rows(db: Any) -> list[dict[str, Any]]:
            async with db.session() as session:
                return [dict(row._mapping) for row in await session.execute(select(Appointment.__table__))]

        return self._run_db(rows)

    def call_attempts(self) -> list[dict[str, Any]]:
        """Every call_attempts row (real providers), as dicts."""
        from sqlalchemy import select

        from service.db import CallAttempt

        async def rows(db: Any) -> list[dict[str, Any]]:
            async with db.session() as session:
                return [dict(row._mapping) for row in await session.execute(select(CallAttempt.__table__))]

        return self._run_db(rows)

    def reminder_statuses(self) -> Counter[str]:
        """Counter of reminder statuses, e.g. Counter({'sent': 198, 'dispatching': 2})."""
        from sqlalchemy import func, select

        from service.db import Reminder

        async def counts(db: Any) -> Counter[str]:
            async with db.session() as session:
                result = await session.execute(select(Reminder.status, func.count()).group_by(Reminder.status))
                return Counter({str(status): n for status, n in result.all()})

        return self._run_db(counts)

    def open_reminders(self, horizon: timedelta = timedelta(minutes=10)) -> int:
        """Reminders still to be done: `dispatching`, or `pending` and due within `horizon` from now
        (one waiting for a later time — a cap per number's next allowed time, a no-answer retry's —
        is not open)."""
        from sqlalchemy import and_, func, or_, select

        from service.db import Reminder

        async def count(db: Any) -> int:
            async with db.session() as session:
                result = await session.execute(select(func.count()).where(or_(
                    Reminder.status == "dispatching",
                    and_(Reminder.status == "pending", Reminder.next_attempt_at <= datetime.now(UTC) + horizon))))
                return int(result.scalar_one())

        return self._run_db(count)

    def outcomes(self) -> Counter[str]:
        """Real providers: reminders by `outcome`, appointments by `confirmation` (keys
        `answered`, `voicemail`, `no_answer`, …, `confirmed`, `declined`) and the numbers on the
        do-not-call list (`opted_out`); unknown ones left out."""
        from sqlalchemy import func, select

        from service.db import Appointment, Reminder
        from service.db.models import DoNotCall

        async def counts(db: Any) -> Counter[str]:
            async with db.session() as session:
                found: Counter[str] = Counter()
                for column in (Reminder.outcome, Appointment.confirmation):
                    result = await session.execute(select(column, func.count()).where(column.is_not(None))
                                                   .group_by(column))
                    found.update({str(value): n for value, n in result.all()})
                listed = (await session.execute(select(func.count()).select_from(DoNotCall))).scalar_one()
                if listed:
                    found["opted_out"] = listed
                return found

        return self._run_db(counts)

    def wait_for(self, check: Callable[[], T], *, timeout: float, what: str, interval: float = 0.1) -> T:
        return wait_for(check, timeout=timeout, what=what, interval=interval)
