"""Appointments as the API uses them: create, list, read, change, cancel.

The layer between the routers and the ORM: it plans reminders through the domain
(`service.reminders`) and writes them through one session. It speaks no HTTP: a router turns
its errors (`AppointmentNotFound`, `AppointmentCancelled`, `InvalidField`) into status codes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload

from service.db.cancellation import cancel_pending_reminders
from service.db.models import Appointment, AppointmentStatus, Confirmation, Reminder, new_id, utcnow
from service.privacy import mask_phone
from service.reminders import (
    REPLAN_FIELDS,
    PlanningConfig,
    ReminderStatus,
    Unplanned,
    idempotency_key,
    number_refusal,
    plan_reminders,
)

__all__ = [
    "AppointmentCancelled",
    "AppointmentNotFound",
    "InvalidField",
    "NewAppointment",
    "Page",
    "cancel",
    "change",
    "create",
    "list_page",
    "read",
]

log = logging.getLogger(__name__)


class AppointmentNotFound(LookupError):
    """No appointment has this id."""


class AppointmentCancelled(RuntimeError):
    """The appointment is cancelled: it cannot be changed."""


class InvalidField(ValueError):
    """A value that passed its own checks but not the appointment's (e.g. a reminder after the start)."""

    def __init__(self, field: tuple[str | int, ...], message: str, value: object = None) -> None:
        super().__init__(f"{'.'.join(map(str, field))}: {message}")
        self.field, self.message, self.value = field, message, value


@dataclass(frozen=True)
class NewAppointment:
    customer_name: str
    phone: str
    starts_at: datetime
    timezone: str = "UTC"
    notes: str | None = None
    remind_at: list[datetime] | None = None
    language: str | None = None  # None: DEFAULT_LANGUAGE


@dataclass(frozen=True)
class Page:
    items: list[Appointment]
    more: bool


def _check_phone(phone: str | None, planning: PlanningConfig) -> None:
    refusal = number_refusal(phone, planning.numbers) if phone is not None else None
    if refusal:
        raise InvalidField(("phone",), refusal, phone)


def _check_remind_at(remind_at: list[datetime] | None, starts_at: datetime) -> None:
    for index, moment in enumerate(remind_at or ()):
        if moment >= starts_at:
            raise InvalidField(("remind_at", index), "must be before starts_at", moment.isoformat())


def _check_language(language: str, planning: PlanningConfig) -> None:
    if not planning.templates.supports(language):
        known = ", ".join(planning.templates.languages)
        raise InvalidField(("language",), f"no message template for this language (templates: {known})", language)


def _plan(appointment: Appointment, planning: PlanningConfig, now: datetime) -> tuple[list[Reminder], list[Unplanned]]:
    explicit = [datetime.fromisoformat(t) for t in appointment.remind_at] if appointment.remind_at is not None else None
    plan = plan_reminders(
        starts_at=appointment.starts_at,
        zone=ZoneInfo(appointment.timezone),
        window=planning.call_window,
        now=now,
        offsets=planning.offsets,
        explicit=explicit,
    )
    # the words are fixed now: every call of these reminders says the same, whatever changes later
    wording = planning.templates.render(
        appointment.language, appointment.customer_name, appointment.starts_at, appointment.timezone
    ).to_json()
    reminders = []
    for due in plan.due_times:
        reminder_id = new_id()
        reminders.append(
            Reminder(
                id=reminder_id, due_at=due, next_attempt_at=due, status=ReminderStatus.PENDING, attempts=0,
                idempotency_key=idempotency_key(reminder_id), wording=wording, no_answer_retries=0,
            )
        )
    return reminders, plan.unplanned


async def read(
    session: AsyncSession, appointment_id: str, *, for_update: bool = False, one_statement: bool = False
) -> Appointment:
    """The appointment with its reminders (AppointmentNotFound if none). `one_statement` joins the
    reminders into the same SELECT (what a read-only session outside a transaction needs)."""
    if "\x00" in appointment_id:  # no id holds one, and PostgreSQL would refuse the query (a 503)
        raise AppointmentNotFound("appointment not found")
    query = select(Appointment).where(Appointment.id == appointment_id).execution_options(populate_existing=True)
    if for_update:
        query = query.with_for_update()
    if one_statement:
        query = query.options(joinedload(Appointment.reminders))
    appointment = (await session.execute(query)).unique().scalar_one_or_none()
    if appointment is None:
        raise AppointmentNotFound(f"appointment {appointment_id} not found")
    return appointment


async def create(
    session: AsyncSession, new: NewAppointment, planning: PlanningConfig
) -> tuple[Appointment, list[Unplanned]]:
    """Store an appointment with its planned reminders; also what could not be planned, and why."""
    _check_phone(new.phone, planning)
    _check_remind_at(new.remind_at, new.starts_at)
    language = new.language or planning.templates.default_language
    _check_language(language, planning)
    appointment = Appointment(
        id=new_id(),
        customer_name=new.customer_name,
        phone=new.phone,
        starts_at=new.starts_at.astimezone(UTC),  # as every later read returns it
        timezone=new.timezone,
        notes=new.notes,
        remind_at=[t.isoformat() for t in new.remind_at] if new.remind_at is not None else None,
        status=AppointmentStatus.SCHEDULED,
        language=language,
    )
    reminders, unplanned = _plan(appointment, planning, datetime.now(UTC))
    appointment.reminders = reminders
    session.add(appointment)
    await session.commit()
    log.info(
        "appointment %s created for %s: %d reminder(s), %d unplanned",
        appointment.id, mask_phone(appointment.phone), len(reminders), len(unplanned),
    )
    return appointment, unplanned


async def list_page(
    session: AsyncSession,
    *,
    limit: int,
    status: AppointmentStatus | None = None,
    confirmation: Confirmation | None = None,
    starts_after: datetime | None = None,
    starts_before: datetime | None = None,
    after: tuple[datetime, str] | None = None,
) -> Page:
    """Up to `limit` appointments ordered by (starts_at, id), after the (starts_at, id) `after`."""
    query = select(Appointment).order_by(Appointment.starts_at, Appointment.id).limit(limit + 1)
    if status is not None:
        query = query.where(Appointment.status == status)
    if confirmation is not None:
        query = query.where(Appointment.confirmation == confirmation)
    if starts_after is not None:
        query = query.where(Appointment.starts_at > starts_after)
    if starts_before is not None:
        query = query.where(Appointment.starts_at < starts_before)
    if after is not None:
        after_start, after_id = after
        query = query.where(
            or_(
                Appointment.starts_at > after_start,
                and_(Appointment.starts_at == after_start, Appointment.id > after_id),
            )
        )
    rows = list((await session.execute(query)).scalars())
    return Page(rows[:limit], len(rows) > limit)


async def change(
    session: AsyncSession, appointment_id: str, changes: Mapping[str, Any], planning: PlanningConfig
) -> tuple[Appointment, list[Unplanned]]:
    """Apply `changes` (field → new value); a change to what a call says or when re-plans the
    pending reminders under new keys. AppointmentCancelled if the appointment is cancelled."""
    _check_phone(changes.get("phone"), planning)
    locking = session.get_bind().dialect.name != "sqlite"
    appointment = await read(session, appointment_id, for_update=locking)
    if appointment.status == AppointmentStatus.CANCELLED:
        raise AppointmentCancelled("appointment is cancelled")
    starts_at = changes.get("starts_at", appointment.starts_at)
    _check_remind_at(changes.get("remind_at"), starts_at)
    if "language" in changes:
        _check_language(changes["language"], planning)
    if "starts_at" in changes and starts_at != appointment.starts_at:
        appointment.confirmation = None  # a confirmation was for the old time
    replan = bool(changes.keys() & REPLAN_FIELDS)
    for name, value in changes.items():
        if name == "remind_at":
            value = [t.isoformat() for t in value] if value is not None else None
        setattr(appointment, name, value)
    unplanned: list[Unplanned] = []
    if replan:
        await _prune_superseded(session, appointment.id)
        await cancel_pending_reminders(session, appointment.id, "re-planned")
        reminders, unplanned = _plan(appointment, planning, datetime.now(UTC))
        for reminder in reminders:
            reminder.appointment_id = appointment.id
            session.add(reminder)
    appointment.updated_at = utcnow()
    await session.commit()
    log.info("appointment %s changed (%s)%s", appointment.id, ", ".join(sorted(changes)), ", re-planned" if replan else "")
    return await read(session, appointment.id), unplanned


async def _prune_superseded(session: AsyncSession, appointment_id: str) -> None:
    """Delete the reminders a re-plan supersedes that no leader ever touched (docs/decisions/0125).

    Pending ones never claimed and those an earlier re-plan cancelled before any claim: nothing
    was called, nothing is lost. A reminder ever claimed (a fence token) keeps its row, so a
    client's re-plans cannot grow the table; the dispatcher's claim and this DELETE exclude each
    other as the claim and `cancel_pending_reminders` do (row locks on PostgreSQL, one writer on SQLite).
    """
    never_claimed = and_(
        Reminder.appointment_id == appointment_id,
        Reminder.attempts == 0,
        Reminder.fence_token.is_(None),
        Reminder.claimed_at.is_(None),
    )
    superseded = or_(
        Reminder.status == ReminderStatus.PENDING,
        and_(Reminder.status == ReminderStatus.CANCELLED, Reminder.skip_reason == "re-planned"),
    )
    await session.execute(
        delete(Reminder).where(never_claimed, superseded).execution_options(synchronize_session=False)
    )


async def cancel(session: AsyncSession, appointment_id: str) -> Appointment:
    """Cancel an appointment and its pending reminders; cancelling twice is harmless."""
    appointment = await read(session, appointment_id)
    if appointment.status != AppointmentStatus.CANCELLED:
        appointment.status = AppointmentStatus.CANCELLED
        appointment.updated_at = utcnow()
        await cancel_pending_reminders(session, appointment.id, "appointment cancelled")
        await session.commit()
        log.info("appointment %s cancelled", appointment.id)
    return await read(session, appointment.id)
