"""Issue 12, the service side: bad values and unavailable parts answer 4xx/503, never 500; the API
is closed or says it is open; the OpenAPI document tells the truth."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import time
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from harness.postgres import PostgresServer
from service.app import create_app
from service.components import check
from service.config import Settings
from service.db import Database
from service.dispatch.dispatcher import message_for
from service.errors import SettingError
from service.ledger import Claim
from tests.support.appclient import PHONE, body, future, make_settings, running_app
from tests.support.requirements import unavailable

pytestmark = pytest.mark.anyio



def locs(response) -> list[list]:
    return [item["loc"] for item in response.json()["detail"]]


@pytest.fixture
async def api(database_url: str, etcd_endpoint: str):
    async with running_app(make_settings(database_url, etcd_endpoint)) as client:
        yield client


# --- 3: cursor ----------------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["0001-01-01T00:00+14:00", "9999-12-31T23:59-14:00", "0001-01-01T00:00:00+00:00"])
async def test_a_cursor_out_of_range_is_a_422_naming_cursor(api, start: str) -> None:
    cursor = base64.urlsafe_b64encode(json.dumps([start, "x"]).encode()).decode().rstrip("=")
    response = await api.get("/appointments", params={"cursor": cursor})
    assert response.status_code == 422, response.text
    assert ["query", "cursor"] in locs(response)


# --- 7: numbers nobody should call, what is spoken ----------------------------------------------


async def test_premium_rate_numbers_are_refused(api) -> None:
    response = await api.post("/appointments", json=body(phone="+19005550123"))
    assert response.status_code == 422, response.text
    assert locs(response) == [["body", "phone"]]
    assert "PREMIUM_RATE" in response.json()["detail"][0]["msg"]
    created = (await api.post("/appointments", json=body())).json()
    patched = await api.patch(f"/appointments/{created['id']}", json={"phone": "+19005550123"})
    assert patched.status_code == 422 and locs(patched) == [["body", "phone"]]


async def test_allowed_countries_limit_the_numbers(tmp_path, etcd_endpoint: str) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/a.db", etcd_endpoint, allowed_countries="de, GB")
    assert settings.allowed_countries == {"DE", "GB"}
    async with running_app(settings) as client:
        refused = await client.post("/appointments", json=body())
        assert refused.status_code == 422 and locs(refused) == [["body", "phone"]]
        accepted = await client.post("/appointments", json=body(phone="+4930901820", timezone="Europe/Berlin"))
        assert accepted.status_code == 201, accepted.text


def test_voip_numbers_only_when_allowed() -> None:
    from service.reminders import NumberPolicy, number_refusal

    voip = "+445612345678"  # GB 056: VOIP
    assert "VOIP" in (number_refusal(voip, NumberPolicy()) or "")
    assert number_refusal(voip, NumberPolicy(allow_voip=True)) is None
    assert number_refusal(PHONE, NumberPolicy()) is None


def test_a_parsed_number_gets_the_answers_of_its_text() -> None:
    """The request's validation hands the number policy a PhoneNumber (parsed once); the policy
    answers for it what it answers for the plain text."""
    from service.reminders import NumberPolicy, PhoneNumber, number_refusal, parse_phone

    policies = [NumberPolicy(), NumberPolicy(allow_voip=True), NumberPolicy(allowed_countries=frozenset({"DE"}))]
    for text in (PHONE, "+445612345678", "+4930901820", "+18005550199", "+4915112345678"):
        number = parse_phone(text)
        assert isinstance(number, PhoneNumber) and number == text
        assert [number_refusal(number, p) for p in policies] == [number_refusal(text, p) for p in policies]
    assert number_refusal(parse_phone("+18005550199"), NumberPolicy()) is not None  # toll-free
    assert number_refusal(parse_phone(PHONE), policies[2]) == "country US is not in ALLOWED_COUNTRIES"
    for bad in ("+1415555267", "14155552671", "+1 415 555 2671x", "+999123"):
        with pytest.raises(ValueError, match="E.164"):
            parse_phone(bad)


def test_allowed_countries_are_validated_at_start() -> None:
    with pytest.raises(ValidationError, match="allowed_countries"):
        Settings(allowed_countries="US,XX")
    assert Settings(allowed_countries="").allowed_countries is None


def test_control_characters_are_not_spoken() -> None:
    claim = Claim(
        reminder_id="r", appointment_id="a", idempotency_key="k", due_at=datetime.now(UTC),
        scheduled_at=datetime.now(UTC), attempts=0, orphaned=False, phone=PHONE,
        customer_name="Ada\x1b[2J\u2028Lovelace\x07", starts_at=datetime(2030, 1, 1, 9, tzinfo=UTC),
        timezone="UTC", appointment_cancelled=False,
    )
    message = message_for(claim)
    assert message.startswith("Hello Ada [2J Lovelace, ")
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c == "\u2028" for c in message)


# --- 8: auth -------------------------------------------------------------------------------------


async def test_several_tokens_are_accepted_for_rotation(database_url: str, etcd_endpoint: str) -> None:
    settings = make_settings(database_url, etcd_endpoint, api_token="old-token, new-token")
    async with running_app(settings) as client:
        for token in ("old-token", "new-token"):
            response = await client.get("/appointments", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200, token
        for header in ({}, {"Authorization": "Bearer old-token, new-token"}, {"Authorization": "Bearer other"}):
            assert (await client.get("/appointments", headers=header)).status_code == 401


async def test_an_unauthenticated_body_is_refused_before_it_is_read(tmp_path) -> None:
    """The app is called as a server would; its `receive` counts reads: none may happen."""
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/a.db", api_token="s3cret")
    app = create_app(settings)
    reads = 0

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        await asyncio.sleep(3600)  # a slow client: it never finishes its body
        return {"type": "http.request", "body": b"x", "more_body": True}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/appointments", "raw_path": b"/appointments", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"60000")],
        "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {},
    }
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert sent[0]["status"] == 401 and reads == 0


def test_secrets_over_plain_remote_http_are_refused_at_start() -> None:
    with pytest.raises(SettingError, match="TELEPHONY_URL"):
        check(Settings(telephony_url="http://provider.example:8090", telephony_token="t"))
    with pytest.raises(ValidationError, match="ETCD_ENDPOINTS"):
        Settings(etcd_endpoints="http://etcd.example:2379", etcd_password="p", etcd_username="u")
    # loopback, https, no secret, or the explicit opt-out: accepted
    check(Settings(telephony_url="http://127.0.0.1:8090", telephony_token="t"))
    check(Settings(telephony_url="http://localhost:8090", telephony_token="t"))
    check(Settings(telephony_url="https://provider.example", telephony_token="t"))
    check(Settings(telephony_url="http://provider.example:8090"))
    Settings(etcd_endpoints="127.0.0.1:2379", etcd_password="p", etcd_username="u")
    check(Settings(telephony_url="http://fake-provider:8090", telephony_token="t", allow_insecure_transport=True))


def test_an_open_api_is_announced_at_start(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        create_app(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/a.db"))
    assert any("API_TOKEN is unset" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_app(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/a.db", api_token="t"))
    assert not any("API_TOKEN" in record.getMessage() for record in caplog.records)


# --- 9, 10: docs and the OpenAPI document -------------------------------------------------------


@pytest.mark.parametrize("api_docs", [None, True])
async def test_api_docs_are_off_unless_asked_for(tmp_path, etcd_endpoint: str, api_docs: bool | None) -> None:
    overrides = {} if api_docs is None else {"api_docs": api_docs}
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/a.db", etcd_endpoint, **overrides)
    async with running_app(settings) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await client.get(path)).status_code == (200 if api_docs else 404), path
        assert (await client.get("/appointments")).status_code == 200


def _operations(schema: dict) -> list[dict]:
    return [op for ops in schema["paths"].values() for op in ops.values() if isinstance(op, dict)]


def test_the_document_declares_auth_only_when_it_is_on(tmp_path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/a.db"
    open_schema = create_app(Settings(database_url=url)).openapi()
    assert not any("security" in op for op in _operations(open_schema))
    assert "securitySchemes" not in open_schema.get("components", {})
    assert not any("401" in op["responses"] for op in _operations(open_schema))
    closed = create_app(Settings(database_url=url, api_token="t")).openapi()
    secured = [op for op in _operations(closed) if "security" in op]
    assert {op["operationId"] for op in secured} == {"createAppointment", "listAppointments", "getAppointment",
                                                     "patchAppointment", "cancelAppointment", "listNumber",
                                                     "getListedNumber", "unlistNumber", "listEvents"}
    assert all(op["security"] == [{"HTTPBearer": []}] and "401" in op["responses"] for op in secured)
    assert closed["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "Required when API_TOKEN is set."}


def test_patch_declares_no_null_it_refuses_and_the_cursor_has_a_form(tmp_path) -> None:
    schema = create_app(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/a.db")).openapi()
    patch = schema["components"]["schemas"]["AppointmentPatch"]["properties"]
    for name in ("customer_name", "phone", "starts_at", "timezone"):
        assert "null" not in json.dumps(patch[name]), name
    (cursor,) = [p for p in schema["paths"]["/appointments"]["get"]["parameters"] if p["name"] == "cursor"]
    assert cursor["schema"].get("pattern") or (cursor["schema"].get("anyOf") and "pattern" in json.dumps(cursor))
    assert "next_cursor" in cursor.get("description", "")


# --- 2: the database unavailable ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres", "connection refused"),
        ("postgresql+asyncpg://postgres@no-such-host.invalid:5432/postgres", "database host not found"),
    ],
)
async def test_an_unreachable_database_is_a_503_with_a_reason(
    tmp_path, etcd_endpoint: str, url: str, reason: str
) -> None:
    from harness.ports import free_port

    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/a.db", etcd_endpoint)
    async with running_app(settings) as client:
        working = client.app.state.db
        client.app.state.db = Database(url.format(port=free_port()))
        try:
            for method, path, payload in (("GET", "/appointments/abc", None), ("POST", "/appointments", body()),
                                          ("GET", "/appointments", None)):
                response = await client.request(method, path, json=payload)
                assert response.status_code == 503, (method, path, response.text)
                assert reason in response.json()["detail"]
        finally:
            await client.app.state.db.dispose()
            client.app.state.db = working


def test_reasons_name_the_failure_without_secrets() -> None:
    from service.api.unavailable import unavailable_reason
    class InvalidPasswordError(Exception):
        pass

    assert unavailable_reason(InvalidPasswordError('password authentication failed for user "app"')) == (
        "authentication failed"
    )
    assert unavailable_reason(ConnectionRefusedError(111, "refused")) == "connection refused"
    assert unavailable_reason(TimeoutError()) == "timed out"


def _pg_ctl(server: PostgresServer, *args: str) -> None:
    """pg_ctl, spawned without fork handlers: a forked child of this process (gRPC threads of the
    elector's etcd client running) crashed with SIGSEGV before exec (harness.postgres uses `user=`)."""
    command = [str(server.bindir / "pg_ctl"), *args]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    # close_fds=False and no user=/preexec_fn: subprocess uses posix_spawn, which runs no atfork handler
    subprocess.run(command, close_fds=False, check=True, capture_output=True, timeout=60)


def _stop(server: PostgresServer) -> None:
    # fast: a clean shutdown; an immediate one is a crash, and with synchronous_commit=off it loses
    # the last commits (the appointment read back below)
    _pg_ctl(server, "-D", server.data_dir, "-m", "fast", "-w", "stop")


def _start(server: PostgresServer) -> None:
    options = (
        f"-p {server.port} -k {server.base} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off"
    )
    _pg_ctl(server, "-D", server.data_dir, "-o", options, "-l", server.log_path, "-w", "start")


@pytest.mark.slow
async def test_postgresql_stopped_is_a_503_then_200_when_it_returns(etcd_endpoint: str) -> None:
    try:
        server = PostgresServer().start()
    except (OSError, RuntimeError, TimeoutError) as error:
        unavailable("PostgreSQL", error)
    try:
        url = server.create_database("outage")
        async with running_app(make_settings(url, etcd_endpoint)) as client:
            created = (await client.post("/appointments", json=body())).json()
            await asyncio.to_thread(_stop, server)
            for method, path, payload in (("GET", f"/appointments/{created['id']}", None),
                                          ("POST", "/appointments", body())):
                # the bound: an answer within 15 s (a hang fails here)
                response = await asyncio.wait_for(client.request(method, path, json=payload), 15)
                assert response.status_code == 503, (method, response.text)
            await asyncio.to_thread(_start, server)
            deadline = time.monotonic() + 30
            while (again := await client.get(f"/appointments/{created['id']}")).status_code != 200:
                assert time.monotonic() < deadline, f"not 200 again after PostgreSQL returned: {again.text}"
                await asyncio.sleep(0.2)
            assert (await client.post("/appointments", json=body())).status_code == 201
    finally:
        server.close()


# --- 4: re-plans ---------------------------------------------------------------------------------


async def test_re_plans_do_not_grow_the_reminders(api) -> None:
    created = (await api.post("/appointments", json=body(starts_at=future(days=5)))).json()
    times = [future(days=1, minutes=60 * m) for m in range(20)]  # MIN_REMINDER_SPACING apart
    for round_ in range(6):
        response = await api.patch(f"/appointments/{created['id']}", json={"remind_at": times[round_ % 2:]})
        assert response.status_code == 200, response.text
    reminders = (await api.get(f"/appointments/{created['id']}")).json()["reminders"]
    assert len(reminders) == len(times[5 % 2:])  # the last plan only: nothing superseded was ever claimed
    assert all(r["status"] == "pending" for r in reminders)


async def test_a_re_plan_keeps_every_reminder_a_leader_claimed(api) -> None:
    from sqlalchemy import update

    from service.db import Reminder

    created = (await api.post("/appointments", json=body(remind_at=[future(days=1), future(days=2)]))).json()
    touched = created["reminders"][0]["id"]
    async with api.app.state.db.session() as session:  # as a claim, then a window wait, leaves it
        await session.execute(update(Reminder).where(Reminder.id == touched).values(fence_token=7))
        await session.commit()
    await api.patch(f"/appointments/{created['id']}", json={"remind_at": [future(days=1, hours=1)]})
    reminders = {r["id"]: r for r in (await api.get(f"/appointments/{created['id']}")).json()["reminders"]}
    assert reminders[touched]["status"] == "cancelled" and reminders[touched]["skip_reason"] == "re-planned"
    assert created["reminders"][1]["id"] not in reminders
    assert len(reminders) == 2
