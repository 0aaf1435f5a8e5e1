"""Appointments: create, list, read, change and cancel; reminders are planned here."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from datetime import UTC, datetime
from typing import Annotated
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, HTTPException, Query, status
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload

from service.api.phone_policy import phone_refusal
from service.api.deps import ReadSessionDep, SessionDep, SettingsDep, invalid, require_token
from service.api.schemas import (
    AppointmentCreate,
    AppointmentList,
    AppointmentOut,
    AppointmentPatch,
    AwareDatetime,
    ErrorOut,
    ReminderOut,
    UnplannedOut,
)
from service.config import Settings
from service.db.models import Appointment, AppointmentStatus, Reminder, ReminderStatus, new_id, utcnow
from service.dispatch.policy import Unplanned, plan_reminders
from service.telephony import mask_phone

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/appointments",
    tags=["appointments"],
    dependencies=[Depends(require_token)],
    responses={
        400: {"model": ErrorOut, "description": "Malformed request"},
        401: {"model": ErrorOut, "description": "Missing or invalid bearer token (when API_TOKEN is set)"},
        413: {"model": ErrorOut, "description": "Request body over 64 KiB"},
        422: {"description": "Invalid input; `detail` names each field"},
        503: {"model": ErrorOut, "description": "The database is unavailable"},
    },
)

# Fields a call is made of (who, to which number, what it says, when): changing one re-plans, so that
# an idempotency key always stands for one and the same request body.
_CALL_FIELDS = {"customer_name", "phone", "starts_at", "timezone", "remind_at"}

_NOT_FOUND = {404: {"model": ErrorOut, "description": "No appointment with this id"}}

# OpenAPI links: what a client (or a stateful fuzzer) can do with a created appointment's id.
_BY_ID = {"appointment_id": "$response.body#/id"}
_CREATED_LINKS = {
    201: {
        "description": "The appointment, with its planned reminders",
        "links": {
            "GetAppointment": {"operationId": "getAppointment", "parameters": _BY_ID},
            "PatchAppointment": {"operationId": "patchAppointment", "parameters": _BY_ID},
            "CancelAppointment": {"operationId": "cancelAppointment", "parameters": _BY_ID},
        },
    }
}


def _plan(appointment: Appointment, settings: Settings, now: datetime) -> tuple[list[Reminder], list[Unplanned]]:
    explicit = [datetime.fromisoformat(t) for t in appointment.remind_at] if appointment.remind_at is not None else None
    plan = plan_reminders(
        starts_at=appointment.starts_at,
        zone=ZoneInfo(appointment.timezone),
        window=settings.call_window,
        now=now,
        offsets=settings.reminder_offsets,
        explicit=explicit,
    )
    reminders = []
    for due in plan.due_times:
        reminder_id = new_id()
        reminders.append(
            Reminder(
                id=reminder_id,
                due_at=due,
                next_attempt_at=due,
                status=ReminderStatus.PENDING,
                attempts=0,
                # One key per reminder, never per attempt or replica: the provider collapses retries.
                idempotency_key=f"reminder-{reminder_id}",
            )
        )
    return reminders, plan.unplanned


def _out(appointment: Appointment, unplanned: list[Unplanned] = ()) -> AppointmentOut:  # type: ignore[assignment]
    return AppointmentOut(
        id=appointment.id,
        customer_name=appointment.customer_name,
        phone=appointment.phone,
        starts_at=appointment.starts_at,
        timezone=appointment.timezone,
        notes=appointment.notes,
        status=AppointmentStatus(appointment.status),
        remind_at=[datetime.fromisoformat(t) for t in appointment.remind_at] if appointment.remind_at else None,
        reminders=[ReminderOut.model_validate(r, from_attributes=True) for r in appointment.reminders],
        unplanned=[UnplannedOut(rule=u.rule, reason=u.reason) for u in unplanned],
        created_at=appointment.created_at,
        updated_at=appointment.updated_at,
    )


def _check_phone(phone: str | None, settings: Settings) -> None:
    refusal = phone_refusal(phone, settings) if phone is not None else None
    if refusal:
        raise invalid(("body", "phone"), refusal)


def _check_remind_at(remind_at: list[datetime] | None, starts_at: datetime) -> None:
    for index, moment in enumerate(remind_at or ()):
        if moment >= starts_at:
            raise invalid(("body", "remind_at", index), "must be before starts_at", moment.isoformat())


async def _load(
    session: AsyncSession, appointment_id: str, *, for_update: bool = False, one_statement: bool = False
) -> Appointment:
    """The appointment with its reminders, or 404. `one_statement` joins the reminders into the same
    SELECT (what a ReadSessionDep needs) instead of loading them with a second one."""
    if "\x00" in appointment_id:  # no id holds one, and PostgreSQL would refuse the query (a 503)
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="appointment not found")
    query = select(Appointment).where(Appointment.id == appointment_id).execution_options(populate_existing=True)
    if for_update:
        query = query.with_for_update()
    if one_statement:
        query = query.options(joinedload(Appointment.reminders))
    appointment = (await session.execute(query)).unique().scalar_one_or_none()
    if appointment is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"appointment {appointment_id} not found")
    return appointment


async def _cancel_pending(session: AsyncSession, appointment_id: str, reason: str) -> None:
    # A single UPDATE … WHERE status = 'pending': a reminder the dispatcher already claimed stays its.
    await session.execute(
        update(Reminder)
        .where(Reminder.appointment_id == appointment_id, Reminder.status == ReminderStatus.PENDING)
        .values(status=ReminderStatus.CANCELLED, skip_reason=reason, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


async def _prune_superseded(session: AsyncSession, appointment_id: str) -> None:
    """Delete the reminders a re-plan supersedes that no leader ever touched (docs/decisions/0125).

    Pending ones never claimed and those an earlier re-plan cancelled before any claim: nothing
    was called, nothing is lost. A reminder ever claimed (a fence token) keeps its row, so a
    client's re-plans cannot grow the table; the dispatcher's claim and this DELETE exclude each
    other as the claim and `_cancel_pending` do (row locks on PostgreSQL, one writer on SQLite).
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


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=AppointmentOut, operation_id="createAppointment",
    responses=_CREATED_LINKS,
)
async def create_appointment(body: AppointmentCreate, session: SessionDep, settings: SettingsDep) -> AppointmentOut:
    """Create an appointment and plan its reminders."""
    _check_phone(body.phone, settings)
    _check_remind_at(body.remind_at, body.starts_at)
    appointment = Appointment(
        id=new_id(),
        customer_name=body.customer_name,
        phone=body.phone,
        starts_at=body.starts_at.astimezone(UTC),  # as every later read returns it
        timezone=body.timezone,
        notes=body.notes,
        remind_at=[t.isoformat() for t in body.remind_at] if body.remind_at is not None else None,
        status=AppointmentStatus.SCHEDULED,
    )
    reminders, unplanned = _plan(appointment, settings, datetime.now(UTC))
    appointment.reminders = reminders
    session.add(appointment)
    await session.commit()
    log.info(
        "appointment %s created for %s: %d reminder(s), %d unplanned",
        appointment.id, mask_phone(appointment.phone), len(reminders), len(unplanned),
    )
    return _out(appointment, unplanned)


class _CursorRange:
    """Start times a cursor may carry: those an appointment can have (schemas' range), with slack."""

    low = datetime(1970, 1, 1, tzinfo=UTC)
    high = datetime(9000, 1, 1, tzinfo=UTC)

    def check(self, moment: datetime) -> datetime:
        if not self.low <= moment <= self.high:
            raise ValueError("cursor out of range")
        return moment


_CURSOR_RANGE = _CursorRange()
_CURSOR_DOC = "Opaque: a `next_cursor` from the previous page, passed back unchanged (URL-safe base64)."


def _encode_cursor(appointment: Appointment) -> str:
    raw = json.dumps([appointment.starts_at.isoformat(), appointment.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        starts_at_text, appointment_id = json.loads(raw)
        starts_at = datetime.fromisoformat(starts_at_text)
        if starts_at.tzinfo is None or not isinstance(appointment_id, str) or "\x00" in appointment_id:
            raise ValueError
        # Range-checked in UTC: 0001-01-01T00:00+14:00 is before year 1 and overflows there.
        return _CURSOR_RANGE.check(starts_at.astimezone(UTC)), appointment_id
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise invalid(("query", "cursor"), "malformed cursor: pass back a next_cursor unchanged", cursor) from None


@router.get("", response_model=AppointmentList, operation_id="listAppointments")
async def list_appointments(
    session: SessionDep,
    status_: Annotated[AppointmentStatus | None, Query(alias="status")] = None,
    starts_after: Annotated[AwareDatetime | None, Query(description="ISO 8601 with offset")] = None,
    starts_before: Annotated[AwareDatetime | None, Query(description="ISO 8601 with offset")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=512, pattern=r"^[A-Za-z0-9_-]+$", description=_CURSOR_DOC)] = None,
) -> AppointmentList:
    """Appointments ordered by start time, a page at a time."""
    query = select(Appointment).order_by(Appointment.starts_at, Appointment.id).limit(limit + 1)
    if status_ is not None:
        query = query.where(Appointment.status == status_)
    if starts_after is not None:
        query = query.where(Appointment.starts_at > starts_after)
    if starts_before is not None:
        query = query.where(Appointment.starts_at < starts_before)
    if cursor is not None:
        after_start, after_id = _decode_cursor(cursor)
        query = query.where(
            or_(
                Appointment.starts_at > after_start,
                and_(Appointment.starts_at == after_start, Appointment.id > after_id),
            )
        )
    rows = list((await session.execute(query)).scalars())
    page, more = rows[:limit], len(rows) > limit
    return AppointmentList(items=[_out(a) for a in page], next_cursor=_encode_cursor(page[-1]) if more else None)


@router.get("/{appointment_id}", response_model=AppointmentOut, responses=_NOT_FOUND, operation_id="getAppointment")
async def get_appointment(appointment_id: str, session: ReadSessionDep) -> AppointmentOut:
    """One appointment with its reminders."""
    return _out(await _load(session, appointment_id, one_statement=True))


@router.patch(
    "/{appointment_id}",
    response_model=AppointmentOut,
    operation_id="patchAppointment",
    responses={**_NOT_FOUND, 409: {"model": ErrorOut, "description": "The appointment is cancelled"}},
)
async def patch_appointment(
    appointment_id: str, body: AppointmentPatch, session: SessionDep, settings: SettingsDep
) -> AppointmentOut:
    """Change an appointment; a change to what a call says or when (all fields but `notes`) re-plans its
    pending reminders under new idempotency keys."""
    _check_phone(body.phone, settings)
    appointment = await _load(session, appointment_id, for_update=not settings.is_sqlite)
    if appointment.status == AppointmentStatus.CANCELLED:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="appointment is cancelled")
    changes = body.model_dump(exclude_unset=True)
    starts_at = changes.get("starts_at", appointment.starts_at)
    remind_at = changes["remind_at"] if "remind_at" in changes else None
    _check_remind_at(remind_at, starts_at)
    replan = bool(changes.keys() & _CALL_FIELDS)
    for name, value in changes.items():
        if name == "remind_at":
            value = [t.isoformat() for t in value] if value is not None else None
        setattr(appointment, name, value)
    unplanned: list[Unplanned] = []
    if replan:
        await _prune_superseded(session, appointment.id)
        await _cancel_pending(session, appointment.id, "re-planned")
        reminders, unplanned = _plan(appointment, settings, datetime.now(UTC))
        for reminder in reminders:
            reminder.appointment_id = appointment.id
            session.add(reminder)
    appointment.updated_at = utcnow()
    await session.commit()
    log.info("appointment %s changed (%s)%s", appointment.id, ", ".join(sorted(changes)), ", re-planned" if replan else "")
    return _out(await _load(session, appointment.id), unplanned)


@router.delete(
    "/{appointment_id}", response_model=AppointmentOut, responses=_NOT_FOUND, operation_id="cancelAppointment"
)
async def cancel_appointment(appointment_id: str, session: SessionDep) -> AppointmentOut:
    """Cancel an appointment: its pending reminders become `cancelled`. Cancelling twice is harmless."""
    appointment = await _load(session, appointment_id)
    if appointment.status != AppointmentStatus.CANCELLED:
        appointment.status = AppointmentStatus.CANCELLED
        appointment.updated_at = utcnow()
        await _cancel_pending(session, appointment.id, "appointment cancelled")
        await session.commit()
        log.info("appointment %s cancelled", appointment.id)
    return _out(await _load(session, appointment.id))
