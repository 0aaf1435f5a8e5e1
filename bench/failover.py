"""Failover: how fast leadership moves after a graceful resign, a SIGKILL and a 10 s etcd outage.

Candidates:
- `real-3`: 3 real `reminders serve` processes (harness.cluster.Cluster on PostgreSQL), each
  talking to etcd through its own TCP proxy; events come from their logs (ms timestamps).
- `inproc-3` / `inproc-50`: `service.election.Elector` objects in helper processes
  (`python -m bench.electors`): the leader alone in one process (so that it can be SIGKILLed or
  SIGTERMed), the other 2 / 49 candidates in a second process; events come from their stdout.
  Same elector code as the service; the in-process pair gives 3 vs 50 on equal terms.

Figures (seconds, median and range of the runs):
- graceful: SIGTERM to the leader → the next candidate logs that it leads;
- sigkill: SIGKILL of the leader → the next candidate leads (bound: lease TTL + 0.5 s);
- outage: etcd SIGKILLed for 10 s then restarted: the leader's step-down after etcd vanished,
  and etcd healthy again → a leader elected. All configurations live through the same outages
  (one etcd), so one outage measures them all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.cluster import Cluster
from harness.etcd import EtcdServer, find_binary
from harness.postgres import PostgresServer

from .common import ROOT, log, summary, wait_until

OUTAGE_SECONDS = 10.0

_TS = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
_LEAD = re.compile(_TS + r" \S+ .*?(\S+) leads: term (\d+)")
_ENDED = re.compile(_TS + r" \S+ \[(\S+)\] service\.election\.term: term (\d+) \(.*?\) ended: (.*)$")


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def key_count(endpoint: str, prefix: str) -> int:
    etcdctl = find_binary("etcdctl")
    if etcdctl is None:
        return -1
    result = subprocess.run(
        [etcdctl, "--endpoints", endpoint, "--command-timeout=2s", "get", "--prefix", prefix + "/", "--keys-only",
         "-w", "json"],
        capture_output=True, text=True, timeout=10, check=False, env={**os.environ, "ETCDCTL_API": "3"},
    )
    try:
        return int(json.loads(result.stdout).get("count", 0))
    except (ValueError, AttributeError):
        return -1


# -- candidates in helper processes -------------------------------------------------------------


class Helper:
    """One `python -m bench.electors` process; its events are collected by a reader thread."""

    def __init__(self, endpoint: str, prefix: str, count: int, ttl: int, name: str, expect: int, workdir: Path) -> None:
        self.argv = [sys.executable, "-m", "bench.electors", "--endpoint", endpoint, "--prefix", prefix,
                     "--count", str(count), "--ttl", str(ttl), "--name", name, "--expect", str(expect),
                     "--max-seconds", "900"]
        self.name = name
        self.stderr_path = workdir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> Helper:
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT,
                                            start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.events.append(event)

    def find(self, ev: str, since: float = 0.0) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["ev"] == ev and e["t"] >= since]

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def close(self) -> None:
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class InProc:
    """The leader alone in one helper process, `count - 1` followers in another."""

    kind = "inproc"

    def __init__(self, endpoint: str, count: int, ttl: int, workdir: Path) -> None:
        self.endpoint, self.count, self.ttl, self.workdir = endpoint, count, ttl, workdir
        self.prefix = ""
        self.first: Helper | None = None
        self.rest: Helper | None = None

    @property
    def label(self) -> str:
        return f"inproc-{self.count}"

    def start(self) -> InProc:
        self.prefix = f"/bench-failover/{self.label}-ttl{self.ttl}-{uuid.uuid4().hex[:8]}"
        self.first = Helper(self.endpoint, self.prefix, 1, self.ttl, "first", 0, self.workdir).start()
        wait_until(lambda: self.first.find("lead"), timeout=30, what=f"{self.label}: first candidate leads")
        self.rest = Helper(self.endpoint, self.prefix, self.count - 1, self.ttl, "cand", self.count,
                           self.workdir).start()
        wait_until(lambda: self.rest.find("ready"), timeout=60, what=f"{self.label}: {self.count} keys in etcd")
        return self

    def helpers(self) -> list[Helper]:
        return [h for h in (self.first, self.rest) if h is not None]

    def leads_since(self, since: float) -> list[dict[str, Any]]:
        return sorted((e for h in self.helpers() for e in h.find("lead", since)), key=lambda e: e["t"])

    def stops_since(self, since: float) -> list[dict[str, Any]]:
        return sorted((e for h in self.helpers() for e in h.find("stop", since)), key=lambda e: e["t"])

    def hit_leader(self, sig: int) -> float:
        assert self.first is not None
        started = time.time()
        self.first.signal(sig)
        return started

    def keys_ok(self) -> bool:
        return key_count(self.endpoint, self.prefix) >= self.count

    def close(self) -> None:
        for helper in self.helpers():
            helper.close()
        self.first = self.rest = None


class Real:
    """Three `reminders serve` replicas (harness.cluster.Cluster); events from their logs."""

    kind = "real"
    count = 3

    def __init__(self, endpoint: str, database_url: str, ttl: int) -> None:
        self.endpoint, self.ttl = endpoint, ttl
        self.cluster = Cluster(3, database_url=database_url, etcd_endpoint=endpoint, lease_ttl=ttl,
                               env={"LOG_LEVEL": "info"})
        self.prefix = self.cluster.election_prefix

    label = "real-3"

    def start(self) -> Real:
        self.cluster.__enter__()
        self.cluster.leader(timeout=60)
        return self

    def _events(self, pattern: re.Pattern[str], since: float) -> list[dict[str, Any]]:
        found = []
        for replica in self.cluster.replicas:
            for line in replica.log_text().splitlines():
                match = pattern.search(line)
                if match and _stamp(match[1]) >= since - 0.001:
                    found.append({"t": _stamp(match[1]), "name": match[2], "token": int(match[3]),
                                  "replica": replica.name})
        return sorted(found, key=lambda e: e["t"])

    def leads_since(self, since: float) -> list[dict[str, Any]]:
        return self._events(_LEAD, since)

    def stops_since(self, since: float) -> list[dict[str, Any]]:
        return self._events(_ENDED, since)

    def leader(self) -> str:
        return self.cluster.leader(timeout=60)

    def keys_ok(self) -> bool:
        return key_count(self.endpoint, self.prefix) >= 3

    def close(self) -> None:
        self.cluster.__exit__(None, None, None)


# -- scenarios ------------------------------------------------------------------------------------


def _successor_after(config: InProc | Real, since: float, old: str | None, timeout: float) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        leads = [e for e in config.leads_since(since) if e["name"] != old]
        return leads[0] if leads else None

    return wait_until(found, timeout=timeout, what=f"{config.label}: a successor leads", interval=0.01)


def hit_real(config: Real, sig: int) -> float:
    """Signal the real cluster's leader; the seconds until another replica leads. Then restore 3."""
    leader = config.leader()
    replica = config.cluster.replica(leader)
    assert replica.process is not None
    started = time.time()
    replica.process.send_signal(sig)
    event = _successor_after(config, started, leader, timeout=config.ttl + 30)
    try:
        replica.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        replica.kill()
    replica.paused = False
    replica.restart(timeout=60)
    config.cluster.leader(timeout=60)
    return event["t"] - started


def hit_inproc(endpoint: str, count: int, ttl: int, sig: int, workdir: Path) -> float:
    config = InProc(endpoint, count, ttl, workdir).start()
    try:
        started = config.hit_leader(sig)
        event = _successor_after(config, started, "first", timeout=ttl + 30)
        return event["t"] - started
    finally:
        config.close()


def outage_runs(etcd: EtcdServer, configs: list[InProc | Real], runs: int) -> dict[str, dict[str, list[float]]]:
    """`runs` etcd outages of OUTAGE_SECONDS; per config: step-down and recovery times."""
    results = {f"{c.label}/ttl{c.ttl}": {"step_down_s": [], "recovery_s": [], "leaderless_s": []} for c in configs}
    for run in range(runs):
        for config in configs:  # everyone back in the queue before the next outage
            wait_until(config.keys_ok, timeout=60, what=f"{config.label}: all candidates campaigning", interval=0.2)
        time.sleep(0.5)
        log(f"outage {run + 1}/{runs}: etcd down for {OUTAGE_SECONDS:.0f} s")
        down = time.time()
        etcd.kill()
        time.sleep(max(0.0, down + OUTAGE_SECONDS - time.time()))
        etcd.start()
        back = time.time()
        for config in configs:
            name = f"{config.label}/ttl{config.ttl}"
            event = _successor_after(config, back - 0.5, None, timeout=60)
            stops = config.stops_since(down)
            step_down = stops[0]["t"] - down if stops else None
            results[name]["recovery_s"].append(max(0.0, event["t"] - back))
            if step_down is not None:
                results[name]["step_down_s"].append(step_down)
                results[name]["leaderless_s"].append(event["t"] - stops[0]["t"])
    return results


def run(quick: bool = False) -> dict[str, Any]:
    runs = 2 if quick else 5
    ttls = (3,) if quick else (3, 10)
    outages = 1 if quick else 5
    results: dict[str, Any] = {"runs_per_figure": runs, "outage_seconds": OUTAGE_SECONDS, "ttls": list(ttls),
                               "figures": {}}
    workdir = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    with EtcdServer() as etcd, PostgresServer() as pg:
        figures: dict[str, Any] = results["figures"]
        for ttl in ttls:
            for count in (3, 50):
                for scenario, sig in (("graceful", signal.SIGTERM), ("sigkill", signal.SIGKILL)):
                    log(f"failover inproc-{count} ttl {ttl}: {scenario} x{runs}")
                    times = [hit_inproc(etcd.endpoint, count, ttl, sig, workdir) for _ in range(runs)]
                    figures[f"inproc-{count}/ttl{ttl}/{scenario}"] = summary(times)
            real = Real(etcd.endpoint, pg.create_database(f"failover_ttl{ttl}_{uuid.uuid4().hex[:6]}"), ttl)
            try:
                real.start()
                for scenario, sig in (("graceful", signal.SIGTERM), ("sigkill", signal.SIGKILL)):
                    log(f"failover real-3 ttl {ttl}: {scenario} x{runs}")
                    times = [hit_real(real, sig) for _ in range(runs)]
                    figures[f"real-3/ttl{ttl}/{scenario}"] = summary(times)
            finally:
                real.close()
        # The outage: every configuration at once on the same etcd.
        configs: list[InProc | Real] = []
        try:
            for ttl in ttls:
                database = pg.create_database(f"outage_ttl{ttl}_{uuid.uuid4().hex[:6]}")
                configs.append(Real(etcd.endpoint, database, ttl).start())
                configs.append(InProc(etcd.endpoint, 3, ttl, workdir).start())
                configs.append(InProc(etcd.endpoint, 50, ttl, workdir).start())
            for name, values in outage_runs(etcd, configs, outages).items():
                label, ttl_label = name.split("/")
                for figure, data in values.items():
                    figures[f"{label}/{ttl_label}/outage_{figure.removesuffix('_s')}"] = summary(data)
        finally:
            for config in configs:
                try:
                    config.close()
                except Exception as error:  # noqa: BLE001 - tear the rest down anyway
                    log(f"closing {config.label}: {error}")
    return results
