"""Alembic migrations on SQLite and PostgreSQL; the schema check of `reminders serve`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import inspect

from service.db import Database, SchemaOutOfDate

pytestmark = pytest.mark.anyio

TABLES = {"appointments", "reminders", "leader_fence", "call_attempts", "alembic_version"}
REMINDER_CALL_COLUMNS = {"outcome", "answered_at", "bound_attempt_id", "bound_call_id"}


async def tables(db: Database) -> set[str]:
    async with db.engine.connect() as connection:
        return set(await connection.run_sync(lambda c: inspect(c).get_table_names()))


async def reminder_columns(db: Database) -> set[str]:
    async with db.engine.connect() as connection:
        return {c["name"] for c in await connection.run_sync(lambda c: inspect(c).get_columns("reminders"))}


async def test_call_attempts_migration_steps_down_and_up(database_url: str) -> None:
    db = Database(database_url)
    try:
        await db.upgrade()
        assert REMINDER_CALL_COLUMNS <= await reminder_columns(db)
        await db.downgrade("0001")
        assert "call_attempts" not in await tables(db)
        assert not REMINDER_CALL_COLUMNS & await reminder_columns(db)
        assert {"appointments", "reminders", "leader_fence"} <= await tables(db)
        await db.upgrade()
        await db.check_schema()
        assert REMINDER_CALL_COLUMNS <= await reminder_columns(db)
    finally:
        await db.dispose()


async def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    db = Database(database_url)
    try:
        with pytest.raises(SchemaOutOfDate, match="reminders migrate"):
            await db.check_schema()
        await db.upgrade()
        await db.check_schema()
        assert TABLES <= await tables(db)
        await db.downgrade("base")
        assert (await tables(db)) - {"alembic_version"} == set()
        await db.upgrade()
        await db.check_schema()
    finally:
        await db.dispose()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_refuses_an_out_of_date_postgres_schema(postgres_url: str) -> None:
    result = run_cli("serve", "--port", "0", env={"DATABASE_URL": postgres_url})
    assert result.returncode == 1
    assert "reminders migrate" in result.stderr
    migrated = run_cli("migrate", env={"DATABASE_URL": postgres_url})
    assert migrated.returncode == 0, migrated.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LEASE_TTL", "abc"), ("LEASE_TTL", "1"), ("CALL_WINDOW", "21:00-08:00"), ("REMINDER_OFFSETS", "soon"),
     ("MISFIRE_GRACE", "-3"), ("DATABASE_URL", "mysql://x"), ("ETCD_ENDPOINTS", "no port"),
     ("DISPATCH_CONCURRENCY", "0"), ("CALLS_PER_SECOND", "-1"), ("LOG_FORMAT", "xml"), ("TELEPHONY_URL", "ftp://x"),
     ("TELEPHONY_PROVIDER", "twilio"), ("TELEPHONY_PROVIDER", "vonage"), ("PUBLIC_URL", "reminders.example.com"),
     ("RECONCILE_GRACE", "-5"), ("TWILIO_API_URL", "api.twilio.com"), ("NO_ANSWER_RETRIES", "-1"),
     ("NO_ANSWER_RETRY_DELAY", "0"), ("DEFAULT_LANGUAGE", "klingon!"), ("DEFAULT_LANGUAGE", "de-DE"),
     ("MESSAGE_TEMPLATES", '{"en-US": "Hi {nam}"}'), ("MESSAGE_TEMPLATES", "/no/such/templates.json")],
)
def test_bad_settings_stop_with_one_line(variable: str, value: str) -> None:
    result = run_cli("serve", env={variable: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr


OUTCOME_COLUMNS = {"appointments": {"language", "confirmation"}, "reminders": {"wording", "no_answer_retries"}}


async def columns(db: Database, table: str) -> set[str]:
    async with db.engine.connect() as connection:
        return {c["name"] for c in await connection.run_sync(lambda c: inspect(c).get_columns(table))}


async def test_outcomes_migration_keeps_rows_and_steps_down_and_up(database_url: str) -> None:
    from sqlalchemy import text

    db = Database(database_url)
    try:
        await db.upgrade()
        await db.downgrade("0002")
        for table, names in OUTCOME_COLUMNS.items():
            assert not names & await columns(db, table)
        async with db.engine.begin() as connection:  # a row written before the revision
            await connection.execute(text(
                "INSERT INTO appointments (id, customer_name, phone, starts_at, timezone, status, created_at, "
                "updated_at) VALUES ('a1', 'Ann', '+14155552671', '2030-01-01 09:00:00', 'UTC', 'scheduled', "
                "'2029-12-01 09:00:00', '2029-12-01 09:00:00')"))
            await connection.execute(text(
                "INSERT INTO reminders (id, appointment_id, due_at, status, attempts, next_attempt_at, "
                "idempotency_key, created_at, updated_at) VALUES ('r1', 'a1', '2029-12-31 09:00:00', 'pending', 0, "
                "'2029-12-31 09:00:00', 'reminder-r1', '2029-12-01 09:00:00', '2029-12-01 09:00:00')"))
        await db.upgrade()
        await db.check_schema()
        for table, names in OUTCOME_COLUMNS.items():
            assert names <= await columns(db, table)
        async with db.engine.connect() as connection:
            appointment = (await connection.execute(text("SELECT language, confirmation FROM appointments"))).one()
            reminder = (await connection.execute(text("SELECT wording, no_answer_retries FROM reminders"))).one()
        assert tuple(appointment) == ("en-US", None) and tuple(reminder) == (None, 0)
        await db.downgrade("0002")
        for table, names in OUTCOME_COLUMNS.items():
            assert not names & await columns(db, table)
        await db.upgrade()
        await db.check_schema()
    finally:
        await db.dispose()


async def test_consent_migration_hashes_every_stored_number_with_the_key_it_made(database_url: str) -> None:
    from sqlalchemy import text

    from service.ledger.consent import phone_hasher

    db = Database(database_url)
    try:
        await db.upgrade()
        await db.downgrade("0004_call_protocol")
        async with db.engine.begin() as connection:  # rows written before the revision
            for index, phone in enumerate(("+14155552671", "+4930901820")):
                await connection.execute(text(
                    "INSERT INTO appointments (id, customer_name, phone, starts_at, timezone, status, created_at, "
                    f"updated_at) VALUES ('a{index}', 'Ann', '{phone}', '2030-01-01 09:00:00', 'UTC', 'scheduled', "
                    "'2029-12-01 09:00:00', '2029-12-01 09:00:00')"))
        await db.upgrade()
        await db.check_schema()
        hasher = await phone_hasher(db)
        async with db.engine.connect() as connection:
            rows = (await connection.execute(text("SELECT phone, phone_hash FROM appointments"))).all()
        assert len(rows) == 2 and all(phone_hash == hasher(phone) for phone, phone_hash in rows)
        assert len({phone_hash for _, phone_hash in rows}) == 2 and all(len(h) == 64 for _, h in rows)
        await db.downgrade("0004_call_protocol")
        assert "phone_hash" not in await columns(db, "appointments")
        await db.upgrade()
    finally:
        await db.dispose()


async def test_versions_migration_starts_stored_appointments_at_1(database_url: str) -> None:
    """0007 (ETags): appointments written before it are at version 1, as a new one is; every UPDATE
    of the row raises it (the column's onupdate); it steps down and up."""
    from sqlalchemy import text, update

    from service.db import Appointment

    db = Database(database_url)
    try:
        await db.upgrade()
        await db.downgrade("0006_erasure")
        assert "version" not in await columns(db, "appointments")
        async with db.engine.begin() as connection:  # a row written before the revision
            await connection.execute(text(
                "INSERT INTO appointments (id, customer_name, phone, starts_at, timezone, status, created_at, "
                "updated_at) VALUES ('a1', 'Ann', '+14155552671', '2030-01-01 09:00:00', 'UTC', 'scheduled', "
                "'2029-12-01 09:00:00', '2029-12-01 09:00:00')"))
        await db.upgrade()
        await db.check_schema()
        async with db.engine.begin() as connection:
            assert await connection.scalar(text("SELECT version FROM appointments")) == 1
            await connection.execute(update(Appointment).where(Appointment.id == "a1").values(notes="x"))
            assert await connection.scalar(text("SELECT version FROM appointments")) == 2
        await db.downgrade("0006_erasure")
        assert "version" not in await columns(db, "appointments")
        await db.upgrade()
        await db.check_schema()
    finally:
        await db.dispose()


async def test_events_migration_steps_down_and_up_and_matches_the_models(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import text

    from service.db.models import Base

    db = Database(database_url)
    try:
        await db.upgrade()
        async with db.engine.connect() as connection:
            feed = (await connection.execute(text("SELECT id, last_position, pruned_through FROM event_feed"))).all()
            diffs = await connection.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata))
        assert [tuple(row) for row in feed] == [(1, 0, 0)]  # the feed's one row
        assert [d for d in diffs if "event" in repr(d)] == []  # the tables the models describe
        await db.downgrade("0007_versions")
        assert not {"events", "event_feed"} & await tables(db)
        await db.upgrade()
        await db.check_schema()
        assert {"events", "event_feed"} <= await tables(db)
    finally:
        await db.dispose()
