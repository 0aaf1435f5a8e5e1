"""Cancelling an appointment's pending reminders: one statement, for the API (DELETE, re-planning
PATCH) and the keypad's decline (webhooks) alike."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Reminder, utcnow
from service.reminders.lifecycle import ReminderStatus, require

__all__ = ["cancel_pending_reminders"]


async def cancel_pending_reminders(session: AsyncSession, appointment_id: str, reason: str) -> int:
    """`pending` → `cancelled` with `skip_reason`; how many. Only `pending` ones: a reminder the
    dispatcher already claimed stays its, and its outcome decides."""
    require(ReminderStatus.PENDING, ReminderStatus.CANCELLED)
    result = await session.execute(
        update(Reminder)
        .where(Reminder.appointment_id == appointment_id, Reminder.status == ReminderStatus.PENDING)
        .values(status=ReminderStatus.CANCELLED, skip_reason=reason, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)
