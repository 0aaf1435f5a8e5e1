"""One row of the service's tables, read as the tests check them (Core rows: attribute access)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from service.db import Appointment, CallAttempt, Database, Reminder

__all__ = ["appointment_row", "attempt_row", "reminder_row"]


async def appointment_row(db: Database, appointment_id: str) -> Any:
    async with db.session() as session:
        return (await session.execute(select(Appointment.__table__).where(Appointment.id == appointment_id))).one()


async def reminder_row(db: Database, reminder_id: str) -> Any:
    async with db.session() as session:
        return (await session.execute(select(Reminder.__table__).where(Reminder.id == reminder_id))).one()


async def attempt_row(db: Database, attempt_id: str) -> Any:
    async with db.session() as session:
        return (await session.execute(select(CallAttempt.__table__).where(CallAttempt.id == attempt_id))).one()
