"""What each appointment route costs the database: statements per request, and the JSON it writes.

The routes read and write through SQLAlchemy Core in one transaction at most (issue 16): a read
is one SELECT, POST one INSERT statement on PostgreSQL (the appointment's INSERT in a WITH; one per
table on SQLite, which has no INSERT inside WITH), a PATCH its SELECT … FOR UPDATE and one statement
per table it changes — nothing read back after a write. Counted on SQLite and PostgreSQL with
SQLAlchemy's cursor events (BEGIN/COMMIT are not statements there, and neither is a pre-ping).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import TypeAdapter
from sqlalchemy import event, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from service import appointments
from service.api.schemas import AppointmentList, AppointmentOut
from service.db import Appointment, Database
from service.reminders import ALWAYS, MessageTemplates, PlanningConfig, ReminderOffset
from tests.support.appclient import make_settings, running_app

pytestmark = pytest.mark.anyio

# The leader's dispatcher and the backlog gauges query in the background: not the API's statements.
_BACKGROUND_MARKS = ("leader_fence", "SKIP LOCKED", "claimed_by", "next_attempt_at <", "count(*)", "lock_timeout",
                     "reminders_db_now(", "(now() +",  # these two: the claim reading the database's clock
                     "event_feed", "events.position")  # the leader's events relay (numbering, retention)


@pytest.fixture
async def api(database_url: str, etcd_endpoint: str):
    async with running_app(make_settings(database_url, etcd_endpoint)) as client:
        yield client


@pytest.fixture
def statements() -> Iterator[list[str]]:
    seen: list[str] = []

    def record(_conn, _cursor, statement: str, *_args: object) -> None:
        if not any(mark in statement for mark in _BACKGROUND_MARKS):
            seen.append(" ".join(statement.split()[:3]))

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


def _starts(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0).isoformat()


async def test_each_route_is_one_statement_per_table(api, statements: list[str], database_url: str) -> None:
    body = {"customer_name": "Ada Lovelace", "phone": "+14155552671", "starts_at": _starts(3), "timezone": "UTC"}
    created = await api.post("/appointments", json=body)
    assert created.status_code == 201, created.text
    if database_url.startswith("sqlite"):  # the do-not-call list's lookup, in the create's transaction
        assert statements == ["SELECT EXISTS (SELECT", "INSERT INTO appointments", "INSERT INTO reminders"]
    else:  # PostgreSQL: the lookup is inside the one statement
        assert statements == ["WITH new_appointment AS"]
    appointment_id = created.json()["id"]

    statements.clear()
    assert (await api.get(f"/appointments/{appointment_id}")).status_code == 200
    assert len(statements) == 1 and statements[0].startswith("SELECT")

    statements.clear()
    assert (await api.get("/appointments", params={"limit": 100})).status_code == 200
    assert len(statements) == 1 and statements[0].startswith("SELECT")

    statements.clear()
    assert (await api.patch(f"/appointments/{appointment_id}", json={"notes": "x"})).status_code == 200
    assert len(statements) == 2 and statements[0].startswith("SELECT") and statements[1] == "UPDATE appointments SET"

    statements.clear()
    replanned = await api.patch(f"/appointments/{appointment_id}", json={"starts_at": _starts(4)})
    assert replanned.status_code == 200
    # PostgreSQL: the superseding rule locks the reminders' call attempts first (service.ledger.cancellation)
    lock = [] if database_url.startswith("sqlite") else ["SELECT call_attempts.id FROM"]
    assert statements[1:] == ["UPDATE appointments SET", *lock, "UPDATE reminders SET", "DELETE FROM reminders",
                              "SELECT EXISTS (SELECT", "INSERT INTO reminders"]

    statements.clear()  # DELETE: its events (the appointment's, its reminders' finished) in one INSERT
    assert (await api.delete(f"/appointments/{appointment_id}")).status_code == 200
    assert statements[1:] == ["UPDATE appointments SET", *lock, "UPDATE reminders SET", "INSERT INTO events"]


async def test_the_json_is_what_the_response_model_writes(api) -> None:
    """The routes write their JSON with orjson; byte for byte what pydantic writes for the model."""
    body = {"customer_name": "Zoë Ñandú", "phone": "+14155552671", "starts_at": _starts(3), "timezone": "Europe/Paris",
            "notes": "ünïcode ✓", "remind_at": [(datetime.now(UTC) + timedelta(days=1, microseconds=120000))
                                              .astimezone().isoformat()]}
    created = await api.post("/appointments", json=body)
    assert created.status_code == 201, created.text
    one, page = TypeAdapter(AppointmentOut), TypeAdapter(AppointmentList)
    path = f"/appointments/{created.json()['id']}"
    for response, model in ((created, one), (await api.get(path), one),
                            (await api.get("/appointments"), page),
                            (await api.patch(path, json={"starts_at": _starts(2)}), one),
                            (await api.delete(path), one)):
        assert response.status_code in (200, 201), response.text
        assert response.content == model.dump_json(model.validate_json(response.content))


# Makes every INSERT into reminders fail, as a broken disk or a constraint would.
_REFUSE_REMINDERS = {
    "sqlite": ["CREATE TRIGGER refuse_reminders BEFORE INSERT ON reminders BEGIN SELECT RAISE(ABORT, 'refused'); END"],
    "postgresql": [
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$",
        "CREATE TRIGGER refuse_reminders BEFORE INSERT ON reminders FOR EACH ROW EXECUTE FUNCTION refuse()",
    ],
}


async def test_a_create_whose_reminders_fail_stores_nothing(database_url: str) -> None:
    """The appointment and its reminders are one write: when the reminders cannot be stored, neither
    is the appointment (one statement on PostgreSQL, one transaction on SQLite)."""
    db = Database(database_url)
    try:
        await db.upgrade()
        async with db.engine.begin() as connection:
            for statement in _REFUSE_REMINDERS[db.engine.dialect.name]:
                await connection.execute(text(statement))
        planning = PlanningConfig(call_window=ALWAYS, offsets=(ReminderOffset.parse("1h"), ReminderOffset.parse("2h")),
                                  templates=MessageTemplates.parse(None))
        new = appointments.NewAppointment("Ada Lovelace", "+14155552671", datetime.now(UTC) + timedelta(days=3))
        with pytest.raises(DBAPIError, match="refused"):
            await appointments.create(db, new, planning)
        async with db.engine.connect() as connection:
            assert await connection.scalar(select(func.count()).select_from(Appointment)) == 0
    finally:
        await db.dispose()
