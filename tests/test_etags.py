"""Optimistic concurrency (issue 24), on SQLite and PostgreSQL: GET, POST and PATCH answer an
appointment's ETag (its version); a PATCH or DELETE whose If-Match no longer matches is a 412 and
changes nothing, checked by a conditional UPDATE in the write's own transaction, so that two
writers holding the same ETag cannot both win; every writer of the appointment's row moves the
ETag on (docs/decisions/0241)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, text, update

from service import appointments
from service.config import Settings
from service.db import Appointment, Database
from service.ledger import consent, erasure
from tests.support.appclient import body, future, make_settings, running_app
from tests.support.waiting import poll_until
from tests.test_lifecycle import S, _confirm, _decline, _seed

pytestmark = pytest.mark.anyio


@pytest.fixture
async def api(database_url: str, etcd_endpoint: str):
    async with running_app(make_settings(database_url, etcd_endpoint)) as client:
        yield client


async def test_get_post_and_patch_answer_the_etag_and_a_stale_one_changes_nothing(api) -> None:
    created = await api.post("/appointments", json=body())
    assert created.status_code == 201 and created.headers["etag"] == '"1"'
    path = f"/appointments/{created.json()['id']}"
    assert (await api.get(path)).headers["etag"] == '"1"'
    patched = await api.patch(path, json={"notes": "first"}, headers={"If-Match": '"1"'})
    assert patched.status_code == 200, patched.text
    assert patched.headers["etag"] == '"2"' and "version" not in patched.json()
    before = await api.get(path)
    assert before.headers["etag"] == '"2"'
    # a re-planning change from someone who read version 1: refused, and nothing of it stored
    stale = await api.patch(path, json={"starts_at": future(days=5), "customer_name": "Someone Else"},
                            headers={"If-Match": '"1"'})
    assert stale.status_code == 412, stale.text
    after = await api.get(path)
    assert after.json() == before.json() and after.headers["etag"] == '"2"'
    # without If-Match the last writer wins, and the ETag moves on
    blind = await api.patch(path, json={"notes": "blind"})
    assert blind.status_code == 200 and blind.headers["etag"] == '"3"'
    assert all("version" not in item for item in (await api.get("/appointments")).json()["items"])


# (If-Match lines, status) for an appointment at version 2
IF_MATCH = [
    (['"2"'], 200), (["*"], 200), (['"7", "2"'], 200), ([', "2",'], 200), (['W/"2", "2"'], 200),
    (['"1"', '"2"'], 200),  # two header lines make one list
    (['"1"'], 412), (['W/"2"'], 412), (['"abc"'], 412), (['"02"'], 412), (['"99999999999999999999999"'], 412),
    (['"2'], 422), (["2"], 422), ([""], 422), (['*, "2"'], 422), (["*", '"2"'], 422), (['"a"b"'], 422),
    (['"' + "1" * 1030 + '"'], 422),
]


@pytest.mark.parametrize("method", ["patch", "delete"])
async def test_if_match_is_rfc_9110s(api, method: str) -> None:
    for lines, expected in IF_MATCH:
        created = (await api.post("/appointments", json=body())).json()
        path = f"/appointments/{created['id']}"
        assert (await api.patch(path, json={"notes": "v2"})).headers["etag"] == '"2"'
        headers = [("If-Match", line) for line in lines]
        if method == "patch":
            response = await api.patch(path, json={"notes": "changed"}, headers=headers)
        else:
            response = await api.request("DELETE", path, headers=headers)
        assert response.status_code == expected, (lines, response.text)
        current = await api.get(path)
        if expected == 422:
            assert response.json()["detail"][0]["loc"] == ["header", "If-Match"], lines
        if expected == 200:
            assert current.headers["etag"] == '"3"', lines
        else:
            assert current.headers["etag"] == '"2"', lines
            assert current.json()["notes"] == "v2" and current.json()["status"] == "scheduled", lines


async def test_what_comes_before_the_precondition_and_after_it(api) -> None:
    assert (await api.patch("/appointments/nope", json={"notes": "x"}, headers={"If-Match": '"1"'})).status_code == 404
    assert (await api.delete("/appointments/nope", headers={"If-Match": "*"})).status_code == 404
    created = (await api.post("/appointments", json=body())).json()
    path = f"/appointments/{created['id']}"
    assert (await api.delete(path, headers={"If-Match": '"1"'})).status_code == 200
    cancelled = await api.get(path)
    assert cancelled.headers["etag"] == '"2"'
    # a client that saw the cancellation is told why it cannot change it; one that did not, that it is stale
    assert (await api.patch(path, json={"notes": "x"}, headers={"If-Match": '"2"'})).status_code == 409
    assert (await api.patch(path, json={"notes": "x"}, headers={"If-Match": '"1"'})).status_code == 412
    erased = await api.delete(path, params={"erase": "true"}, headers={"If-Match": '"2"'})
    assert erased.status_code == 200 and erased.json()["customer_name"] == ""
    assert (await api.get(path)).headers["etag"] == '"3"'


async def _version(db: Database, appointment_id: str) -> int:
    return (await appointments.read(db, appointment_id))["version"]


async def test_every_writer_of_the_appointment_moves_the_etag(db: Database) -> None:
    seed = {"status": S.SENT, "token": 5, "bound": True, "call_status": "in-progress"}
    confirmed, declined = await _seed(db, **seed), await _seed(db, **seed)
    assert await _version(db, confirmed[0]) == await _version(db, declined[0]) == 1  # as the migration's default
    await _confirm(db, confirmed)
    await _decline(db, declined)
    assert await _version(db, confirmed[0]) == await _version(db, declined[0]) == 2
    # a listing skips reminders only: the appointment's fields, and so its ETag, stay (decision 0241)
    await consent.add(db, "+14155552671")
    assert await _version(db, confirmed[0]) == 2
    # retention's erasure
    now = datetime.now(UTC)
    assert await erasure.erase_past(db, now + timedelta(days=1), now) == 2
    assert await _version(db, confirmed[0]) == await _version(db, declined[0]) == 3


def _planning():
    return Settings(call_window="00:00-24:00").planning_config()


async def _created(db: Database) -> str:
    new = appointments.NewAppointment("Ada Lovelace", "+14155552671", datetime.now(UTC) + timedelta(days=3))
    return (await appointments.create(db, new, _planning()))["id"]


async def test_of_writers_holding_the_same_etag_exactly_one_wins(db: Database) -> None:
    appointment_id = await _created(db)
    starts = [datetime.now(UTC) + timedelta(days=4 + i) for i in range(6)]
    results = await asyncio.gather(*(
        appointments.change(db, appointment_id, {"starts_at": start, "notes": f"writer {i}"}, _planning(),
                            expected={1})
        for i, start in enumerate(starts)), return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1, results
    assert all(isinstance(r, appointments.PreconditionFailed) for r in results if r is not winners[0]), results
    stored = await appointments.read(db, appointment_id)
    assert stored["version"] == winners[0]["version"] == 2
    assert stored["notes"] == winners[0]["notes"] and stored["starts_at"] == winners[0]["starts_at"]
    assert [r["id"] for r in stored["reminders"]] == [r["id"] for r in winners[0]["reminders"]]  # one plan's


async def _waiting_for_a_lock(db: Database) -> bool:
    async with db.engine.connect() as connection:
        return bool(await connection.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")))


async def test_the_check_is_atomic_with_the_write(db: Database) -> None:
    """Another writer changes the appointment and holds its transaction open while a PATCH
    conditional on the version before that change starts; then it commits. The PATCH must see the
    commit: a check made on a read that did not wait for the other writer would let it through (a
    lost update). PostgreSQL: the PATCH is seen waiting for the other's row lock before the commit.
    SQLite (one writer; a read does not wait): the check is the first statement of the PATCH's
    transaction, a write, which waits for the other's commit and reads what it committed."""
    appointment_id = await _created(db)
    sent, statements = asyncio.Event(), []

    def record(_conn, _cursor, statement: str, *_args: object) -> None:
        if "appointments" in statement:
            statements.append(" ".join(statement.split()))
            sent.set()

    async with db.engine.begin() as other:
        await other.execute(update(Appointment).where(Appointment.id == appointment_id)
                            .values(notes="the other writer's", updated_at=datetime.now(UTC)))
        event.listen(db.engine.sync_engine, "before_cursor_execute", record)
        try:
            patch = asyncio.ensure_future(appointments.change(
                db, appointment_id, {"notes": "mine", "starts_at": datetime.now(UTC) + timedelta(days=9)},
                _planning(), expected={1}))
            await asyncio.wait_for(sent.wait(), timeout=10)
            if not db.is_sqlite:
                await poll_until(lambda: _waiting_for_a_lock(db), 10, "the PATCH waiting for the other's row lock")
        finally:
            event.remove(db.engine.sync_engine, "before_cursor_execute", record)
        assert not patch.done()
    with pytest.raises(appointments.PreconditionFailed):
        await asyncio.wait_for(patch, timeout=20)
    assert statements[0].startswith("UPDATE appointments SET") and "version IN" in statements[0], statements
    stored = await appointments.read(db, appointment_id)
    assert (stored["version"], stored["notes"]) == (2, "the other writer's")
    assert stored["starts_at"] < datetime.now(UTC) + timedelta(days=4)
