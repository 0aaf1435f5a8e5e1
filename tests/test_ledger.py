"""The ledger is the only writer of reminders and call attempts: read from the source of every
module of service/ (Core, ORM, raw SQL), and watched at run time (tests/conftest.py)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from sqlalchemy import update

from service.db import Database, Reminder
from tests.support.ledger_guard import GUARD, static_writes

SERVICE = Path(__file__).resolve().parents[1] / "service"
LEDGER = SERVICE / "ledger"


def _modules(under: Path) -> list[Path]:
    return sorted(path for path in under.rglob("*.py") if "__pycache__" not in path.parts)


def test_no_module_outside_the_ledger_writes_reminders_or_call_attempts() -> None:
    found = [hit for path in _modules(SERVICE) if LEDGER not in path.parents
             for hit in static_writes(path.read_text(), str(path.relative_to(SERVICE.parent)))]
    assert found == []


def test_the_check_sees_the_ledgers_own_writes() -> None:
    found = [hit for path in _modules(LEDGER) for hit in static_writes(path.read_text(), path.name)]
    files = {hit.split(":")[0] for hit in found}
    assert {"calls.py", "claims.py", "attempts.py", "sweep.py", "plans.py", "cancellation.py"} <= files


@pytest.mark.parametrize("source", [
    "update(Reminder).values(status='sent')",
    "insert(CallAttempt).values(id='x')",
    "from sqlalchemy.dialects import postgresql\npostgresql.insert(Reminder.__table__)",
    "_A, _R = Appointment.__table__, Reminder.__table__\nconnection.execute(update(_R))",
    "_T = Reminder.__table__\n_ALIAS = _T\nstatement = delete(_ALIAS)",
    "_R = Reminder.__table__\n_R.update().values(x=1)",
    "table = metadata.tables['reminders']\nsa.delete(table)",
    "session.execute(text('UPDATE reminders SET status = :s'))",
    "session.execute(text(f'delete from \"call_attempts\" where id = {x}'))",
    "conn.exec_driver_sql('INSERT INTO reminders (id) VALUES (1)')",
    "session.add(Reminder(id='x'))",
    "row = await session.get(CallAttempt, attempt_id)\nrow.state = 'created'",
    "rows = (await session.execute(select(Reminder))).scalars()",
    "text('UPDATE appointments SET confirmation = NULL')",
])
def test_every_form_of_a_write_is_found(source: str) -> None:
    assert static_writes(source), source


@pytest.mark.parametrize("source", [
    "select(Reminder.id, Reminder.status).where(Reminder.due_at < now)",
    "view.update(values)",
    "update(Appointment).values(notes='x')",
    "'SELECT id FROM reminders'",
    "counts.update({'reminders': 3})",
])
def test_reads_and_other_tables_are_not_writes(source: str) -> None:
    assert static_writes(source) == [], source


@pytest.mark.anyio
async def test_a_write_from_outside_the_ledger_is_caught_at_run_time(tmp_path: Path) -> None:
    guard = GUARD  # installed for every test by tests/conftest.py
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'guard.db'}")
    await database.upgrade()
    # code of service/ that is not the ledger, and of the ledger (by their files: no file is written)
    rogue = types.ModuleType("service.rogue")
    exec(compile("async def write(db, statement):\n    async with db.session() as session:\n"
                 "        await session.execute(statement)\n        await session.commit()\n",
                 str(SERVICE / "rogue.py"), "exec"), rogue.__dict__)
    ledgerish = types.ModuleType("service.ledger.probe")
    exec(compile("def write(connection, statement):\n    connection.execute(statement)\n",
                 str(LEDGER / "probe.py"), "exec"), ledgerish.__dict__)
    statement = update(Reminder).where(Reminder.id == "none").values(last_error="x")
    try:
        await database.write(ledgerish.write, statement)
        assert guard.violations == []
        await rogue.write(database, statement)
        assert guard.violations and guard.violations[0].startswith("service.rogue: UPDATE reminders")
    finally:
        guard.violations.clear()
        await database.dispose()
