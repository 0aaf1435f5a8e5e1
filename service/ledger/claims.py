"""The leader's claims: due reminders marked `dispatching` under the fence, and their outcomes.

A claim succeeds only while the fence equals the claimer's token (service.ledger.fence). An
outcome is written only while the reminder is still `dispatching` under that token; one that
matches nothing says why (another term took it over, or it is no longer `dispatching`).

A claim also says what holds each reminder back, read in its transaction: its number is on the
do-not-call list, its appointment is confirmed, or a cap per number (`caps`: the calls that count
are gathered here, the rule is service.reminders.caps) — the dispatcher records it as the
reminder's outcome.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    Boolean,
    String,
    and_,
    any_,
    bindparam,
    case,
    exists,
    literal,
    null,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.sql.dml import Update

from service.db import Database
from service.db.clock import db_now, read_now
from service.db.models import Appointment, AttemptState, CallAttempt, Confirmation, Reminder, utcnow
from service.ledger.consent import APPOINTMENT_LISTED
from service.ledger.events import EventSource, reminders_finished
from service.ledger.fence import StaleTerm, current_fence, fence_holds, fence_token_query, raise_fence
from service.ledger.outcome import Outcome
from service.reminders import ALWAYS, CallCaps, CallWindow, CapHold, ReminderStatus, cap_hold, require
from service.reminders.outcomes import FINAL_CALL_STATES
from service.sql import none_of

__all__ = ["Claim", "ReminderStore", "StaleTerm", "is_data_error"]


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
    phone_hash: str | None = None
    opted_out: bool = False  # the number is on the do-not-call list
    confirmed: bool = False  # the customer confirmed the appointment
    cap: CapHold | None = None  # a cap per number holds it back (`caps` given to the claim)
    claimed_at: datetime | None = None  # the claim's time, on the database's clock


_REMINDERS = Reminder.__table__
# A claim's first statement on PostgreSQL: the fence FOR SHARE, with the database's clock unless given.
_FENCE_SHARED = fence_token_query().with_for_update(read=True)
_FENCE_SHARED_NOW = fence_token_query().add_columns(db_now().label("now")).with_for_update(read=True)
# What a claimed reminder's call needs, and what holds it back.
_CLAIM_COLUMNS = (
    Reminder.id, Reminder.status, Reminder.claimed_at, Reminder.next_attempt_at, Reminder.appointment_id,
    Reminder.idempotency_key, Reminder.due_at, Reminder.attempts, Reminder.wording, Appointment.phone,
    Appointment.phone_hash, Appointment.confirmation, APPOINTMENT_LISTED.label("opted_out"), Appointment.customer_name,
    Appointment.starts_at, Appointment.timezone, Appointment.status.label("appointment_status"),
)


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


def _claim_of(row: Row, cap: CapHold | None, now: datetime) -> Claim:
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
        phone_hash=row.phone_hash,
        opted_out=bool(row.opted_out),
        confirmed=row.confirmation == Confirmation.CONFIRMED,
        cap=cap,
        claimed_at=now,
    )


# The calls to a number that count against its caps (service.reminders.caps), by kind:
# `call` — an attempt of a real provider that rang (or more), or whose fate is not known yet (in
# doubt, queued, ringing); a generic provider's `sent` reminder (it has no attempts). `flight` — a
# reminder being called right now with no attempt yet (claimed, its create on its way).
_CALL, _FLIGHT = "call", "flight"


def _counted_calls(hashes: list[str], since: datetime) -> Any:
    attempts = (
        select(Appointment.phone_hash, CallAttempt.reminder_id, CallAttempt.created_at.label("at"),
               CallAttempt.rang_at.is_not(None).label("rang"), literal(_CALL).label("kind"))
        .join(Reminder, Reminder.id == CallAttempt.reminder_id)
        .join(Appointment, Appointment.id == Reminder.appointment_id)
        .where(Appointment.phone_hash.in_(hashes), CallAttempt.created_at >= since,
               CallAttempt.state != AttemptState.INCOMING,  # the customer's own call-back: not ours
               or_(CallAttempt.rang_at.is_not(None),
                   and_(CallAttempt.state != AttemptState.NOT_CREATED,
                        or_(CallAttempt.call_status.is_(None), none_of(CallAttempt.call_status, FINAL_CALL_STATES)))))
    )
    no_attempt = ~exists().where(CallAttempt.reminder_id == Reminder.id)
    sent = (
        select(Appointment.phone_hash, Reminder.id, Reminder.sent_at, literal(True, Boolean), literal(_CALL))
        .join(Appointment, Appointment.id == Reminder.appointment_id)
        .where(Appointment.phone_hash.in_(hashes), Reminder.status == ReminderStatus.SENT,
               Reminder.sent_at >= since, no_attempt)
    )
    flight = (
        select(Appointment.phone_hash, Reminder.id, null(), literal(False, Boolean), literal(_FLIGHT))
        .join(Appointment, Appointment.id == Reminder.appointment_id)
        .where(Appointment.phone_hash.in_(hashes), Reminder.status == ReminderStatus.DISPATCHING, no_attempt)
    )
    return union_all(attempts, sent, flight)


async def _cap_holds(session: Any, rows: Sequence[Row], caps: CallCaps, window: CallWindow,
                     now: datetime, *, orphans: bool = False) -> dict[str, CapHold]:
    """The candidates a cap holds back, in claim order: each one admitted counts as a call being
    placed now for those after it; a reminder's own attempts count against it only once they rang
    (never its own reconciliation). An orphan (its call may be in flight) is held only with
    `orphans` — a provider without idempotency, whose dispatcher reconciles an orphan's attempts
    first and asks the hold only before a new call; with an idempotency key the orphan's create is
    completed as it is, never held."""
    hashes = sorted({row.phone_hash for row in rows if row.phone_hash is not None})
    if not caps.active or not hashes:
        return {}
    known: dict[str, list[Row]] = {}
    for call in await session.execute(_counted_calls(hashes, now - caps.lookback)):
        known.setdefault(call.phone_hash, []).append(call)
    # this claim's own fresh rows are `dispatching` by now: they count as they are admitted below
    fresh = {row.id for row in rows if row.status != ReminderStatus.DISPATCHING}
    placing: dict[str, set[str]] = {}
    holds: dict[str, CapHold] = {}
    for row in rows:
        if row.phone_hash is None or (row.status == ReminderStatus.DISPATCHING and not orphans):
            continue
        if row.opted_out or row.appointment_status != "scheduled":
            continue  # it calls nobody
        calls = known.get(row.phone_hash, [])
        placed = [call.at for call in calls if call.kind == _CALL and (call.reminder_id != row.id or call.rang)]
        in_flight = ({call.reminder_id for call in calls if call.kind == _FLIGHT and call.reminder_id not in fresh}
                     | placing.get(row.phone_hash, set())) - {row.id}
        hold = cap_hold(caps, calls=placed, in_flight=len(in_flight), now=now, starts_at=row.starts_at,
                        zone=ZoneInfo(row.timezone), window=window)
        if hold is None:
            placing.setdefault(row.phone_hash, set()).add(row.id)
        else:
            holds[row.id] = hold
    return holds


class ReminderStore:
    """Fenced reads and writes of reminders for one leader term's token."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # the database's clock minus this process's, as the last claim measured it
        self.clock_offset = timedelta(0)

    async def raise_fence(self, token: int, holder: str) -> None:
        """Set the fence to `token`, unless the database already holds a newer one (StaleTerm)."""
        await raise_fence(self.db, token, holder)

    async def current_fence(self) -> int | None:
        return await current_fence(self.db)

    async def claim(self, token: int, holder: str, *, limit: int, stale_after: timedelta,
                    now: datetime | None = None, caps: CallCaps | None = None,
                    window: CallWindow = ALWAYS, hold_orphans: bool = False) -> list[Claim]:
        """Mark up to `limit` reminders `dispatching` under `token`; StaleTerm if the fence moved on.

        Claimed first: reminders left `dispatching` by an older term (its calls may be in flight:
        they are completed with the same key), and this term's own claims older than
        `stale_after` (whose outcome was never recorded). Then pending reminders that are due.
        `now` is the database's time unless given (tests); `clock_offset` keeps its distance to
        this process's clock for the term's other times. `caps`: the caps per number, whose next
        allowed time is fitted into the call `window`; `hold_orphans`: an orphan may be held too
        (a provider without idempotency: `_cap_holds`).
        """
        require(ReminderStatus.PENDING, ReminderStatus.DISPATCHING)
        async with self.db.session() as session:
            # this process's clock read BEFORE the database's: the offset errs on the late side, so
            # a time the term computes (a retry after Retry-After) is never early
            asked = datetime.now(UTC)
            if not self.db.is_sqlite:
                # The fence FOR SHARE first (a raise waits for this claim's end, and every later
                # claim sees the new fence), with the database's clock in the same statement: now()
                # is the transaction's start whichever statement reads it.
                fence = (await session.execute(_FENCE_SHARED if now is not None else _FENCE_SHARED_NOW)).first()
                if fence is None or fence.token != token:
                    raise StaleTerm(f"the fence moved past token {token}")
                if now is None:
                    now = fence.now
                    self.clock_offset = now - asked
            elif now is None:
                now = await read_now(session)
                self.clock_offset = now - asked
            orphaned = and_(
                Reminder.status == ReminderStatus.DISPATCHING,
                or_(
                    Reminder.fence_token < token,
                    Reminder.fence_token.is_(None),
                    and_(Reminder.fence_token == token, Reminder.claimed_at < now - stale_after),
                ),
            )
            due = and_(Reminder.status == ReminderStatus.PENDING, Reminder.next_attempt_at <= now)
            candidates = (
                select(Reminder.id)
                .where(or_(orphaned, due))
                .order_by(case((Reminder.status == ReminderStatus.DISPATCHING, 0), else_=1), Reminder.next_attempt_at)
                .limit(limit)
            )
            if not self.db.is_sqlite:
                candidates = candidates.with_for_update(skip_locked=True)
            # What each call needs, and which rows were orphans and when they were meant to run,
            # read before the UPDATE (on PostgreSQL the candidates are locked FOR UPDATE by now).
            before = (await session.execute(
                select(*_CLAIM_COLUMNS).join(Appointment, Appointment.id == Reminder.appointment_id)
                .where(Reminder.id.in_(candidates.scalar_subquery() if self.db.is_sqlite
                                       else candidates.subquery().select()))
            )).all()
            if not before:
                await session.rollback()
                await self._fence_still(session, token)
                return []
            ids = [row.id for row in before]
            result = await session.execute(
                update(Reminder)
                .where(
                    Reminder.id.in_(ids) if self.db.is_sqlite
                    else Reminder.id == any_(bindparam("claim_ids", ids, type_=postgresql.ARRAY(String))),
                    fence_holds(token),
                    or_(orphaned, due),
                )
                .values(status=ReminderStatus.DISPATCHING, fence_token=token, claimed_by=holder, claimed_at=now)
                .returning(Reminder.id)
                .execution_options(synchronize_session=False)
            )
            claimed = {row.id for row in result}
            if not claimed:
                await session.rollback()
                await self._fence_still(session, token)
                return []
            claimed_rows = sorted((old for old in before if old.id in claimed),
                                  key=lambda r: (r.status != ReminderStatus.DISPATCHING, r.next_attempt_at))
            holds = (await _cap_holds(session, claimed_rows, caps, window, now, orphans=hold_orphans)
                     if caps is not None else {})
            claims = [_claim_of(old, holds.get(old.id), now) for old in claimed_rows]
            await session.commit()
        claims.sort(key=lambda c: (not c.orphaned, c.scheduled_at))
        return claims

    async def _fence_still(self, session, token: int) -> None:
        """After a claim that claimed nothing: StaleTerm if the fence moved past `token`.

        SQLite reads it (in a transaction of its own, after the claim's). PostgreSQL does not read
        it again: the claim read it FOR SHARE in its own transaction and found `token`, and a raise
        cannot commit while that lock is held, so the fence was still `token` at the claim's
        rollback. A second read right after it (its own BEGIN, SELECT and ROLLBACK) would only
        catch a raise committed in between, which the next claim's fence read catches as well,
        before that claim writes anything; this claim wrote nothing.
        """
        if self.db.is_sqlite and (await session.execute(fence_token_query())).scalar() != token:
            raise StaleTerm(f"the fence moved past token {token}")

    async def finish_many(self, token: int, outcomes: Sequence[tuple[str, Outcome]]) -> dict[str, str]:
        """Record several outcomes of this term's claims in ONE transaction.

        A reminder it finishes gets its `reminder.finished` event in that transaction.
        Returns the reminders NOT recorded, each with why: a reminder no longer `dispatching` under
        `token` is left alone (another term took it over, or a webhook moved it on meanwhile).
        Ids must be distinct. On PostgreSQL: one `SELECT … FOR UPDATE` of the rows still ours (so
        nothing can take them over before the commit), then one executemany UPDATE per set of
        columns, then COMMIT.
        """
        if not outcomes:
            return {}
        for _, outcome in outcomes:  # each outcome ends this term's claim: dispatching → its status
            require(ReminderStatus.DISPATCHING, outcome.status)
        ids = [reminder_id for reminder_id, _ in outcomes]
        if len(set(ids)) != len(ids):
            raise ValueError("finish_many: reminder ids must be distinct")
        return await self.db.write(_finish_many, token, outcomes, ids, utcnow())


def _finish_many(connection: Connection, token: int, outcomes: Sequence[tuple[str, Outcome]], ids: list[str],
                 now: datetime) -> dict[str, str]:
    """`ReminderStore.finish_many`'s transaction, in one greenlet (no session, no hop per statement)."""
    recorded: set[str] = set()
    if connection.dialect.name == "sqlite":
        for reminder_id, outcome in outcomes:
            values = outcome.columns()
            result = connection.execute(
                _update_by_id(tuple(sorted(values))),
                {"b_id": reminder_id, "b_token": token, "b_updated_at": now,
                 **{f"b_{name}": value for name, value in values.items()}},
            )
            if result.rowcount == 1:
                recorded.add(reminder_id)
    else:
        ours = connection.execute(
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
        for reminder_id, outcome in outcomes:
            if reminder_id in recorded:
                values = outcome.columns()
                shapes.setdefault(tuple(sorted(values)), []).append(
                    {"b_id": reminder_id, "b_token": token, "b_updated_at": now,
                     **{f"b_{name}": value for name, value in values.items()}}
                )
        for columns, rows in shapes.items():
            connection.execute(_update_by_id(columns), rows)
    # the finished ones' events, in the same transaction
    reminders_finished(connection, recorded, EventSource.SYSTEM)
    lost = [reminder_id for reminder_id in ids if reminder_id not in recorded]
    return _why_not_ours(connection, lost, token) if lost else {}


def _why_not_ours(connection: Connection, ids: list[str], token: int) -> dict[str, str]:
    """Why each of `ids` is no longer `dispatching` under `token`, as its row says now."""
    rows = {row.id: row for row in connection.execute(
        select(Reminder.id, Reminder.status, Reminder.fence_token, Reminder.last_error).where(Reminder.id.in_(ids)))}
    reasons = {}
    for reminder_id in ids:
        row = rows.get(reminder_id)
        if row is None:
            reasons[reminder_id] = "the reminder no longer exists"
        elif row.fence_token is not None and row.fence_token > token:
            reasons[reminder_id] = (f"taken over by a newer term (fencing token {row.fence_token}); "
                                    "its outcome is theirs")
        else:
            reasons[reminder_id] = (f"no longer dispatching: it is {row.status} now"
                                    + (f" ({row.last_error})" if row.last_error else ""))
    return reasons
