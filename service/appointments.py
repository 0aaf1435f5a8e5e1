"""Appointments as the API uses them: create, list, read, change, cancel.

The layer between the routers and the database: it plans reminders through the domain
(`service.reminders`), reads the tables through SQLAlchemy Core and writes reminders through the
ledger (`service.ledger`, their one writer), each call in at most one transaction with one
statement per table it touches (docs/decisions/0161); a create is one statement on PostgreSQL
(docs/decisions/0162). It
returns appointments as `AppointmentView`s — plain dictionaries in the API's response shape, built
from the rows it read or the values it wrote (nothing is read back after a write). It speaks no
HTTP: a router turns its errors (`AppointmentNotFound`, `AppointmentCancelled`, `InvalidField`,
`PreconditionFailed`) into status codes. A change or cancel may be conditional (`expected`: the
versions If-Match names, docs/decisions/0241).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict
from zoneinfo import ZoneInfo

from sqlalchemy import Integer, Select, and_, bindparam, or_, select
from sqlalchemy.engine import Connection, Row

from service.db import Database
from service.db.models import Appointment, AppointmentStatus, Confirmation, Reminder, new_id, utcnow
from service.ledger import cancellation, consent, erasure, plans
from service.ledger.cancellation import CANCELLED_BY_API, CONFIRMED_BY_CUSTOMER, OPTED_OUT, REPLANNED
from service.ledger.consent import PhoneHasher
from service.ledger.events import EventSource
from service.ledger.plans import insert_appointment, reminder_row
from service.logs import actor
from service.metrics import PERSONAL_DATA_ERASED, SKIPPED_BY_CONSENT
from service.privacy import mask_phone
from service.reminders import (
    REPLAN_FIELDS,
    PlanningConfig,
    ReminderStatus,
    Unplanned,
    number_refusal,
    plan_reminders,
    too_close,
)
from service.reminders.planning import spacing_text

__all__ = [
    "AppointmentCancelled",
    "AppointmentError",
    "AppointmentNotFound",
    "AppointmentView",
    "InvalidField",
    "NewAppointment",
    "Page",
    "PreconditionFailed",
    "ReminderView",
    "cancel",
    "change",
    "create",
    "list_page",
    "read",
]

log = logging.getLogger(__name__)


class AppointmentError(Exception):
    """The base of the appointments service's errors (a router turns each into a status code)."""


class AppointmentNotFound(AppointmentError, LookupError):
    """No appointment has this id."""


class AppointmentCancelled(AppointmentError, RuntimeError):
    """The appointment is cancelled: it cannot be changed."""


class PreconditionFailed(AppointmentError, RuntimeError):
    """The appointment is at none of the versions the request was conditional on (If-Match)."""


class InvalidField(AppointmentError, ValueError):
    """A value that passed its own checks but not the appointment's (e.g. a reminder after the start)."""

    def __init__(self, field: tuple[str | int, ...], message: str, value: object = None) -> None:
        super().__init__(f"{'.'.join(map(str, field))}: {message}")
        self.field, self.message, self.value = field, message, value


class ReminderView(TypedDict):
    id: str
    due_at: datetime
    status: str
    attempts: int
    last_error: str | None
    skip_reason: str | None
    sent_at: datetime | None
    provider_call_id: str | None
    outcome: str | None
    answered_at: datetime | None


class AppointmentView(TypedDict):
    """An appointment with its reminders (ordered by due time), as the API answers it."""

    id: str
    customer_name: str
    phone: str
    starts_at: datetime
    timezone: str
    notes: str | None
    status: str
    language: str
    confirmation: str | None
    remind_at: list[datetime] | None
    reminders: list[ReminderView]
    unplanned: list[dict[str, str]]
    created_at: datetime
    updated_at: datetime
    erased_at: datetime | None
    version: int  # its ETag; the router answers it as a header, never in the body


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
    items: list[AppointmentView]
    more: bool


# -- statements: built once, so SQLAlchemy's cache key for each is computed once -----------------

_A, _R = Appointment.__table__, Reminder.__table__
_APPOINTMENT_COLUMNS = ("id", "customer_name", "phone", "starts_at", "timezone", "notes", "status", "language",
                        "confirmation", "remind_at", "created_at", "updated_at", "erased_at", "version")
_REMINDER_COLUMNS = ("id", "due_at", "status", "attempts", "last_error", "skip_reason", "sent_at", "provider_call_id",
                     "outcome", "answered_at")


def _joined(appointments: Any) -> Select[Any]:
    """`appointments` (the table or a page of it) LEFT JOIN their reminders, in that column order."""
    return (
        select(*(appointments.c[name] for name in _APPOINTMENT_COLUMNS),
               *(_R.c[name].label(f"reminder_{name}") for name in _REMINDER_COLUMNS))
        .select_from(appointments.outerjoin(_R, _R.c.appointment_id == appointments.c.id))
        .order_by(appointments.c.starts_at, appointments.c.id, _R.c.due_at, _R.c.id)
    )


_ONE = _joined(_A).where(_A.c.id == bindparam("appointment_id"))
# Locks the appointment row only: FOR UPDATE cannot apply to the nullable side of an outer join.
_ONE_FOR_UPDATE = _ONE.with_for_update(of=_A)



@functools.cache
def _page_statement(status: bool, confirmation: bool, after: bool, before: bool, cursor: bool) -> Select[Any]:
    """The list query for one combination of filters (32 at most, each built once)."""
    page = select(_A).order_by(_A.c.starts_at, _A.c.id).limit(bindparam("limit", type_=Integer))
    if status:
        page = page.where(_A.c.status == bindparam("status"))
    if confirmation:
        page = page.where(_A.c.confirmation == bindparam("confirmation"))
    if after:
        page = page.where(_A.c.starts_at > bindparam("starts_after"))
    if before:
        page = page.where(_A.c.starts_at < bindparam("starts_before"))
    if cursor:
        cursor_start = bindparam("cursor_starts_at", type_=_A.c.starts_at.type)
        page = page.where(or_(_A.c.starts_at > cursor_start,
                              and_(_A.c.starts_at == cursor_start, _A.c.id > bindparam("cursor_id"))))
    return _joined(page.subquery("page"))


# -- rows ⇄ views -------------------------------------------------------------------------------


def _views(rows: Sequence[Row[Any]]) -> list[AppointmentView]:
    """Joined rows (ordered by appointment) → one view per appointment, its reminders in row order."""
    views: list[AppointmentView] = []
    current: AppointmentView | None = None
    for row in rows:
        if current is None or current["id"] != row[0]:
            remind_at = row[9]
            current = {
                "id": row[0], "customer_name": row[1], "phone": row[2], "starts_at": row[3], "timezone": row[4],
                "notes": row[5], "status": row[6], "language": row[7], "confirmation": row[8],
                "remind_at": [datetime.fromisoformat(t) for t in remind_at] if remind_at else None,
                "reminders": [], "unplanned": [], "created_at": row[10], "updated_at": row[11], "erased_at": row[12],
                "version": row[13],
            }
            views.append(current)
        if row[14] is not None:
            current["reminders"].append({
                "id": row[14], "due_at": row[15], "status": row[16], "attempts": row[17], "last_error": row[18],
                "skip_reason": row[19], "sent_at": row[20], "provider_call_id": row[21], "outcome": row[22],
                "answered_at": row[23],
            })
    return views


def _check_phone(phone: str | None, planning: PlanningConfig) -> None:
    refusal = number_refusal(phone, planning.numbers) if phone is not None else None
    if refusal:
        raise InvalidField(("phone",), refusal, phone)


def _check_remind_at(remind_at: list[datetime] | None, starts_at: datetime, planning: PlanningConfig) -> None:
    for index, moment in enumerate(remind_at or ()):
        if moment >= starts_at:
            raise InvalidField(("remind_at", index), "must be before starts_at", moment.isoformat())
    pair = too_close(remind_at or (), planning.spacing)
    if pair is not None:
        first, second = pair
        spacing = spacing_text(planning.spacing)
        raise InvalidField(("remind_at", second), f"closer than MIN_REMINDER_SPACING ({spacing}) to remind_at[{first}]",
                           remind_at[second].isoformat())  # type: ignore[index]


def _check_language(language: str, planning: PlanningConfig) -> None:
    if not planning.templates.supports(language):
        known = ", ".join(planning.templates.languages)
        raise InvalidField(("language",), f"no message template for this language (templates: {known})", language)


def _plan(
    appointment: Mapping[str, Any], remind_at: list[str] | None, planning: PlanningConfig, now: datetime, *,
    plan_number: int = 0, owed: Sequence[datetime] = (), skip_reason: str | None = None,
) -> tuple[list[dict[str, Any]], list[Unplanned]]:
    """The reminder rows of the appointment's plan `plan_number`, and what could not be planned
    (`owed`: calls the plan before owed, which this one keeps; `skip_reason`: the rows are
    `skipped` from the start)."""
    appointment_id, starts_at, timezone = appointment["id"], appointment["starts_at"], appointment["timezone"]
    plan = plan_reminders(
        starts_at=starts_at,
        zone=ZoneInfo(timezone),
        window=planning.call_window,
        now=now,
        offsets=planning.offsets,
        explicit=[datetime.fromisoformat(t) for t in remind_at] if remind_at is not None else None,
        owed=owed,
        spacing=planning.spacing,
    )
    # the words are fixed now: every call of these reminders says the same, whatever changes later
    wording = planning.templates.render(
        appointment["language"], appointment["customer_name"], starts_at, timezone
    ).to_json()
    rows = [reminder_row(appointment_id, due, wording, now, plan=plan_number, skip_reason=skip_reason)
            for due in plan.due_times]
    return rows, plan.unplanned


def _reminder_view(row: Mapping[str, Any]) -> ReminderView:
    return {"id": row["id"], "due_at": row["due_at"], "status": row["status"], "attempts": 0, "last_error": None,
            "skip_reason": row["skip_reason"], "sent_at": None, "provider_call_id": None, "outcome": None,
            "answered_at": None}


def _unplanned(unplanned: Sequence[Unplanned]) -> list[dict[str, str]]:
    return [{"rule": u.rule, "reason": u.reason} for u in unplanned]


def _select_one(connection: Connection, appointment_id: str, *, lock: bool = False) -> AppointmentView:
    """The appointment; with `lock`, its row locked until the transaction ends (PostgreSQL; SQLite
    locks the whole file on the first write anyway)."""
    if "\x00" in appointment_id:  # no id holds one, and PostgreSQL would refuse the query (a 503)
        raise AppointmentNotFound("appointment not found")
    statement = _ONE_FOR_UPDATE if lock and connection.dialect.name != "sqlite" else _ONE
    rows = connection.execute(statement, {"appointment_id": appointment_id}).all()
    if not rows:
        raise AppointmentNotFound(f"appointment {appointment_id} not found")
    return _views(rows)[0]


def _select_one_expected(connection: Connection, appointment_id: str,
                         expected: Collection[int] | None) -> AppointmentView:
    """The appointment, its row locked for the transaction: PreconditionFailed if `expected` is given
    and does not hold its version, checked by a conditional UPDATE before the read (so the read and
    every write after it see the version that matched); AppointmentNotFound comes first."""
    held = expected is None or ("\x00" not in appointment_id and plans.hold_version(connection, appointment_id,
                                                                                      expected))
    view = _select_one(connection, appointment_id, lock=True)
    if not held:
        raise PreconditionFailed("If-Match names none of the appointment's current ETag (a weak one never "
                                 "matches): nothing changed, read it again")
    return view


def _select_page(connection: Connection, statement: Select[Any], params: dict[str, Any]) -> list[AppointmentView]:
    return _views(connection.execute(statement, params).all())


# -- the operations -----------------------------------------------------------------------------


async def read(db: Database, appointment_id: str) -> AppointmentView:
    """The appointment with its reminders, in one SELECT outside a transaction (AppointmentNotFound if none)."""
    return await db.read(_select_one, appointment_id)


async def create(db: Database, new: NewAppointment, planning: PlanningConfig) -> AppointmentView:
    """Store an appointment with its planned reminders (one INSERT statement on PostgreSQL);
    the view's `unplanned` says what could not be planned, and why. A number on the do-not-call
    list is accepted, its reminders `skipped` ("opted out")."""
    _check_phone(new.phone, planning)
    _check_remind_at(new.remind_at, new.starts_at, planning)
    language = new.language or planning.templates.default_language
    _check_language(language, planning)
    hasher = await consent.phone_hasher(db)
    now = utcnow()
    values = {
        "id": new_id(), "customer_name": new.customer_name, "phone": new.phone, "phone_hash": hasher(new.phone),
        "starts_at": new.starts_at.astimezone(UTC),  # as every later read returns it
        "timezone": new.timezone, "notes": new.notes,
        "remind_at": [t.isoformat() for t in new.remind_at] if new.remind_at is not None else None,
        "status": AppointmentStatus.SCHEDULED, "language": language, "created_at": now, "updated_at": now,
    }
    reminders, unplanned = _plan(values, values["remind_at"], planning, now)
    if await db.write_one(insert_appointment, values, reminders):
        reminders = [{**row, "status": ReminderStatus.SKIPPED, "skip_reason": OPTED_OUT} for row in reminders]
        SKIPPED_BY_CONSENT.labels("opted_out").inc(len(reminders))
    if log.isEnabledFor(logging.INFO):
        log.info("appointment %s created by %s for %s: %d reminder(s)%s, %d unplanned", values["id"], actor(),
                 mask_phone(new.phone), len(reminders),
                 " skipped (the number opted out)" if reminders and reminders[0]["skip_reason"] else "", len(unplanned))
    return {
        "id": values["id"], "customer_name": new.customer_name, "phone": new.phone, "starts_at": values["starts_at"],
        "timezone": new.timezone, "notes": new.notes, "status": AppointmentStatus.SCHEDULED,
        "language": language, "confirmation": None, "remind_at": new.remind_at or None,
        "reminders": [_reminder_view(r) for r in reminders],
        "unplanned": _unplanned(unplanned), "created_at": now, "updated_at": now, "erased_at": None, "version": 1,
    }


async def list_page(
    db: Database,
    *,
    limit: int,
    status: AppointmentStatus | None = None,
    confirmation: Confirmation | None = None,
    starts_after: datetime | None = None,
    starts_before: datetime | None = None,
    after: tuple[datetime, str] | None = None,
) -> Page:
    """Up to `limit` appointments ordered by (starts_at, id), after the (starts_at, id) `after`,
    with their reminders: one SELECT outside a transaction."""
    statement = _page_statement(status is not None, confirmation is not None, starts_after is not None,
                                starts_before is not None, after is not None)
    params: dict[str, Any] = {"limit": limit + 1, "status": status, "confirmation": confirmation,
                              "starts_after": starts_after, "starts_before": starts_before}
    if after is not None:
        params["cursor_starts_at"], params["cursor_id"] = after
    views = await db.read(_select_page, statement, params)
    return Page(views[:limit], len(views) > limit)


async def change(
    db: Database, appointment_id: str, changes: Mapping[str, Any], planning: PlanningConfig, *,
    expected: Collection[int] | None = None,
) -> AppointmentView:
    """Apply `changes` (field → new value); a change to what a call says or when re-plans the
    pending reminders under new keys. AppointmentCancelled if the appointment is cancelled;
    PreconditionFailed, nothing changed, if `expected` (versions) does not hold its version."""
    _check_phone(changes.get("phone"), planning)
    hasher = await consent.phone_hasher(db)
    view, replanned = await db.write(_change, appointment_id, changes, planning, hasher, expected)
    log.info("appointment %s changed by %s (%s)%s", view["id"], actor(), ", ".join(sorted(changes)),
             ", re-planned" if replanned else "")
    return view


def _change(
    connection: Connection, appointment_id: str, changes: Mapping[str, Any], planning: PlanningConfig,
    hasher: PhoneHasher, expected: Collection[int] | None,
) -> tuple[AppointmentView, bool]:
    view = _select_one_expected(connection, appointment_id, expected)
    if view["status"] == AppointmentStatus.CANCELLED:
        raise AppointmentCancelled("appointment is cancelled")
    if view["erased_at"] is not None:
        raise AppointmentCancelled("the appointment's personal data was erased: it cannot be changed")
    starts_at = changes.get("starts_at", view["starts_at"]).astimezone(UTC)
    _check_remind_at(changes.get("remind_at"), starts_at, planning)
    if "language" in changes:
        _check_language(changes["language"], planning)
    now = utcnow()
    changed = _changed(view, changes, starts_at)
    values = {**changes, "updated_at": now}
    phone_hash = hasher(changes.get("phone", view["phone"]))
    if "starts_at" in changes:
        values["starts_at"] = starts_at
    if "remind_at" in changes:
        remind_at = changes["remind_at"]
        values["remind_at"] = [t.isoformat() for t in remind_at] if remind_at is not None else None
    moved = "starts_at" in changed
    replan = bool(changed & REPLAN_FIELDS)
    # a confirmation was for the old time
    stored_values = {**values, "phone_hash": phone_hash} if "phone" in changes else values
    version, superseded = plans.change_appointment(connection, view["id"], stored_values, now, replan=replan,
                                                   clear_confirmation=moved, source=EventSource.API)
    view.update(values)  # type: ignore[typeddict-item]
    view["version"] = version
    if "remind_at" in changes:
        view["remind_at"] = changes["remind_at"] or None
    if moved:
        view["confirmation"] = None
    unplanned: list[Unplanned] = []
    if superseded is not None:
        stored = values["remind_at"] if "remind_at" in values else _stored_remind_at(view)
        # a confirmed appointment re-planned without moving (a new name, a language) stays confirmed
        confirmed = view["confirmation"] == Confirmation.CONFIRMED and not planning.call_after_confirmation
        reminders, unplanned = _plan(view, stored, planning, now, plan_number=superseded.plan, owed=superseded.owed,
                                     skip_reason=CONFIRMED_BY_CUSTOMER if confirmed else None)
        if plans.insert_plan(connection, phone_hash, reminders):
            reminders = [{**row, "status": ReminderStatus.SKIPPED, "skip_reason": OPTED_OUT} for row in reminders]
        _mark(view, superseded.cancelled, REPLANNED)
        view["reminders"] = sorted(
            [*(r for r in view["reminders"] if r["id"] not in superseded.pruned), *map(_reminder_view, reminders)],
            key=lambda r: (r["due_at"], r["id"]))
    view["unplanned"] = _unplanned(unplanned)
    return view, replan


def _changed(view: AppointmentView, changes: Mapping[str, Any], starts_at: datetime) -> set[str]:
    """The fields of `changes` whose value differs from the appointment's (a PATCH that sends the
    same name re-plans nothing)."""
    changed = set()
    for name, value in changes.items():
        if name == "starts_at":
            differs = starts_at != view["starts_at"]
        elif name == "remind_at":
            old = view["remind_at"]
            differs = (value is None) != (old is None) or (
                value is not None and old is not None and sorted(t.astimezone(UTC) for t in value)
                != sorted(t.astimezone(UTC) for t in old))
        else:
            differs = value != view.get(name)  # type: ignore[misc]
        if differs:
            changed.add(name)
    return changed


def _mark(view: AppointmentView, cancelled: set[str], reason: str) -> None:
    """The view's reminders in `cancelled` as the ledger left them."""
    for reminder in view["reminders"]:
        if reminder["id"] in cancelled:
            reminder["status"], reminder["skip_reason"] = ReminderStatus.CANCELLED, reason


def _stored_remind_at(view: AppointmentView) -> list[str] | None:
    return [t.isoformat() for t in view["remind_at"]] if view["remind_at"] is not None else None


async def cancel(db: Database, appointment_id: str, *, erase: bool = False,
                 expected: Collection[int] | None = None) -> AppointmentView:
    """Cancel an appointment and its pending reminders; cancelling twice is harmless. With `erase`,
    its personal data is erased too, in the same transaction (service.ledger.erasure).
    PreconditionFailed, nothing changed, if `expected` (versions) does not hold its version. The
    view's `version` is the one read before (cancel and erasure raise it)."""
    view, cancelled, erased = await db.write(_cancel, appointment_id, erase, expected)
    if erased:
        PERSONAL_DATA_ERASED.labels("request").inc()
    if cancelled or erased:
        log.info("appointment %s %s by %s", view["id"],
                 "cancelled and erased" if cancelled and erased else "cancelled" if cancelled else "erased", actor())
    return view


def _cancel(connection: Connection, appointment_id: str, erase: bool,
            expected: Collection[int] | None) -> tuple[AppointmentView, bool, bool]:
    view = _select_one_expected(connection, appointment_id, expected)
    now = utcnow()
    cancelled = view["status"] != AppointmentStatus.CANCELLED
    if cancelled:
        removed = cancellation.cancel_appointment(connection, view["id"], CANCELLED_BY_API, now,
                                                  source=EventSource.API)
        view["status"], view["updated_at"] = AppointmentStatus.CANCELLED, now
        _mark(view, removed, CANCELLED_BY_API)
    erased = erase and erasure.erase_appointment(connection, view["id"], now)
    if erased:
        view.update({"customer_name": erasure.ERASED, "phone": erasure.ERASED, "notes": None, "erased_at": now,
                     "updated_at": now})
        for reminder in view["reminders"]:
            reminder["last_error"] = None
    return view, cancelled, erased
