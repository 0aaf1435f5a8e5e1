"""The database's clock: the one clock every replica's times are compared on.

Replicas' clocks drift apart (and a test skews them on purpose): a time one replica writes and
another compares with its own `now` is off by their difference. The ledger writes the times it
compares later (`last_event_at`, `claimed_at`, retry times) from `db_now()`, compares them with
`db_now(±offset)` in SQL, and reads `read_now()` where a rule computes a time in Python.
PostgreSQL: the server's `now()` (the transaction's start). SQLite: the clock of the process that
runs the statement (one machine's file; `sqlite_now`, registered on every connection).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, TypeDecorator, literal, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

__all__ = ["SQLITE_NOW", "UTCDateTime", "db_now", "read_now", "sqlite_now", "utcnow"]


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores naive UTC text that sorts correctly)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:  # type: ignore[override]
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:  # type: ignore[override]
        if value is None or value.tzinfo is UTC:  # asyncpg's timestamptz: already UTC
            return value
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class db_now(FunctionElement[datetime]):
    """The database's current time, `offset` later (earlier when negative)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        self.offset_seconds = offset.total_seconds()
        super().__init__(literal(self.offset_seconds))


@compiles(db_now, "postgresql")
def _postgresql(element: db_now, compiler: Any, **kw: Any) -> str:
    (seconds,) = element.clauses
    return f"(now() + {compiler.process(seconds, **kw)} * interval '1 second')"


# SQLite's `now` has milliseconds: the engine registers this function on every connection instead.
SQLITE_NOW = "reminders_db_now"


def sqlite_now(offset_seconds: float) -> str:
    """The database's time on SQLite, `offset_seconds` later, as SQLAlchemy stores datetimes there
    ('YYYY-MM-DD HH:MM:SS.ffffff', UTC)."""
    return (datetime.now(UTC) + timedelta(seconds=offset_seconds)).strftime("%Y-%m-%d %H:%M:%S.%f")


@compiles(db_now, "sqlite")
def _sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    (seconds,) = element.clauses
    return f"{SQLITE_NOW}({compiler.process(seconds, **kw)})"


async def read_now(connection: Any) -> datetime:
    """The database's current time (a session or connection, in its transaction)."""
    return (await connection.execute(select(db_now()))).scalar_one()
