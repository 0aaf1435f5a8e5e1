"""The fence: the newest fencing token the database has accepted from a leader, in one row.

Every write of a leader term (a claim, an attempt, a release) holds only while the fence equals
the term's token: a deposed leader (an older token) writes nothing once its successor has raised
the fence. A raise never lowers it (`StaleTerm`). On PostgreSQL a claim reads the row FOR SHARE,
so a concurrent raise waits for the claim to commit and every later claim sees the new fence.
"""

from __future__ import annotations

import logging

from sqlalchemy import Select, exists, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from service.db import Database
from service.db.models import LeaderFence, utcnow

__all__ = ["FENCE_ROW", "LedgerError", "StaleTerm", "current_fence", "fence_holds", "raise_fence"]

log = logging.getLogger(__name__)

FENCE_ROW = 1
# A fence raise waits this long for the row lock before it ends the sessions holding it.
_FENCE_LOCK_WAIT_MS = 2000
_FENCE_ROUNDS = 3


class LedgerError(Exception):
    """The base of the ledger's errors."""


class StaleTerm(LedgerError, RuntimeError):
    """The database holds a newer fencing token than this term's: this replica is not the leader."""


def fence_holds(token: int | BindParameter[int]) -> ColumnElement[bool]:
    """A WHERE clause true while the fence is `token` (a value, or a bind parameter of a statement built once)."""
    return exists().where(LeaderFence.id == FENCE_ROW, LeaderFence.token == token)


def fence_token_query() -> Select[tuple[int]]:
    """SELECT of the fence's token (no row before the first raise); a new statement each call, for
    a caller to build on (FOR SHARE, a scalar subquery)."""
    return select(LeaderFence.token).where(LeaderFence.id == FENCE_ROW)


_FENCE_TOKEN = fence_token_query()


def _lock_not_available(error: DBAPIError) -> bool:
    """PostgreSQL's lock_not_available (55P03): lock_timeout passed."""
    cause = error.orig
    return getattr(cause, "sqlstate", None) == "55P03" or "55P03" in str(getattr(cause, "pgcode", "")) or (
        "lock timeout" in str(error).lower())


async def raise_fence(db: Database, token: int, holder: str) -> None:
    """Set the fence to `token`, unless the database already holds a newer one (StaleTerm)."""
    insert = postgresql.insert if not db.is_sqlite else sqlite.insert
    statement = (
        insert(LeaderFence)
        .values(id=FENCE_ROW, token=token, holder=holder, updated_at=utcnow())
        .on_conflict_do_update(
            index_elements=[LeaderFence.id],
            set_={"token": token, "holder": holder, "updated_at": utcnow()},
            where=LeaderFence.token <= token,
        )
        .returning(LeaderFence.token)
    )
    for round_ in range(_FENCE_ROUNDS):
        try:
            async with db.session() as session:
                if not db.is_sqlite:
                    await session.execute(text(f"SET LOCAL lock_timeout = '{_FENCE_LOCK_WAIT_MS}ms'"))
                accepted = (await session.execute(statement)).scalar_one_or_none()
                await session.commit()
            break
        except DBAPIError as error:
            if not _lock_not_available(error) or round_ == _FENCE_ROUNDS - 1:
                raise
        # Only a leader's claim holds the fence row (FOR SHARE); a predecessor frozen in the
        # middle of one (SIGSTOP, a stuck VM: not "idle in transaction", so no server timeout
        # ends it) would hold it for as long as the freeze lasts. Its term is over: end its
        # session, which releases the row, and raise again.
        await _end_fence_holders(db)
    if accepted is None:
        raise StaleTerm(f"the database holds a fencing token newer than {token}")


async def _end_fence_holders(db: Database) -> None:
    """Terminate the other sessions holding the fence row FOR SHARE (PostgreSQL)."""
    async with db.session() as session:
        ended = (await session.execute(text(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_locks "
            "WHERE relation = 'leader_fence'::regclass AND mode = 'RowShareLock' AND granted "
            "AND pid <> pg_backend_pid()"
        ))).all()
        await session.commit()
    log.warning("fence raise blocked: ended %d session(s) of a deposed leader holding the fence row", len(ended))


async def current_fence(db: Database) -> int | None:
    """The fence's token, None before any raise: one SELECT, on PostgreSQL outside a transaction
    (no BEGIN and ROLLBACK round trips; it locks nothing)."""
    return await db.read(lambda connection: connection.execute(_FENCE_TOKEN).scalar())
