"""Call attempts of providers without idempotency: each create request is recorded under the
term's fence before it is sent, then settled with what the provider answered
(docs/decisions/0132-reconciling-attempts-in-doubt.md; the rule is
`service.reminders.attempts.reconcile`, the flow `service.dispatch.stamped`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update

from service.db import Database
from service.db.clock import db_now
from service.db.models import Appointment, AppointmentStatus, CallAttempt, Reminder, new_id
from service.ledger.consent import APPOINTMENT_LISTED
from service.ledger.fence import fence_token_query
from service.reminders import ReminderStatus
from service.reminders.attempts import AttemptState, AttemptView

__all__ = ["AttemptStore"]


class AttemptStore:
    """The SQL of attempts. `begin` is fenced; settling and reading are not (an attempt id is one
    sender's alone, and its outcome is a fact whoever records it)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def begin(self, token: int, reminder_id: str) -> str | None:
        """Record a new attempt, only while the fence is `token`, the reminder is `dispatching`
        under it and belongs to its appointment's current plan, the appointment is scheduled and
        its number is not on the do-not-call list; its id, or None when this term may not create
        calls for the reminder any more."""
        attempt_id = new_id()
        async with self.db.session() as session:
            # The reminder's row is locked (a successor's claim of it waits, then sees this
            # attempt; a re-plan or cancellation that supersedes it waits too); the fence is read,
            # not locked: a lock per attempt on the one fence row would let a leader frozen inside
            # this transaction hold up its successor's fence raise. A raise that commits meanwhile
            # is caught by `may_send` before the create.
            ours = await session.execute(
                select(Reminder.id)
                .join(Appointment, Appointment.id == Reminder.appointment_id)
                .where(Reminder.id == reminder_id, Reminder.fence_token == token,
                       Reminder.status == ReminderStatus.DISPATCHING, Reminder.plan == Appointment.plan,
                       Appointment.status == AppointmentStatus.SCHEDULED, ~APPOINTMENT_LISTED)
                .with_for_update(of=Reminder)
            )
            if ours.first() is None:
                await session.rollback()
                return None
            if (await session.execute(fence_token_query())).scalar() != token:
                await session.rollback()
                return None
            # created_at and updated_at: the database's clock (the reconciliation compares them)
            await session.execute(insert(CallAttempt).values(
                id=attempt_id, reminder_id=reminder_id, fencing_token=token, state=AttemptState.CREATING))
            await session.commit()
        return attempt_id

    async def settle(self, attempt_id: str, state: AttemptState, *, call_id: str | None = None,
                     error: str | None = None) -> None:
        """Record what the create achieved. CREATED always holds (it is the provider's word);
        any other state only replaces `creating` or `in_doubt`."""
        statement = update(CallAttempt).where(CallAttempt.id == attempt_id)
        if state != AttemptState.CREATED:
            statement = statement.where(CallAttempt.state.in_((AttemptState.CREATING, AttemptState.IN_DOUBT)))
        values: dict[str, Any] = {"state": state, "error": error}
        async with self.db.session() as session:
            await session.execute(statement.values(values))
            if call_id is not None:
                await session.execute(
                    update(CallAttempt)
                    .where(CallAttempt.id == attempt_id, CallAttempt.provider_call_id.is_(None))
                    .values(provider_call_id=call_id)
                )
            await session.commit()

    async def abandon(self, attempt_ids: Sequence[str]) -> int:
        """Mark attempts in doubt that made no call `not_created`, unless a webhook has spoken of
        one meanwhile; how many were marked (fewer than asked: a call exists after all)."""
        if not attempt_ids:
            return 0
        async with self.db.session() as session:
            result = await session.execute(
                update(CallAttempt)
                .where(CallAttempt.id.in_(list(attempt_ids)),
                       CallAttempt.state.in_((AttemptState.CREATING, AttemptState.IN_DOUBT)),
                       CallAttempt.provider_call_id.is_(None), CallAttempt.last_event_at.is_(None))
                .values(state=AttemptState.NOT_CREATED, error="reconciled: no event and no live call after the grace")
            )
            await session.commit()
        return int(result.rowcount or 0)

    async def view(self, reminder_id: str) -> tuple[str | None, list[AttemptView], datetime]:
        """The reminder's bound call id, its attempts (oldest first) and the database's time, which
        the attempts' times are on."""
        async with self.db.session() as session:
            bound, now = (await session.execute(
                select(Reminder.bound_call_id, db_now()).where(Reminder.id == reminder_id))).one()
            rows = await session.execute(
                select(CallAttempt.id, CallAttempt.state, CallAttempt.created_at, CallAttempt.provider_call_id,
                       CallAttempt.last_event_at, CallAttempt.call_status)
                .where(CallAttempt.reminder_id == reminder_id)
                .order_by(CallAttempt.created_at)
            )
            return bound, [AttemptView(*row) for row in rows], now


