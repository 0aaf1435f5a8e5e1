"""Shared helpers: machine facts, results files, statistics, peak RSS from /proc, bounded waits."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.cluster import wait_for as wait_until  # noqa: F401 - re-exported: one poll-with-deadline for all
from harness.machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# the calibration loop: this many Python additions, the best of this many tries
CALIBRATION_ADDITIONS, CALIBRATION_BEST_OF = 2_000_000, 3


def log(message: str) -> None:
    """Progress on stderr (stdout stays free for JSON)."""
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def calibration() -> float:
    """CPU seconds for CALIBRATION_ADDITIONS Python additions (best of CALIBRATION_BEST_OF): how
    fast a core is right now.

    Recorded before and after each part: lower is faster; a figure that changes much between
    runs, or between the start and the end of one, means the CPU was shared or throttled."""
    best = float("inf")
    for _ in range(CALIBRATION_BEST_OF):
        started = time.process_time()
        total = 0
        for i in range(CALIBRATION_ADDITIONS):
            total += i
        best = min(best, time.process_time() - started)
    return round(best, 3)


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        nproc = os.cpu_count()
    return {
        "nproc": nproc,
        "cpu": cpu,
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def source_tree() -> dict[str, Any] | None:
    """The commit of the work tree the bench ran from, and whether it had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    command = " ".join(["python", "-m", "bench", *sys.argv[1:]])
    payload = {"name": name, "machine": machine(), "command": command, "tree": source_tree(), **data}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    log(f"wrote {path.relative_to(ROOT)}")
    return path


def read_result(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def proc_status_kb(pid: int, field: str) -> int | None:
    """A `VmHWM`/`VmRSS`-style field of /proc/<pid>/status in kB (None if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_mb(pid: int) -> float | None:
    kb = proc_status_kb(pid, "VmHWM")
    return round(kb / 1024, 1) if kb is not None else None


def rss_mb(pid: int) -> float | None:
    kb = proc_status_kb(pid, "VmRSS")
    return round(kb / 1024, 1) if kb is not None else None


def summary(values: Iterable[float], digits: int = 3) -> dict[str, Any]:
    """median, min, max and the runs themselves."""
    data = [v for v in values if v is not None]
    if not data:
        return {"median": None, "min": None, "max": None, "n": 0, "runs": []}
    return {
        "median": round(statistics.median(data), digits),
        "min": round(min(data), digits),
        "max": round(max(data), digits),
        "n": len(data),
        "runs": [round(v, digits) for v in data],
    }


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (seconds), None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, ValueError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc/<pid>/task/*/children)."""
    seen, todo = [], [pid]
    while todo and len(seen) < 1000:
        current = todo.pop()
        seen.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(child) for child in (task / "children").read_text().split())
            except (OSError, ValueError):
                pass
    return seen


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) or 0.0 for p in process_tree(pid))


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []
