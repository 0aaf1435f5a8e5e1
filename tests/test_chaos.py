"""Exactly-once under failure, over real processes; and bad input the other suites do not send.

The scenarios (harness/chaos.py) run in a short form here: 500 reminders falling due over a few
seconds, 3 replicas, LEASE_TTL=2, provider latency 300 ms, DISPATCH_CONCURRENCY=100. They share
one cluster with its own etcd and PostgreSQL (each scenario starts from "all replicas ready, one
leader, no reminders"); a failed scenario's cluster is replaced, its logs kept. `make chaos` runs
the same scenarios larger and repeatedly. Nothing here asserts a timing: lateness is measured
and printed (and tabulated by `make chaos`), every wait is bounded by a deadline.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from harness.chaos import SCENARIOS, ChaosConfig, ClusterPool
from harness.cluster import Cluster, ReplicaProcess
from tests.support.requirements import unavailable

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ChaosConfig()


@pytest.fixture(scope="module")
def pool() -> Iterator[ClusterPool]:
    pool = ClusterPool(CONFIG)
    try:
        pool.get()
    except (FileNotFoundError, RuntimeError, TimeoutError) as error:
        pool.discard()
        unavailable("chaos cluster", error)
    yield pool
    pool.close()


@pytest.mark.timeout(100)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_exactly_once_under(pool: ClusterPool, scenario: str) -> None:
    result = pool.run(scenario)
    print(f"\n{result.line()}")
    assert result.ok, "\n".join(["", *result.violations, "", result.evidence])
    assert result.reminders == CONFIG.reminders and result.calls == CONFIG.reminders


@pytest.mark.timeout(60)
def test_a_refused_last_moment_check_sends_nothing(pool: ClusterPool) -> None:
    """The telephony client's `may_send` (the dispatcher passes its term's `valid`) is asked
    right before the first byte leaves; refused, the provider sees no request at all. This is what
    keeps a leader frozen between its term check and the send from calling on resume."""
    import asyncio

    from service.providers.generic.client import CallRequest, HttpTelephonyClient, OutcomeKind

    cluster = pool.get()
    cluster.recover()
    cluster.clear()
    assert cluster.provider is not None
    allowed = {"now": True}

    async def calls() -> list:
        client = HttpTelephonyClient(f"{cluster.provider.url}/guarded")
        try:
            outcomes = []
            for key, allow in (("a", True), ("b", False), ("a", True)):
                allowed["now"] = allow
                outcomes.append(await client.place_call(CallRequest(
                    to="+14155552671", from_="+15550000000", message="m", appointment_id="x",
                    reminder_id=key, idempotency_key=f"guard-{key}"), may_send=lambda: allowed["now"]))
            return outcomes
        finally:
            await client.aclose()

    first, refused, again = asyncio.run(calls())
    assert first.kind is OutcomeKind.SENT and again.kind is OutcomeKind.SENT and again.replayed
    assert refused.kind is OutcomeKind.NOT_SENT and refused.error and refused.error.startswith("not sent")
    seen = [(p["idempotency_key"], p["status"]) for p in cluster.provider.client.requests()]
    assert seen == [("guard-a", 201), ("guard-a", 201)]


# -- bad input, against a replica process on PostgreSQL ---------------------------------------------
#
# tests/test_api.py covers oversized, chunked, deep and malformed bodies in process; test_fuzz.py
# runs schemathesis. These send what neither does: bytes that are not UTF-8 inside JSON strings,
# NUL characters (valid JSON, refused by PostgreSQL text), other content types, bad path and
# cursor bytes — to a real `reminders serve` on PostgreSQL, where the database's own refusals show.


def _future() -> str:
    return (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0).isoformat()


def _body(**overrides: object) -> dict:
    data = {"customer_name": "Ada", "phone": "+14155552671", "starts_at": _future(), "timezone": "UTC"}
    data.update(overrides)
    return data


@pytest.fixture(scope="module")
def replica(pool: ClusterPool) -> ReplicaProcess:
    cluster: Cluster = pool.get()
    cluster.recover()
    return cluster.active_replicas[0]


@pytest.fixture(scope="module")
def appointment_id(replica: ReplicaProcess) -> str:
    created = replica.post("/appointments", json=_body())
    assert created.status_code == 201, created.text
    return created.json()["id"]


def _json_with(field: str, raw: bytes) -> bytes:
    """A create body whose `field` holds `raw` bytes verbatim inside the JSON string."""
    return json.dumps(_body(**{field: "@@"})).encode().replace(b"@@", raw)


BAD_BODIES = {
    "invalid UTF-8 in a string": (_json_with("customer_name", b"\xff\xfe"), "application/json"),
    "overlong UTF-8": (_json_with("customer_name", b"\xc0\xaf"), "application/json"),
    "UTF-8-encoded surrogate": (_json_with("notes", b"\xed\xa0\x80"), "application/json"),
    "lone surrogate escape": (_json_with("customer_name", b"\\ud800"), "application/json"),
    "NUL in customer_name": (_json_with("customer_name", b"a\\u0000b"), "application/json"),
    "NUL in notes": (_json_with("notes", b"x\\u0000"), "application/json"),
    "latin-1 body declared as such": (json.dumps(_body(customer_name="Zoë"), ensure_ascii=False).encode("latin-1"),
                                      "application/json; charset=latin-1"),
    "JSON as text/plain": (json.dumps(_body()).encode(), "text/plain"),
    "JSON without a content type": (json.dumps(_body()).encode(), None),
    "XML": (b"<appointment/>", "application/xml"),
    "multipart form": (b'--x\r\nContent-Disposition: form-data; name="customer_name"\r\n\r\nAda\r\n--x--\r\n',
                       "multipart/form-data; boundary=x"),
    "garbage content type": (json.dumps(_body()).encode(), "\xff/\xfe"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies_are_client_errors(replica: ReplicaProcess, appointment_id: str, case: str) -> None:
    content, content_type = BAD_BODIES[case]
    headers = {} if content_type is None else {"content-type": content_type.encode("latin-1")}
    created = replica.post("/appointments", content=content, headers=headers)
    changed = replica.patch(f"/appointments/{appointment_id}", content=content, headers=headers)
    for response in (created, changed):
        assert response.status_code in (400, 422), f"{response.request.method}: {response.status_code} {response.text}"
    if case.startswith("NUL"):  # field-level detail, like any other validation error
        field = "notes" if "notes" in case else "customer_name"
        assert created.json()["detail"][0]["loc"] == ["body", field]


@pytest.mark.timeout(60)
def test_bad_path_and_cursor_bytes(replica: ReplicaProcess) -> None:
    nul_cursor = base64.urlsafe_b64encode(json.dumps(["2030-01-01T00:00:00+00:00", "a\u0000b"]).encode()).decode()
    expected = {
        "/appointments/%FF": 404,
        "/appointments/%00": 404,
        "/appointments/%C0%AF": 404,
        "/appointments?status=%FF": 422,
        "/appointments?cursor=%FF%FE": 422,
        f"/appointments?cursor={nul_cursor.rstrip('=')}": 422,
        "/appointments?starts_after=%00": 422,
    }
    got = {path: replica.get(path).status_code for path in expected}
    assert got == expected
    assert "Traceback" not in replica.log_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("variable", "value"),
    [("TELEPHONY_FROM", "hello"), ("MISFIRE_GRACE", "0"), ("API_TOKEN", " "), ("ETCD_ENDPOINTS", "http://a:1,https://b:2"),
     ("ETCD_CA_CERT", "/nonexistent.pem"), ("ETCD_USERNAME", "alice"), ("DRAIN_TIMEOUT", "0"),
     ("CALLS_PER_SECOND", "nan"), ("LEASE_TTL", "2.5"), ("TELEPHONY_TIMEOUT", "nan"), ("POD_NAME", "")],
)
def test_bad_settings_name_the_variable(variable: str, value: str, tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), variable: value,
           "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "1"], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=30, check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    expected = "ETCD_PASSWORD" if variable == "ETCD_USERNAME" else variable  # the missing half is named
    assert lines[0].startswith("reminders: invalid setting ") and expected in lines[0], lines[0]
