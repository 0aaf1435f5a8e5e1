"""The public port serves what must be public (issue 24, docs/decisions/0243).

* the API's port answers 404 on /metrics, and on /docs, /redoc and /openapi.json unless API_DOCS;
* METRICS_PORT answers Prometheus text (GET and HEAD /metrics, 404 elsewhere), from the app's
  lifespan: in-process, from `reminders serve` and from a bare `uvicorn service.app:app`, each
  bound where the API is; it closes with the app; 0 turns it off; a port in use stops the start
  naming METRICS_PORT (one line from `reminders serve`), as does one equal to the API's port or
  not a port at all;
* the harness gives each local replica a metrics port of its own.

The Kubernetes side (the container port, the PodMonitor, the NetworkPolicies, the Ingress) is in
tests/test_k8s.py and tests/test_monitoring.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.cluster import ReplicaProcess, wait_for
from harness.ports import free_port
from service.app import create_app
from tests.support.appclient import make_settings, running_app

ROOT = Path(__file__).resolve().parents[1]
NOT_ON_THE_API_PORT = ("/metrics", "/docs", "/redoc", "/openapi.json")


def _families(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


@pytest.mark.anyio
async def test_the_api_port_serves_no_metrics_and_no_docs_by_default(tmp_path: Path, etcd_endpoint: str) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/a.db", etcd_endpoint)
    assert (settings.api_docs, type(settings).model_fields["metrics_port"].default) == (False, 9464)
    async with running_app(settings) as api:
        for path in NOT_ON_THE_API_PORT:
            assert (await api.get(path)).status_code == 404, path
        assert (await api.get("/healthz")).status_code == 200
    # the document exists for those who build it (the tests, the fuzzing): only the route is off
    assert "/appointments" in create_app(settings).openapi()["paths"]


@pytest.mark.anyio
async def test_the_metrics_port_answers_prometheus_text_and_closes_with_the_app(
    tmp_path: Path, etcd_endpoint: str
) -> None:
    port = free_port()
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/a.db", etcd_endpoint, metrics_port=port)
    async with running_app(settings) as api, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as scrape:
        assert api.app.state.metrics_server.bound_port == port
        metrics = await scrape.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert {"reminders_is_leader", "reminders_call_attempts", "reminders_due"} <= _families(metrics.text)
        head = await scrape.head("/metrics")
        assert head.status_code == 200 and head.content == b""
        assert (await scrape.get("/")).status_code == 404
        assert (await scrape.get("/appointments")).status_code == 404  # the API is not here either
        refused = await scrape.post("/metrics")
        assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"
        assert (await api.get("/metrics")).status_code == 404
    async with httpx.AsyncClient(timeout=2) as after:
        with pytest.raises(httpx.ConnectError):
            await after.get(f"http://127.0.0.1:{port}/metrics")


@pytest.mark.anyio
async def test_a_metrics_port_in_use_stops_the_start_naming_it(tmp_path: Path, etcd_endpoint: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/a.db", etcd_endpoint, metrics_port=port)
        with pytest.raises(OSError, match=f"METRICS_PORT {port}: cannot listen on 127.0.0.1:{port}"):
            async with running_app(settings):
                pytest.fail("started on a port another process holds")


@pytest.mark.anyio
async def test_metrics_port_0_serves_none(tmp_path: Path, etcd_endpoint: str) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/a.db", etcd_endpoint, metrics_port=0)
    async with running_app(settings) as api:
        assert api.app.state.metrics_server is None
        assert (await api.get("/metrics")).status_code == 404


def _serve(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("command", ["reminders serve", "uvicorn service.app:app"])
def test_a_replica_process_serves_metrics_on_their_own_port(
    command: str, tmp_path: Path, etcd_endpoint: str
) -> None:
    """Both ways to run the app bind METRICS_PORT where the API is (here 127.0.0.1): `reminders
    serve --host`, or uvicorn's host from its environment (UVICORN_HOST)."""
    api_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("API_DOCS", "API_TOKEN")}
    env.update({"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/a.db", "ETCD_ENDPOINTS": etcd_endpoint,
                "ELECTION_PREFIX": f"/ports/{api_port}", "METRICS_PORT": str(metrics_port),
                "PYTHONPATH": str(ROOT), "UVICORN_HOST": "127.0.0.1"})
    if command == "reminders serve":
        argv = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(api_port)]
    else:
        argv = [sys.executable, "-m", "uvicorn", "service.app:app", "--port", str(api_port)]
    process = _serve(argv, env, tmp_path / "replica.log")
    try:
        with httpx.Client(timeout=2) as client:
            def ready() -> bool:
                assert process.poll() is None, (tmp_path / "replica.log").read_text()
                try:
                    return client.get(f"http://127.0.0.1:{api_port}/readyz").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, timeout=30, what=f"{command} ready")
            metrics = client.get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert metrics.status_code == 200 and "reminders_is_leader" in _families(metrics.text)
            for path in NOT_ON_THE_API_PORT:
                assert client.get(f"http://127.0.0.1:{api_port}{path}").status_code == 404, path
    finally:
        process.terminate()
        process.wait(15)
    assert "Traceback" not in (tmp_path / "replica.log").read_text()


@pytest.mark.parametrize(("value", "exit_code", "expected"), [
    ("8080", 2, "reminders: invalid setting METRICS_PORT: 8080 is the API's port"),
    ("70000", 2, "reminders: invalid setting METRICS_PORT: Input should be less than or equal to 65535"),
    ("metrics", 2, "reminders: invalid setting METRICS_PORT: Input should be a valid integer"),
    # two replicas on one host with the same port (the default 9464, say): the second stops
    ("in use", 1, "reminders: METRICS_PORT {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"),
])
def test_a_bad_metrics_port_is_one_line_naming_it(value: str, exit_code: int, expected: str, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
               "METRICS_PORT": str(port) if value == "in use" else value,
               "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", "PYTHONPATH": str(ROOT)}
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "8080"], env=env,
            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == exit_code and len(lines) == 1, result.stderr
    assert lines[0].startswith(expected.format(port=port)), lines[0]


def test_each_local_replica_gets_a_metrics_port_of_its_own(tmp_path: Path) -> None:
    """Several replicas on one host (the harness, the demo, the benchmarks) cannot share 9464."""
    # no process is started: the ports and the environment each would start with
    replicas = [ReplicaProcess(f"replica-{i}", tmp_path / f"{i}.log", {}, None) for i in range(3)]  # type: ignore[arg-type]
    try:
        ports = [r.metrics_port for r in replicas]
        assert len({*ports, *(r.port for r in replicas)}) == 6
        assert [r.env["METRICS_PORT"] for r in replicas] == [str(p) for p in ports]
        assert replicas[0].metrics_url == f"http://127.0.0.1:{ports[0]}/metrics"
        chosen = ReplicaProcess("replica-x", tmp_path / "x.log", {"METRICS_PORT": "0"}, None)  # type: ignore[arg-type]
        assert chosen.env["METRICS_PORT"] == "0"  # a cluster's own setting wins
        chosen.close()
    finally:
        for replica in replicas:
            replica.close()
