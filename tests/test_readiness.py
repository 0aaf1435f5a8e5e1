"""/readyz follows the database only, cached; wrong etcd credentials are a named configuration
error with a slow retry (issue 12). The etcd with auth is the one test_election_secure starts."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from harness.ports import free_port
from tests.support.appclient import make_settings, running_app
from tests.support.waiting import eventually
from tests.test_election_secure import tls_etcd  # noqa: F401 - the module-scoped fixture

pytestmark = pytest.mark.anyio


def auth_failures() -> float:
    return REGISTRY.get_sample_value("reminders_etcd_auth_failures_total") or 0.0


async def test_readyz_answers_from_one_probe_at_a_time(tmp_path, etcd_endpoint: str) -> None:
    async with running_app(make_settings(f"sqlite+aiosqlite:///{tmp_path}/a.db", etcd_endpoint)) as client:
        probe = client.app.state.readiness
        before = probe.probes
        answers = await asyncio.gather(*(client.get("/readyz") for _ in range(20)))
        assert {a.status_code for a in answers} == {200}
        assert probe.probes - before == 1


async def test_an_etcd_outage_does_not_make_the_replica_unready(tmp_path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/a.db", f"http://127.0.0.1:{free_port()}")
    async with running_app(settings) as client:
        response = await client.get("/readyz")
        assert response.status_code == 200, response.text
        assert response.json()["etcd"] == "not reachable" and response.json()["database"] == "ok"


async def test_wrong_etcd_credentials_are_a_named_configuration_error(
    tmp_path, tls_etcd: dict[str, str]  # noqa: F811
) -> None:
    before = auth_failures()
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path}/a.db", tls_etcd["endpoint"], etcd_ca_cert=tls_etcd["ca.pem"],
        etcd_cert=tls_etcd["client.pem"], etcd_key=tls_etcd["client.key"], etcd_username="root",
        etcd_password="not-the-password",
    )
    async with running_app(settings) as client:
        async def named() -> dict | None:
            body = (await client.get("/leader")).json()
            return body if body.get("etcd_error") else None

        leader = await eventually(named, 20.0)
        assert "ETCD_PASSWORD" in leader["etcd_error"] and "not-the-password" not in leader["etcd_error"]
        assert leader["is_leader"] is False
        async def reported() -> object:  # once the cached answer (≈ 1 s) has been replaced
            response = await client.get("/readyz")
            return response if "configuration error" in response.json()["etcd"] else None

        ready = await eventually(reported, 20.0)
        assert ready.status_code == 200, ready.text
        assert auth_failures() > before
        elector = client.app.state.elector
        await eventually(lambda: elector.last_retry_delay is not None, 20.0)
        assert elector.last_retry_delay >= 20  # slow retry, not the 2 s backoff
