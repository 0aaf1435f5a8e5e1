"""The dispatcher's SQL: raise the fence, claim due reminders under it, record outcomes.

The fence is the newest fencing token the database has accepted. A claim succeeds only while
the fence equals the claimer's token, so a deposed leader (an older token) claims nothing once
its successor has raised the fence. On PostgreSQL the claim reads the fence `FOR SHARE`, so a
concurrent raise waits for the claim to commit and every later claim sees the new fence.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

from sqlalchemy import String, and_, any_, bindparam, case, exists, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.sql.dml import Update

from service.db import Database
from service.db.models import Appointment, LeaderFence, Reminder, utcnow
from service.reminders import ReminderStatus, require, sources_of

__all__ = ["Claim", "ReminderStore", "StaleTerm", "is_data_error"]

log = logging.getLogger(__name__)

FENCE_ROW = 1
# A fence raise waits this long for the row lock before it ends the sessions holding it.
_FENCE_LOCK_WAIT_MS = 2000
_FENCE_ROUNDS = 3


def _lock_not_available(error: DBAPIError) -> bool:
    """PostgreSQL's lock_not_available (55P03): lock_timeout passed."""
    cause = error.orig
    return getattr(cause, "sqlstate", None) == "55P03" or "55P03" in str(getattr(cause, "pgcode", "")) or (
        "lock timeout" in str(error).lower())


def is_data_error(error: BaseException) -> bool:
    """True when the database refused the VALUES (too long, a NUL, out of range), not the connection.

    SQLAlchemy's asyncpg adapter raises these as plain DBAPIError: SQLSTATE class 22 tells them apart.
    """
    if isinstance(error, DataError):
        return True
    if isinstance(error, DBAPIError):
        code = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
        return isinstance(code, str) and code.startswith("22")
    return False


class StaleTerm(RuntimeError):
    """The database holds a newer fencing token than this term's: this replica is not the leader."""


@dataclass(frozen=True)
class Claim:
    """A reminder claimed for a call, with what the call needs."""

    reminder_id: str
    appointment_id: str
    idempotency_key: str
    due_at: datetime
    scheduled_at: datetime
    attempts: int
    orphaned: bool
    phone: str
    customer_name: str
    starts_at: datetime
    timezone: str
    appointment_cancelled: bool
    wording: Mapping[str, str] | None = None  # the words fixed when the reminder was planned


_REMINDERS = Reminder.__table__


@lru_cache(maxsize=64)
def _update_by_id(columns: tuple[str, ...]) -> Update:
    """UPDATE of `columns` (+ updated_at) for one reminder by id, all values bound: run as executemany.

    The same statement object for a given set of columns, so SQLAlchemy compiles it once and
    asyncpg prepares it once per connection, whatever the batch size.
    """
    names = (*columns, "updated_at") if "updated_at" not in columns else columns
    return (
        update(_REMINDERS)
        .where(
            _REMINDERS.c.id == bindparam("b_id"),
            _REMINDERS.c.fence_token == bindparam("b_token"),
            _REMINDERS.c.status == ReminderStatus.DISPATCHING,
        )
        .values({name: bindparam(f"b_{name}") for name in names})
    )


def _claim_of(row: Row) -> Claim:
    """The Claim for a row read before the claiming UPDATE (its status is the one it had)."""
    was_orphan = row.status == ReminderStatus.DISPATCHING
    return Claim(
        reminder_id=row.id,
        appointment_id=row.appointment_id,
        idempotency_key=row.idempotency_key,
        due_at=row.due_at,
        scheduled_at=(row.claimed_at or row.next_attempt_at) if was_orphan else row.next_attempt_at,
        attempts=row.attempts,
        orphaned=was_orphan,
        phone=row.phone,
        customer_name=row.customer_name,
        starts_at=row.starts_at,
        timezone=row.timezone,
        appointment_cancelled=row.appointment_status != "scheduled",
        wording=row.wording,
    )


class ReminderStore:
    """Fenced reads and writes of reminders for one leader term's token."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def raise_fence(self, token: int, holder: str) -> None:
        """Set the fence to `token`, unless the database already holds a newer one (StaleTerm)."""
        insert = postgresql.insert if not self.db.is_sqlite else sqlite.insert
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
                async with self.db.session() as session:
                    if not self.db.is_sqlite:
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
            await self._end_fence_holders()
        if accepted is None:
            raise StaleTerm(f"the database holds a fencing token newer than {token}")

    async def _end_fence_holders(self) -> None:
        """Terminate the other sessions holding the fence row FOR SHARE (PostgreSQL)."""
        async with self.db.session() as session:
            ended = (await session.execute(text(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_locks "
                "WHERE relation = 'leader_fence'::regclass AND mode = 'RowShareLock' AND granted "
                "AND pid <> pg_backend_pid()"
            ))).all()
            await session.commit()
        log.warning("fence raise blocked: ended %d session(s) of a deposed leader holding the fence row", len(ended))

    async def current_fence(self) -> int | None:
        async with self.db.session() as session:
            return (await session.execute(select(LeaderFence.token).where(LeaderFence.id == FENCE_ROW))).scalar()

    async def claim(self, token: int, holder: str, *, limit: int, now: datetime, stale_after: timedelta) -> list[Claim]:
        """Mark up to `limit` reminders `dispatching` under `token`; StaleTerm if the fence moved on.

        Claimed first: reminders left `dispatching` by an older term (its calls may be in flight:
        they are completed with the same key), and this term's own claims older than
        `stale_after` (whose outcome was never recorded). Then pending reminders that are due.
        """
        orphaned = and_(
            Reminder.status == ReminderStatus.DISPATCHING,
            or_(
                Reminder.fence_token < token,
                Reminder.fence_token.is_(None),
                and_(Reminder.fence_token == token, Reminder.claimed_at < now - stale_after),
            ),
        )
        due = and_(Reminder.status.in_(sorted(sources_of(ReminderStatus.DISPATCHING))), Reminder.next_attempt_at <= now)
        candidates = (
            select(Reminder.id)
            .where(or_(orphaned, due))
            .order_by(case((Reminder.status == ReminderStatus.DISPATCHING, 0), else_=1), Reminder.next_attempt_at)
            .limit(limit)
        )
        if not self.db.is_sqlite:
            candidates = candidates.with_for_update(skip_locked=True)
        fence_holds = exists().where(LeaderFence.id == FENCE_ROW, LeaderFence.token == token)
        async with self.db.session() as session:
            if not self.db.is_sqlite:
                fence = await session.execute(
                    select(LeaderFence.token).where(LeaderFence.id == FENCE_ROW).with_for_update(read=True)
                )
                if fence.scalar() != token:
                    raise StaleTerm(f"the fence moved past token {token}")
            # What each call needs, and which rows were orphans and when they were meant to run,
            # read before the UPDATE (on PostgreSQL the candidates are locked FOR UPDATE by now).
            before = (
                await session.execute(
                    select(
                        Reminder.id,
                        Reminder.status,
                        Reminder.claimed_at,
                        Reminder.next_attempt_at,
                        Reminder.appointment_id,
                        Reminder.idempotency_key,
                        Reminder.due_at,
                        Reminder.attempts,
                        Reminder.wording,
                        Appointment.phone,
                        Appointment.customer_name,
                        Appointment.starts_at,
                        Appointment.timezone,
                        Appointment.status.label("appointment_status"),
                    )
                    .join(Appointment, Appointment.id == Reminder.appointment_id)
                    .where(
                        Reminder.id.in_(candidates.scalar_subquery() if self.db.is_sqlite else candidates.subquery().select())
                    )
                )
            ).all()
            if not before:
                await session.rollback()
                if not await self._fence_is(session, token):
                    raise StaleTerm(f"the fence moved past token {token}")
                return []
            ids = [row.id for row in before]
            result = await session.execute(
                update(Reminder)
                .where(
                    Reminder.id.in_(ids) if self.db.is_sqlite
                    else Reminder.id == any_(bindparam("claim_ids", ids, type_=postgresql.ARRAY(String))),
                    fence_holds,
                    or_(orphaned, due),
                )
                .values(status=ReminderStatus.DISPATCHING, fence_token=token, claimed_by=holder, claimed_at=now)
                .returning(Reminder.id)
                .execution_options(synchronize_session=False)
            )
            claimed = {row.id for row in result}
            if not claimed:
                await session.rollback()
                if not await self._fence_is(session, token):
                    raise StaleTerm(f"the fence moved past token {token}")
                return []
            claims = [_claim_of(old) for old in before if old.id in claimed]
            await session.commit()
        claims.sort(key=lambda c: (not c.orphaned, c.scheduled_at))
        return claims

    async def _fence_is(self, session, token: int) -> bool:  # noqa: ANN001
        fence = (await session.execute(select(LeaderFence.token).where(LeaderFence.id == FENCE_ROW))).scalar()
        return fence == token

    async def finish_many(self, token: int, outcomes: Sequence[tuple[str, Mapping[str, object]]]) -> set[str]:
        """Record several outcomes (reminder id, column values) of this term in ONE transaction.

        Returns the ids recorded; a reminder that is no longer `dispatching` under `token` (another
        term took it over) is left alone: its outcome is the newer term's. Ids must be distinct.
        On PostgreSQL: one `SELECT … FOR UPDATE` of the rows still ours (so nothing can take them
        over before the commit), then one executemany UPDATE per set of columns, then COMMIT.
        """
        if not outcomes:
            return set()
        for _, values in outcomes:  # each outcome ends this term's claim: dispatching → its status
            require(ReminderStatus.DISPATCHING, values.get("status"))  # type: ignore[arg-type]
        ids = [reminder_id for reminder_id, _ in outcomes]
        if len(set(ids)) != len(ids):
            raise ValueError("finish_many: reminder ids must be distinct")
        now = utcnow()
        recorded: set[str] = set()
        async with self.db.session() as session:
            if self.db.is_sqlite:
                for reminder_id, values in outcomes:
                    result = await session.execute(
                        _update_by_id(tuple(sorted(values))),
                        {"b_id": reminder_id, "b_token": token, "b_updated_at": now,
                         **{f"b_{name}": value for name, value in values.items()}},
                    )
                    if result.rowcount == 1:
                        recorded.add(reminder_id)
            else:
                ours = await session.execute(
                    select(_REMINDERS.c.id)
                    .where(
                        _REMINDERS.c.id == any_(bindparam("ids", ids, type_=postgresql.ARRAY(String))),
                        _REMINDERS.c.fence_token == token,
                        _REMINDERS.c.status == ReminderStatus.DISPATCHING,
                    )
                    .with_for_update()
                )
                recorded = {row.id for row in ours}
                shapes: dict[tuple[str, ...], list[dict[str, object]]] = {}
                for reminder_id, values in outcomes:
                    if reminder_id in recorded:
                        shapes.setdefault(tuple(sorted(values)), []).append(
                            {"b_id": reminder_id, "b_token": token, "b_updated_at": now,
                             **{f"b_{name}": value for name, value in values.items()}}
                        )
                for columns, rows in shapes.items():
                    await session.execute(_update_by_id(columns), rows)
            await session.commit()
        return recorded
