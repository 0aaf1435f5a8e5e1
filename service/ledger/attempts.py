"""Call attempts of providers without idempotency: each create request is recorded under the
term's fence before it is sent, then settled with what the provider answered
(docs/decisions/0132-reconciling-attempts-in-doubt.md; the rule is
`service.reminders.attempts.reconcile`, the flow `service.dispatch.stamped`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, String, and_, bindparam, case, func, insert, literal, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import NoResultFound
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.elements import ColumnElement

from service.db import Database
from service.db.clock import db_now
from service.db.models import Appointment, AppointmentStatus, CallAttempt, Reminder, new_id
from service.ledger.consent import APPOINTMENT_LISTED
from service.ledger.fence import fence_token_query
from service.reminders import ReminderStatus
from service.reminders.attempts import AttemptState, AttemptView
from service.sql import one_of

__all__ = ["AttemptStore"]

# Each statement below is built once, its values bound at each call: one statement per call of the
# store, sent on PostgreSQL without BEGIN/COMMIT (`Database.read`, `Database.write_one`): the
# leader's CPU per call was mostly its database round trips (issue 26).

_R, _A = Reminder.__table__, CallAttempt.__table__
_TOKEN = bindparam("token", type_=BigInteger)
_UNRESOLVED = one_of(_A.c.state, (AttemptState.CREATING, AttemptState.IN_DOUBT))

# The reminder's bound call id and the database's time, with its attempts (oldest first): one row
# per attempt, or one row with NULL attempt columns when it has none; no row: no such reminder.
_VIEW = (
    select(_R.c.bound_call_id, db_now().label("now"), _A.c.id, _A.c.state, _A.c.created_at, _A.c.provider_call_id,
           _A.c.last_event_at, _A.c.call_status)
    .select_from(_R.outerjoin(_A, _A.c.reminder_id == _R.c.id))
    .where(_R.c.id == bindparam("reminder_id", type_=String))
    .order_by(_A.c.created_at, _A.c.id)
)

# The new attempt, only from a reminder row that passes every condition (see `begin`).
_BEGIN = (
    insert(_A)
    .from_select(
        ["id", "reminder_id", "fencing_token", "state", "created_at", "updated_at"],
        select(bindparam("attempt_id", type_=String), _R.c.id, _TOKEN, literal(AttemptState.CREATING.value, String),
               # created_at and updated_at: the database's clock (the reconciliation compares them)
               db_now(), db_now())
        .select_from(_R.join(Appointment, Appointment.id == _R.c.appointment_id))
        .where(_R.c.id == bindparam("reminder_id", type_=String), _R.c.fence_token == _TOKEN,
               _R.c.status == ReminderStatus.DISPATCHING, _R.c.plan == Appointment.plan,
               Appointment.status == AppointmentStatus.SCHEDULED, ~APPOINTMENT_LISTED,
               fence_token_query().scalar_subquery() == _TOKEN)
        .with_for_update(of=_R),
    )
    .returning(_A.c.id)
)


def _settle(state_holds: ColumnElement[bool] | None) -> Update:
    """settle's UPDATE: state and error replaced where `state_holds` (else kept), the call id set
    where none is; a row neither would change is not written."""
    call_id = bindparam("call_id", type_=String)
    new_call_id = func.coalesce(_A.c.provider_call_id, call_id)
    if state_holds is None:  # CREATED: always
        return (update(_A).where(_A.c.id == bindparam("attempt_id", type_=String))
                .values(state=bindparam("new_state", type_=String), error=bindparam("new_error", type_=String),
                        provider_call_id=new_call_id, updated_at=db_now()))
    return (
        update(_A)
        .where(_A.c.id == bindparam("attempt_id", type_=String),
               or_(state_holds, and_(_A.c.provider_call_id.is_(None), call_id.is_not(None))))
        .values(state=case((state_holds, bindparam("new_state", type_=String)), else_=_A.c.state),
                error=case((state_holds, bindparam("new_error", type_=String)), else_=_A.c.error),
                provider_call_id=new_call_id, updated_at=db_now())
    )


_SETTLE_CREATED = _settle(None)
_SETTLE_OTHER = _settle(_UNRESOLVED)

_ABANDON = (
    update(_A)
    .where(_A.c.id.in_(bindparam("attempt_ids", expanding=True)), _UNRESOLVED,
           _A.c.provider_call_id.is_(None), _A.c.last_event_at.is_(None))
    .values(state=AttemptState.NOT_CREATED, error="reconciled: no event and no live call after the grace",
            updated_at=db_now())
)


def _view(connection: Connection, reminder_id: str) -> tuple[str | None, list[AttemptView], datetime]:
    rows = connection.execute(_VIEW, {"reminder_id": reminder_id}).all()
    if not rows:
        raise NoResultFound(f"no reminder {reminder_id}")
    bound, now = rows[0].bound_call_id, rows[0].now
    attempts = [AttemptView(row.id, row.state, row.created_at, row.provider_call_id, row.last_event_at,
                            row.call_status) for row in rows if row.id is not None]
    return bound, attempts, now


def _begin(connection: Connection, attempt_id: str, token: int, reminder_id: str) -> bool:
    return connection.execute(
        _BEGIN, {"attempt_id": attempt_id, "token": token, "reminder_id": reminder_id}).first() is not None


def _update(connection: Connection, statement: Update, params: dict[str, Any]) -> int:
    return int(connection.execute(statement, params).rowcount or 0)


class AttemptStore:
    """The SQL of attempts. `begin` is fenced; settling and reading are not (an attempt id is one
    sender's alone, and its outcome is a fact whoever records it)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def begin(self, token: int, reminder_id: str) -> str | None:
        """Record a new attempt, only while the fence is `token`, the reminder is `dispatching`
        under it and belongs to its appointment's current plan, the appointment is scheduled and
        its number is not on the do-not-call list; its id, or None when this term may not create
        calls for the reminder any more.

        One statement, `INSERT … SELECT … FOR UPDATE OF reminders RETURNING id`: the reminder's
        row is locked (a successor's claim of it skips it and takes it at a later claim, which then
        sees this attempt; a re-plan or cancellation that supersedes it waits for it); the fence is
        read, not locked: a lock per attempt on the one fence row would let a leader frozen inside
        this statement hold up its successor's fence raise. A raise that commits meanwhile is caught
        by `may_send` before the create.

        One statement is as safe as the transaction (lock, fence read, insert, commit) was: on
        PostgreSQL the row lock is held to the statement's end, which is its commit, so a
        successor's claim of the reminder comes after the attempt is committed and sees it; a claim
        (or a re-plan, a cancellation) that got the row first changed its fence_token (or status,
        plan), and PostgreSQL re-checks the conditions on the locked row's newest version once its
        lock is granted: no attempt. What the fence read no longer catches — a raise committed
        while the statement waited for the row — is the raise the old form missed when it committed
        a moment after its fence read: `may_send` and the successor's claim cover both. On SQLite
        (no FOR UPDATE) the statement runs in a write transaction, which SQLite serialises.
        """
        attempt_id = new_id()
        if not await self.db.write_one(_begin, attempt_id, token, reminder_id):
            return None
        return attempt_id

    async def settle(self, attempt_id: str, state: AttemptState, *, call_id: str | None = None,
                     error: str | None = None) -> None:
        """Record what the create achieved. CREATED always holds (it is the provider's word);
        any other state only replaces `creating` or `in_doubt`. The provider's call id is set
        only where none is recorded, whether or not the state changes. One UPDATE."""
        statement = _SETTLE_CREATED if state == AttemptState.CREATED else _SETTLE_OTHER
        await self.db.write_one(_update, statement, {"attempt_id": attempt_id, "new_state": str(state),
                                                     "new_error": error, "call_id": call_id})

    async def abandon(self, attempt_ids: Sequence[str]) -> int:
        """Mark attempts in doubt that made no call `not_created`, unless a webhook has spoken of
        one meanwhile; how many were marked (fewer than asked: a call exists after all). One UPDATE."""
        if not attempt_ids:
            return 0
        return await self.db.write_one(_update, _ABANDON, {"attempt_ids": list(attempt_ids)})

    async def view(self, reminder_id: str) -> tuple[str | None, list[AttemptView], datetime]:
        """The reminder's bound call id, its attempts (oldest first) and the database's time, which
        the attempts' times are on; NoResultFound when the reminder does not exist. One SELECT."""
        return await self.db.read(_view, reminder_id)
