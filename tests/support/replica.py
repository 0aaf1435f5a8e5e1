"""One `reminders serve` process for tests that speak HTTP to a real replica (fuzzing, OpenAPI)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from harness.ports import free_port

__all__ = ["serve_replica"]

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def serve_replica(env: Mapping[str, str], directory: Path, *, ready_within: float = 30) -> Iterator[str]:
    """Start a replica with `os.environ` + `env` (API_TOKEN only if `env` sets it; no metrics port
    unless `env` names one), yield its URL once /readyz answers 200, and on exit stop it and assert
    its log holds no traceback."""
    port = free_port()
    full_env = {**os.environ, "ELECTION_PREFIX": f"/replica/{port}", "LEASE_TTL": "3", "METRICS_PORT": "0", **env}
    if "API_TOKEN" not in env:
        full_env.pop("API_TOKEN", None)
    log_path = directory / "replica.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_within
        try:
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)  # poll interval of a deadline-bounded wait
            yield url
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
    text = log_path.read_text()
    assert "Traceback" not in text, text
