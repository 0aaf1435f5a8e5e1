"""Engine and sessions; schema migration and version checks through Alembic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.util import greenlet_spawn

from service.database_url import connect_options
from service.db.clock import SQLITE_NOW, sqlite_now

__all__ = ["Database", "SchemaOutOfDate", "alembic_config"]

P = ParamSpec("P")
T = TypeVar("T")

# Seconds: how long a statement may wait (PostgreSQL statement_timeout, SQLite busy wait).
STATEMENT_TIMEOUT = 10.0
# Seconds a PostgreSQL session may sit idle inside a transaction before the server ends it. The
# service never waits on anything but the database inside a transaction, so only a frozen client
# (SIGSTOP, a stuck VM, a partition) gets there; without this bound a leader frozen in the middle of
# a claim keeps its lock on the fence row, and its successor's fence raise waits for as long as the
# freeze lasts: no failover at all (found by the chaos suite's leader-sigstop scenario).
IDLE_IN_TRANSACTION_TIMEOUT = 5.0


class SchemaOutOfDate(RuntimeError):
    """The database schema is not at the migrations' head."""


def _migrations_dir() -> Path:
    for candidate in (Path(__file__).resolve().parents[2] / "migrations", Path.cwd() / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("the migrations/ folder was not found next to the service package or in the cwd")


def alembic_config(url: str | None = None) -> Config:
    """Alembic config for `url`, independent of the current directory."""
    config = Config()
    config.set_main_option("script_location", str(_migrations_dir()))
    config.attributes["configure_logging"] = False
    if url:
        config.attributes["url"] = url
    return config


def _set_sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets several replicas (processes) share one file; busy_timeout waits instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={int(STATEMENT_TIMEOUT * 1000)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
    # db_now() on SQLite: this process's clock to the microsecond (strftime('now') has milliseconds)
    dbapi_connection.create_function(SQLITE_NOW, 1, sqlite_now)


# `read` and `write` run their work, a plain function over a SQLAlchemy Connection, in ONE greenlet:
# checkout, statements and checkin cost one hop between asyncio and SQLAlchemy instead of one per
# call (AsyncConnection's connect, execute and close each take one). The same mechanism as
# AsyncConnection.run_sync.
def _on_connection(engine: Engine, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with engine.connect() as connection:
        return work(connection, *args, **kwargs)


def _in_transaction(engine: Engine, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with engine.begin() as connection:
        return work(connection, *args, **kwargs)


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


# JSON columns (a reminder's wording, an appointment's remind_at) written and read by orjson: the
# stdlib's encoder was 2 % of a create's CPU.
_JSON = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


def _protocol_confused(error: BaseException | None) -> bool:
    """asyncpg's own bookkeeping of a connection is off (seen under load after a cancelled
    statement: every later statement on it fails with "cannot switch to state …; another operation
    is in progress"). The connection is still open, so SQLAlchemy would hand it out again."""
    import asyncpg.exceptions as pg  # only with PostgreSQL

    return isinstance(error, pg.InternalClientError) or (
        isinstance(error, pg.InterfaceError) and "another operation" in str(error))


def _discard_confused_connection(context: ExceptionContext) -> None:
    """Drop the one connection whose protocol state is confused (not the whole pool: the others
    are fine), so the pool opens a new one instead of failing every statement that gets it."""
    original = context.original_exception
    if _protocol_confused(original) or _protocol_confused(original.__cause__):
        context.is_disconnect = True
        context.invalidate_pool_on_disconnect = False


def _postgres_engine(url: str, *, pool_size: int, max_overflow: int, pre_ping: bool, **options: Any) -> AsyncEngine:
    url, tls = connect_options(url)
    engine = create_async_engine(
        url,
        **_JSON,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=STATEMENT_TIMEOUT,
        # The service runs without pre-ping: asyncpg's costs BEGIN, a query and ROLLBACK, three
        # round trips per checkout. A connection found dead fails its one statement, and
        # SQLAlchemy then invalidates the whole pool (docs/decisions/0161-api-at-database-speed.md).
        pool_pre_ping=pre_ping,
        connect_args={
            "timeout": STATEMENT_TIMEOUT,
            "command_timeout": STATEMENT_TIMEOUT,
            "server_settings": {
                "statement_timeout": str(int(STATEMENT_TIMEOUT * 1000)),
                "idle_in_transaction_session_timeout": str(int(IDLE_IN_TRANSACTION_TIMEOUT * 1000)),
            },
            **tls,
        },
        **options,
    )
    event.listen(engine.sync_engine, "handle_error", _discard_confused_connection)
    return engine


class Database:
    """The engine, a session factory, and schema checks for one DATABASE_URL."""

    def __init__(self, url: str, *, pool_size: int = 10, pre_ping: bool = False) -> None:
        """`pre_ping`: test tooling that restarts PostgreSQL under a pool it keeps and cannot retry."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine: AsyncEngine = create_async_engine(url, connect_args={"timeout": STATEMENT_TIMEOUT}, **_JSON)
            event.listen(self.engine.sync_engine, "connect", _set_sqlite_pragmas)
            self._autocommit = self.engine
        else:
            # Single statements (reads, and a create's one INSERT) get a pool of their own whose
            # connections stay in autocommit: switching a shared connection's isolation level at each
            # checkout and back at checkin cost about as much CPU as the statement itself. Together
            # the two pools keep the documented bound: at most 2 × pool_size connections per replica.
            read_pool = max(2, pool_size // 2)
            self.engine = _postgres_engine(url, pool_size=pool_size, max_overflow=max(0, pool_size - read_pool),
                                           pre_ping=pre_ping)
            # No reset at checkin: an autocommit connection never holds a transaction to roll back.
            self._autocommit = _postgres_engine(url, pool_size=read_pool, max_overflow=0, pre_ping=pre_ping,
                                                isolation_level="AUTOCOMMIT", pool_reset_on_return=None)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def sync_engines(self) -> tuple[Engine, ...]:
        """Every engine this database sends statements through (the transactions' and the
        autocommit pool's): where a statement listener goes."""
        return tuple({self.engine.sync_engine, self._autocommit.sync_engine})

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    async def read(self, work: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`work(connection, ...)` for a read that is ONE statement: on PostgreSQL it runs outside a
        transaction, which saves the BEGIN and ROLLBACK round trips (a single statement sees one
        snapshot anyway). Two statements in it may see two snapshots: use `write()` for those."""
        return await greenlet_spawn(_on_connection, self._autocommit.sync_engine, work, *args, **kwargs)

    async def write(self, work: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`work(connection, ...)` in one transaction: committed when it returns, rolled back if it raises."""
        return await greenlet_spawn(_in_transaction, self.engine.sync_engine, work, *args, **kwargs)

    async def write_one(self, work: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`work(connection, ...)` for a write that is ONE statement on PostgreSQL: a statement is
        atomic on its own, so it runs outside an explicit transaction (autocommit), which saves the
        BEGIN and COMMIT round trips. On SQLite it runs as `write()` does, in a transaction, so
        `work` may send more than one statement there."""
        if self.is_sqlite:
            return await self.write(work, *args, **kwargs)
        return await greenlet_spawn(_on_connection, self._autocommit.sync_engine, work, *args, **kwargs)

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def upgrade(self) -> None:
        """`alembic upgrade head` on this database."""
        config = alembic_config(self.url)

        def run(connection: Connection) -> None:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

        async with self.engine.begin() as connection:
            await connection.run_sync(run)

    async def downgrade(self, revision: str = "base") -> None:
        config = alembic_config(self.url)

        def run(connection: Connection) -> None:
            config.attributes["connection"] = connection
            command.downgrade(config, revision)

        async with self.engine.begin() as connection:
            await connection.run_sync(run)

    async def check_schema(self) -> None:
        """Raise SchemaOutOfDate unless the schema is at the migrations' head."""
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()

        def current(connection: Connection) -> str | None:
            return MigrationContext.configure(connection).get_current_revision()

        async with self.engine.connect() as connection:
            revision = await connection.run_sync(current)
        if revision != head:
            raise SchemaOutOfDate(
                f"database schema is at {revision or 'nothing'}, the service needs {head}: run `reminders migrate`"
            )

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._autocommit is not self.engine:
            await self._autocommit.dispose()
