"""The fake provider's idempotency semantics, in-process and over a real uvicorn server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from reminders_fakes import create_fake_provider
from service.providers.generic.client import CallRequest, HttpTelephonyClient, OutcomeKind
from tests.support.waiting import eventually

TO = "+15551234567"
FROM = "+15550000000"
BODY = {
    "to": TO,
    "from": FROM,
    "message": "Reminder: dentist tomorrow at 10:00",
    "metadata": {"appointment_id": "appt-1", "reminder_id": "rem-1"},
}
DEADLINE = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client_for(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake")


async def post_call(
    client: httpx.AsyncClient, key: str | None = "k-1", body: Any = BODY, path: str = "/v1/calls"
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await client.post(path, json=body, headers=headers)


async def requests_log(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    return (await client.get("/v1/requests")).json()["requests"]


async def calls(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    return (await client.get("/v1/calls")).json()["calls"]


@pytest.fixture
async def fake() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_fake_provider(seed=1)) as c:
        yield c


# --- POST /v1/calls ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_missing_idempotency_key_is_400(fake: httpx.AsyncClient) -> None:
    response = await post_call(fake, key=None)
    assert response.status_code == 400
    assert await calls(fake) == []


@pytest.mark.anyio
async def test_created_then_replayed_with_same_id(fake: httpx.AsyncClient) -> None:
    first = await post_call(fake)
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    created = first.json()
    assert created["id"].startswith("call_")
    assert created["status"] == "queued"
    assert (created["to"], created["from"]) == (TO, FROM)
    assert created["created_at"]

    second = await post_call(fake)
    assert second.status_code == 201
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json() == created

    stored = await calls(fake)
    assert len(stored) == 1
    assert stored[0]["id"] == created["id"]
    assert stored[0]["idempotency_key"] == "k-1"
    assert stored[0]["metadata"] == BODY["metadata"]
    assert stored[0]["placed_by"] is None


@pytest.mark.anyio
async def test_same_key_different_body_is_422(fake: httpx.AsyncClient) -> None:
    assert (await post_call(fake)).status_code == 201
    for change in (
        {"message": "something else"},
        {"to": "+15557654321"},
        {"metadata": {"appointment_id": "appt-1", "reminder_id": "rem-2"}},
    ):
        response = await post_call(fake, body={**BODY, **change})
        assert response.status_code == 422
    assert len(await calls(fake)) == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        {k: v for k, v in BODY.items() if k != "to"},
        {**BODY, "metadata": {"appointment_id": "appt-1"}},
        {**BODY, "to": "555-1234"},
        ["not", "an", "object"],
    ],
)
async def test_invalid_body_is_422(fake: httpx.AsyncClient, body: Any) -> None:
    assert (await post_call(fake, body=body)).status_code == 422


@pytest.mark.anyio
async def test_invalid_json_is_422(fake: httpx.AsyncClient) -> None:
    response = await fake.post(
        "/v1/calls", content=b"{not json", headers={"Idempotency-Key": "k-1"}
    )
    assert response.status_code == 422


@pytest.mark.anyio
async def test_bearer_token_checked_when_configured() -> None:
    async with client_for(create_fake_provider(token="s3cret")) as c:
        assert (await post_call(c)).status_code == 401
        wrong = await c.post(
            "/v1/calls", json=BODY, headers={"Idempotency-Key": "k", "Authorization": "Bearer no"}
        )
        assert wrong.status_code == 401
        right = await c.post(
            "/v1/calls",
            json=BODY,
            headers={"Idempotency-Key": "k", "Authorization": "Bearer s3cret"},
        )
        assert right.status_code == 201


@pytest.mark.anyio
async def test_concurrent_requests_with_one_key_under_latency() -> None:
    async with client_for(create_fake_provider(latency_ms=300)) as c:
        first, second = await asyncio.gather(post_call(c), post_call(c))
        assert sorted([first.status_code, second.status_code]) == [201, 409]
        assert len(await calls(c)) == 1
        # once the first is done, the key replays
        third = await post_call(c)
        assert third.status_code == 201
        assert third.headers["Idempotent-Replayed"] == "true"


@pytest.mark.anyio
async def test_in_progress_is_409_until_the_first_completes(fake: httpx.AsyncClient) -> None:
    await fake.post("/v1/control", json={"hang": True})
    first = asyncio.create_task(post_call(fake))

    async def first_in_flight() -> bool:
        log = await requests_log(fake)
        return len(log) == 1 and log[0]["status"] is None

    await eventually(first_in_flight, DEADLINE)
    assert (await post_call(fake)).status_code == 409
    assert not first.done()
    await fake.post("/v1/control", json={"hang": False})
    assert (await first).status_code == 201
    assert len(await calls(fake)) == 1


@pytest.mark.anyio
async def test_abandoned_request_releases_its_key(fake: httpx.AsyncClient) -> None:
    await fake.post("/v1/control", json={"hang": True})
    task = asyncio.create_task(post_call(fake))

    async def in_flight() -> bool:
        return len(await requests_log(fake)) == 1

    await eventually(in_flight, DEADLINE)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake.post("/v1/control", json={"hang": False})
    response = await post_call(fake)
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers


@pytest.mark.anyio
@pytest.mark.parametrize("fail_status", [500, 503])
async def test_failure_does_not_store_the_key(fail_status: int) -> None:
    async with client_for(create_fake_provider(fail_rate=1.0)) as c:
        await c.post("/v1/control", json={"fail_status": fail_status})
        assert (await post_call(c)).status_code == fail_status
        assert (await post_call(c)).status_code == fail_status  # not 409: not left in progress
        assert await calls(c) == []
        await c.post("/v1/control", json={"fail_rate": 0})
        retried = await post_call(c)
        assert retried.status_code == 201
        assert "Idempotent-Replayed" not in retried.headers
        assert len(await calls(c)) == 1


@pytest.mark.anyio
async def test_rate_limit_failure_has_retry_after(fake: httpx.AsyncClient) -> None:
    control = await fake.post("/v1/control", json={"fail_rate": 1, "fail_status": 429})
    assert control.json()["fail_status"] == 429
    response = await post_call(fake)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"


@pytest.mark.anyio
async def test_prefix_recorded_as_placed_by(fake: httpx.AsyncClient) -> None:
    a = await post_call(fake, key="k-a", path="/replica-a/v1/calls")
    b = await post_call(fake, key="k-b", path="/replica-b/v1/calls")
    assert (a.status_code, b.status_code) == (201, 201)
    # keys are provider-wide: replica-b completing replica-a's key gets the replay
    replay = await post_call(fake, key="k-a", path="/replica-b/v1/calls")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == a.json()["id"]

    stored = await calls(fake)
    assert [(c["idempotency_key"], c["placed_by"]) for c in stored] == [
        ("k-a", "replica-a"),
        ("k-b", "replica-b"),
    ]
    via_prefix = (await fake.get("/replica-a/v1/calls")).json()["calls"]
    assert len(via_prefix) == 2
    only_a = (await fake.get("/v1/calls", params={"placed_by": "replica-a"})).json()["calls"]
    assert [c["idempotency_key"] for c in only_a] == ["k-a"]


@pytest.mark.anyio
async def test_requests_log(fake: httpx.AsyncClient) -> None:
    await post_call(fake, key=None, path="/replica-a/v1/calls")
    await post_call(fake, key="k-1", path="/replica-a/v1/calls")
    await post_call(fake, key="k-1", path="/replica-b/v1/calls")
    log = await requests_log(fake)
    assert [(r["idempotency_key"], r["placed_by"], r["status"], r["replayed"]) for r in log] == [
        (None, "replica-a", 400, False),
        ("k-1", "replica-a", 201, False),
        ("k-1", "replica-b", 201, True),
    ]
    received = [r["received_at"] for r in log]
    assert received == sorted(received)
    assert all(isinstance(t, float) for t in received)


@pytest.mark.anyio
async def test_control_validation_and_reset(fake: httpx.AsyncClient) -> None:
    state = (await fake.get("/v1/control")).json()
    assert state == {"latency_ms": 0.0, "fail_rate": 0.0, "fail_status": 503, "hang": False}
    for bad in ({"fail_rate": 2}, {"fail_status": 418}, {"hang": "yes"}, {"nope": 1}):
        assert (await fake.post("/v1/control", json=bad)).status_code == 422
    changed = await fake.post("/v1/control", json={"latency_ms": 5, "fail_rate": 0.5})
    assert changed.json()["latency_ms"] == 5.0

    await post_call(fake, key="k-reset")
    assert (await fake.post("/v1/reset")).status_code == 200
    assert (await fake.get("/v1/control")).json() == state
    assert await calls(fake) == []
    assert await requests_log(fake) == []
    again = await post_call(fake, key="k-reset")
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers


# --- end to end: HttpTelephonyClient (aiohttp transport) against uvicorn ----------------------


@pytest.fixture
async def served_fake() -> AsyncIterator[tuple[str, Starlette]]:
    app = create_fake_provider()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + DEADLINE
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            server.should_exit = True
            await task
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await task


def call_request(key: str = "reminder-rem-1") -> CallRequest:
    return CallRequest(
        to=TO,
        from_=FROM,
        message="Reminder: dentist tomorrow at 10:00",
        appointment_id="appt-1",
        reminder_id="rem-1",
        idempotency_key=key,
    )


@pytest.mark.anyio
async def test_end_to_end_retry_is_replayed(served_fake: tuple[str, Starlette]) -> None:
    base, _ = served_fake
    async with HttpTelephonyClient(f"{base}/replica-a/", timeout=5) as client:
        first = await client.place_call(call_request())
        second = await client.place_call(call_request())
    assert first.kind is OutcomeKind.SENT and not first.replayed
    assert first.status_code == 201
    assert second.kind is OutcomeKind.SENT and second.replayed
    assert second.call_id == first.call_id

    async with httpx.AsyncClient(base_url=base) as http:
        stored = (await http.get("/v1/calls")).json()["calls"]
    assert len(stored) == 1
    assert stored[0]["placed_by"] == "replica-a"
    assert stored[0]["id"] == first.call_id


@pytest.mark.anyio
async def test_end_to_end_timeout_then_in_progress_then_replay(
    served_fake: tuple[str, Starlette],
) -> None:
    base, _ = served_fake
    async with (
        httpx.AsyncClient(base_url=base) as http,
        HttpTelephonyClient(base, timeout=0.2) as client,
    ):
        await http.post("/v1/control", json={"hang": True})
        timed_out = await client.place_call(call_request())
        assert timed_out.kind is OutcomeKind.TRANSIENT
        assert timed_out.status_code is None
        assert timed_out.error is not None and timed_out.error.startswith("timeout")

        busy = await client.place_call(call_request())
        assert (busy.kind, busy.status_code) == (OutcomeKind.TRANSIENT, 409)

        await http.post("/v1/control", json={"hang": False})

        async def first_completed() -> bool:
            log = (await http.get("/v1/requests")).json()["requests"]
            return log[0]["status"] == 201

        await eventually(first_completed, DEADLINE)
        replay = await client.place_call(call_request())
        assert replay.kind is OutcomeKind.SENT and replay.replayed
        assert len((await http.get("/v1/calls")).json()["calls"]) == 1


@pytest.mark.anyio
async def test_end_to_end_connection_refused_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # nothing listens on the port any more
    async with HttpTelephonyClient(f"http://127.0.0.1:{port}", timeout=5) as client:
        outcome = await client.place_call(call_request())
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.status_code is None
    # httpx-aiohttp reports a refused connection as httpx.ConnectTimeout; the client does not
    assert outcome.error is not None and outcome.error.startswith("network: ClientConnectorError")


@pytest.mark.anyio
async def test_stores_are_bounded_oldest_forgotten() -> None:
    from reminders_fakes import FakeProvider

    fake = FakeProvider(max_entries=3)
    async with client_for(fake.app) as c:
        for index in range(5):
            body = {**BODY, "metadata": {"appointment_id": "a", "reminder_id": f"r-{index}"}}
            assert (await post_call(c, key=f"k-{index}", body=body)).status_code == 201
        listed = (await c.get("/v1/calls")).json()
        assert [call["idempotency_key"] for call in listed["calls"]] == ["k-2", "k-3", "k-4"]
        assert listed["dropped"] == 2
        requests = (await c.get("/v1/requests")).json()
        assert len(requests["requests"]) == 3 and requests["dropped"] == 2
        assert list(fake.keys) == ["k-2", "k-3", "k-4"]
        # a remembered key still replays; a forgotten one is new again
        assert (await post_call(c, key="k-4", body={**BODY, "metadata": {"appointment_id": "a", "reminder_id": "r-4"}})
                ).headers.get("Idempotent-Replayed") == "true"


@pytest.mark.anyio
async def test_a_key_in_progress_is_never_forgotten() -> None:
    from reminders_fakes import FakeProvider

    fake = FakeProvider(max_entries=1)
    async with client_for(fake.app) as c:
        await c.post("/v1/control", json={"hang": True})
        hung = asyncio.create_task(post_call(c, key="slow"))
        await eventually(lambda: _has_key(fake, "slow"), DEADLINE)
        await c.post("/v1/control", json={"hang": False})
        assert (await hung).status_code == 201
        assert (await post_call(c, key="next", body={**BODY, "message": "other"})).status_code == 201
        assert list(fake.keys) == ["next"]


async def _has_key(fake: Any, key: str) -> bool:
    return key in fake.keys


def test_token_comes_from_the_environment_not_argv() -> None:
    import os
    import subprocess
    import sys

    from harness.ports import free_port, wait_for_port
    from service.cli import main

    with pytest.raises(SystemExit):
        main(["fake-provider", "--token", "s3cret"])  # argv is visible to every user: no such flag
    port = free_port()
    env = {**os.environ, "TELEPHONY_TOKEN": "s3cret"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "fake-provider", "--port", str(port)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=20)
        url = f"http://127.0.0.1:{port}/v1/calls"
        assert httpx.post(url, json=BODY, headers={"Idempotency-Key": "k"}, timeout=5).status_code == 401
        right = httpx.post(url, json=BODY, headers={"Idempotency-Key": "k", "Authorization": "Bearer s3cret"},
                           timeout=5)
        assert right.status_code == 201
    finally:
        process.terminate()
        process.wait(timeout=10)
