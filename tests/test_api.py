"""The appointments API, probes and errors, on SQLite and PostgreSQL, with a real etcd."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta

import pytest

from tests.support.appclient import PHONE, body, future, make_settings, running_app

pytestmark = pytest.mark.anyio



@pytest.fixture
async def api(database_url: str, etcd_endpoint: str):
    async with running_app(make_settings(database_url, etcd_endpoint)) as client:
        yield client


async def test_create_and_read(api) -> None:
    response = await api.post("/appointments", json=body(notes="bring the X-rays"))
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["phone"] == PHONE and created["status"] == "scheduled"
    (reminder,) = created["reminders"]
    assert reminder["status"] == "pending" and reminder["attempts"] == 0 and reminder["last_error"] is None
    due = datetime.fromisoformat(reminder["due_at"])
    assert due == datetime.fromisoformat(created["starts_at"]) - timedelta(hours=24)
    fetched = await api.get(f"/appointments/{created['id']}")
    assert fetched.status_code == 200
    assert fetched.json()["reminders"] == created["reminders"]
    assert fetched.json()["starts_at"] == created["starts_at"]


async def test_explicit_remind_at(api) -> None:
    times = [future(days=1), future(hours=2)]
    response = await api.post("/appointments", json=body(remind_at=times))
    assert response.status_code == 201, response.text
    due = [datetime.fromisoformat(r["due_at"]) for r in response.json()["reminders"]]
    assert due == sorted(datetime.fromisoformat(t) for t in times)


async def test_unplanned_reminder_is_reported(api) -> None:
    response = await api.post("/appointments", json=body(starts_at=future(hours=2)))
    assert response.status_code == 201
    assert response.json()["reminders"] == []
    (unplanned,) = response.json()["unplanned"]
    assert "passed" in unplanned["reason"]


async def test_unknown_id_is_404(api) -> None:
    for method in ("get", "delete"):
        response = await getattr(api, method)("/appointments/does-not-exist")
        assert response.status_code == 404
    response = await api.patch("/appointments/does-not-exist", json={"notes": "x"})
    assert response.status_code == 404


async def test_list_filters_and_cursor(api) -> None:
    ids = []
    for day in range(1, 6):
        response = await api.post("/appointments", json=body(starts_at=future(days=day)))
        ids.append(response.json()["id"])
    await api.delete(f"/appointments/{ids[0]}")
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/appointments", params=params)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    scheduled = (await api.get("/appointments", params={"status": "scheduled"})).json()["items"]
    assert [a["id"] for a in scheduled] == ids[1:]
    window = {"starts_after": future(days=1, hours=12), "starts_before": future(days=3, hours=12)}
    middle = (await api.get("/appointments", params=window)).json()["items"]
    assert [a["id"] for a in middle] == ids[1:3]


async def test_patch_replans_pending_reminders(api) -> None:
    created = (await api.post("/appointments", json=body())).json()
    old = created["reminders"][0]
    response = await api.patch(f"/appointments/{created['id']}", json={"starts_at": future(days=4)})
    assert response.status_code == 200, response.text
    reminders = {r["id"]: r for r in response.json()["reminders"]}
    assert old["id"] not in reminders  # never claimed: deleted by the re-plan (docs/decisions/0125)
    (new,) = [r for r in reminders.values() if r["status"] == "pending"]
    starts_at = datetime.fromisoformat(response.json()["starts_at"])
    assert datetime.fromisoformat(new["due_at"]) == starts_at - timedelta(hours=24)
    # notes do not change the call: no re-plan
    again = await api.patch(f"/appointments/{created['id']}", json={"notes": "second floor"})
    assert [r["id"] for r in again.json()["reminders"] if r["status"] == "pending"] == [new["id"]]
    # back to explicit times, then to the policy with null
    explicit = await api.patch(f"/appointments/{created['id']}", json={"remind_at": [future(hours=5)]})
    pending = [datetime.fromisoformat(r["due_at"]) for r in explicit.json()["reminders"] if r["status"] == "pending"]
    assert pending == [datetime.fromisoformat(explicit.json()["remind_at"][0])]
    policy = await api.patch(f"/appointments/{created['id']}", json={"remind_at": None})
    assert policy.json()["remind_at"] is None
    assert len([r for r in policy.json()["reminders"] if r["status"] == "pending"]) == 1


async def test_delete_cancels(api) -> None:
    created = (await api.post("/appointments", json=body(remind_at=[future(hours=3), future(hours=4)]))).json()
    response = await api.delete(f"/appointments/{created['id']}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert {r["status"] for r in response.json()["reminders"]} == {"cancelled"}
    assert (await api.delete(f"/appointments/{created['id']}")).status_code == 200
    assert (await api.patch(f"/appointments/{created['id']}", json={"notes": "x"})).status_code == 409


BAD_BODIES = [
    ("phone", {"phone": "12345"}),
    ("phone", {"phone": "not a number"}),
    ("phone", {"phone": "+1 415 555 2671 ext 9"}),
    ("phone", {"phone": "+999123"}),
    ("phone", {"phone": 14155552671}),
    ("starts_at", {"starts_at": "2031-01-01T10:00:00"}),
    ("starts_at", {"starts_at": "2020-01-01T10:00:00Z"}),
    ("starts_at", {"starts_at": "tomorrow"}),
    ("starts_at", {"starts_at": 1893456000}),
    ("starts_at", {"starts_at": "9999-12-31T23:59:59Z"}),
    ("timezone", {"timezone": "Mars/Olympus_Mons"}),
    ("timezone", {"timezone": "../../etc/passwd"}),
    ("timezone", {"timezone": ""}),
    ("customer_name", {"customer_name": ""}),
    ("customer_name", {"customer_name": "x" * 10_000}),
    ("customer_name", {"customer_name": True}),
    ("customer_name", {"customer_name": None}),
    ("notes", {"notes": False}),
    ("remind_at", {"remind_at": []}),
    ("remind_at", {"remind_at": "2031-01-01T10:00:00Z"}),
    ("remind_at", {"remind_at": ["2031-01-01T10:00:00"]}),
    ("unknown_field", {"unknown_field": 1}),
]


@pytest.mark.parametrize(("field", "change"), BAD_BODIES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_BODIES)])
async def test_bad_input_is_422_naming_the_field(api, field: str, change: dict) -> None:
    response = await api.post("/appointments", json=body(**change))
    assert response.status_code == 422, response.text
    assert field in {part for error in response.json()["detail"] for part in error["loc"]}
    assert (await api.get("/appointments")).json()["items"] == []


async def test_remind_at_after_starts_at_is_422(api) -> None:
    response = await api.post("/appointments", json=body(starts_at=future(days=1), remind_at=[future(days=2)]))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "remind_at", 0]


async def test_remind_at_in_the_past_is_422(api) -> None:
    response = await api.post("/appointments", json=body(remind_at=[future(hours=-1)]))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:2] == ["body", "remind_at"]


async def test_patch_bad_input(api) -> None:
    created = (await api.post("/appointments", json=body())).json()
    for change, field in [({"starts_at": None}, "starts_at"), ({"phone": "x"}, "phone"), ({"id": "x"}, "id"),
                          ({"remind_at": [future(days=5)]}, "remind_at")]:
        response = await api.patch(f"/appointments/{created['id']}", json=change)
        assert response.status_code == 422, (change, response.text)
        assert field in {part for error in response.json()["detail"] for part in error["loc"]}


@pytest.mark.parametrize(
    ("params", "field"),
    [({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"limit": "true"}, "limit"), ({"cursor": "!!!"}, "cursor"),
     ({"cursor": "bm90IGpzb24"}, "cursor"), ({"status": "maybe"}, "status"),
     ({"starts_after": "2030-01-01T00:00:00"}, "starts_after")],
)
async def test_bad_query_is_422(api, params: dict, field: str) -> None:
    response = await api.get("/appointments", params=params)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"][0]["loc"]


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b"{not json", "application/json"), (b"\xff\xfe\x00", "application/json"), (b"[]", "application/json"),
     (b"customer_name=x", "application/x-www-form-urlencoded"), (b"", "application/json")],
)
async def test_malformed_bodies_are_client_errors(api, content: bytes, content_type: str) -> None:
    response = await api.post("/appointments", content=content, headers={"content-type": content_type})
    assert response.status_code in (400, 422), response.text


async def test_probes_and_leader(api) -> None:
    assert (await api.get("/healthz")).status_code == 200
    ready = await api.get("/readyz")
    assert ready.status_code == 200, ready.text
    leader = (await api.get("/leader")).json()
    assert set(leader) == {"instance", "is_leader", "leader", "fencing_token", "lease_ttl"}
    assert leader["instance"] == "test-replica" and leader["lease_ttl"] == 3
    # /metrics is on METRICS_PORT (tests/test_public_port.py), never on the API's port
    assert (await api.get("/metrics")).status_code == 404


async def test_bearer_token(database_url: str, etcd_endpoint: str) -> None:
    settings = make_settings(database_url, etcd_endpoint, api_token="s3cret")
    async with running_app(settings) as api:
        assert (await api.post("/appointments", json=body())).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await api.post("/appointments", json=body(), headers=wrong)).status_code == 401
        assert (await api.get("/appointments", headers=wrong)).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert (await api.get("/appointments", headers=good)).json()["items"] == []
        assert (await api.post("/appointments", json=body(), headers=good)).status_code == 201
        assert len((await api.get("/appointments", headers=good)).json()["items"]) == 1
        assert (await api.get("/healthz")).status_code == 200


async def test_phone_numbers_are_masked_in_logs(api, caplog: pytest.LogCaptureFixture) -> None:
    from service.logs import MaskPhoneNumbers

    caplog.handler.addFilter(MaskPhoneNumbers())
    with caplog.at_level(logging.INFO):
        assert (await api.post("/appointments", json=body())).status_code == 201
        logging.getLogger("test").info("number %s inline +4930123456789", PHONE)
    text = caplog.text
    assert "appointment" in text
    assert PHONE not in text and "+4930123456789" not in text
    assert "*" in text


def test_json_logs_mask_phones(capsys: pytest.CaptureFixture[str]) -> None:
    from service.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("json", "info")
        logging.getLogger("service.test").info("calling %s", PHONE)
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    entry = json.loads(line)
    assert entry["level"] == "info" and PHONE not in line and entry["message"].startswith("calling +1")


async def test_oversized_and_deep_bodies(api) -> None:
    huge = await api.post("/appointments", json=body(notes="x" * 100_000))
    assert huge.status_code == 413
    async def chunks():
        for chunk in (b'{"notes": "', b"y" * 70_000, b'"}'):
            yield chunk

    chunked = await api.post("/appointments", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    deep = await api.post("/appointments", content=b"[" * 5000 + b"]" * 5000,
                          headers={"content-type": "application/json"})
    assert deep.status_code == 422
    nested_notes = await api.post("/appointments", json=body(notes={"a": {"b": {"c": [1, [2, [3]]]}}}))
    assert nested_notes.status_code == 422
    brackets_in_a_string = await api.post("/appointments", json=body(notes="[" * 100))
    assert brackets_in_a_string.status_code == 201
