"""Appointments over HTTP: create, list, read, change and cancel (service.appointments does the work)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import TypeAdapter

from service import appointments
from service.api.conditional import (
    ETAG_DOC,
    IF_MATCH_DOC,
    IF_MATCH_MAX_LENGTH,
    IF_MATCH_PATTERN,
    etag,
    expected_versions,
)
from service.api.deps import invalid
from service.api.schemas import (
    PLAIN_DIGITS,
    TIME_RULE,
    AppointmentCreate,
    AppointmentList,
    AppointmentOut,
    AppointmentPatch,
    AwareDatetime,
    ErrorOut,
)
from service.appointments import AppointmentView
from service.db import Database
from service.db.models import AppointmentStatus, Confirmation
from service.reminders import PlanningConfig

__all__ = ["router"]

router = APIRouter(
    prefix="/appointments",
    tags=["appointments"],
    responses={
        400: {"model": ErrorOut, "description": "Malformed request"},
        401: {"model": ErrorOut, "description": "Missing or invalid bearer token (when API_TOKEN is set)"},
        413: {"model": ErrorOut, "description": "Request body over 64 KiB"},
        422: {"description": "Invalid input; `detail` names each field"},
        503: {"model": ErrorOut, "description": "The database is unavailable"},
    },
)

_NOT_FOUND = {404: {"model": ErrorOut, "description": "No appointment with this id"}}
_ETAG_HEADER = {"ETag": {"description": ETAG_DOC, "schema": {"type": "string", "pattern": r'^"[1-9][0-9]*"$'}}}
_WITH_ETAG = {"description": "The appointment, with its reminders", "headers": _ETAG_HEADER}
# If-Match in the OpenAPI: not a parameter of the routes, which read and check every line of it
# themselves (expected_versions).
_IF_MATCH = {"parameters": [{
    "name": "If-Match", "in": "header", "required": False, "description": IF_MATCH_DOC,
    "schema": {"type": "string", "pattern": IF_MATCH_PATTERN, "maxLength": IF_MATCH_MAX_LENGTH},
}]}

# OpenAPI links: what a client (or a stateful fuzzer) can do with a created appointment's id.
_BY_ID = {"appointment_id": "$response.body#/id"}
_CREATED_LINKS = {
    201: {
        "description": "The appointment, with its planned reminders",
        "headers": _ETAG_HEADER,
        "links": {
            "GetAppointment": {"operationId": "getAppointment", "parameters": _BY_ID},
            "PatchAppointment": {"operationId": "patchAppointment",
                                 "parameters": {**_BY_ID, "header.If-Match": "$response.header.ETag"}},
            "CancelAppointment": {"operationId": "cancelAppointment", "parameters": _BY_ID},
        },
    }
}


@contextmanager
def _as_http() -> Iterator[None]:
    """The service layer's errors as HTTP answers: 404, 409, 422 naming the body field."""
    try:
        yield
    except appointments.AppointmentNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(error)) from None
    except appointments.AppointmentCancelled as error:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(error)) from None
    except appointments.InvalidField as error:
        raise invalid(("body", *error.field), error.message, error.value) from None
    except appointments.PreconditionFailed as error:
        raise HTTPException(status.HTTP_412_PRECONDITION_FAILED, detail=str(error)) from None


def _db(request: Request) -> Database:
    return request.app.state.db


def _planning(request: Request) -> PlanningConfig:
    return request.app.state.settings.planning_config()


# The routes answer the service layer's views (plain dictionaries): validated ONCE against the
# response model, then written by orjson, which writes the bytes pydantic would (same field order,
# datetimes with `Z` for UTC) in a quarter of the time. `response_model` stays for the OpenAPI.
# They take the Request instead of session and settings dependencies: each dependency costs a
# solve per request (docs/decisions/0161-api-at-database-speed.md).
_APPOINTMENT: TypeAdapter[AppointmentOut] = TypeAdapter(AppointmentOut)
_PAGE: TypeAdapter[AppointmentList] = TypeAdapter(AppointmentList)


def _answer(model: TypeAdapter[Any], content: Any, status_code: int = status.HTTP_200_OK,
            headers: dict[str, str] | None = None) -> Response:
    model.validate_python(content)  # the one validation: a view that does not fit is a bug (a 500)
    return Response(orjson.dumps(content, option=orjson.OPT_UTC_Z), status_code, headers,
                    media_type="application/json")


def _one(view: AppointmentView, status_code: int = status.HTTP_200_OK, *, with_etag: bool = True) -> Response:
    """One appointment; its version as the ETag header, not in the body."""
    version = view.pop("version")  # type: ignore[misc]
    return _answer(_APPOINTMENT, view, status_code, {"ETag": etag(version)} if with_etag else None)


def _expected(request: Request) -> frozenset[int] | None:
    return expected_versions(request.headers.getlist("if-match"))


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=AppointmentOut, operation_id="createAppointment",
    responses=_CREATED_LINKS,
)
async def create_appointment(body: AppointmentCreate, request: Request) -> Response:
    """Create an appointment and plan its reminders."""
    with _as_http():
        created = await appointments.create(
            _db(request), appointments.NewAppointment(**body.model_dump()), _planning(request)
        )
    return _one(created, status.HTTP_201_CREATED)


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


def _encode_cursor(appointment: AppointmentView) -> str:
    raw = json.dumps([appointment["starts_at"].isoformat(), appointment["id"]]).encode()
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
    request: Request,
    status_: Annotated[AppointmentStatus | None, Query(alias="status")] = None,
    confirmation: Annotated[Confirmation | None, Query(description="The customer's keypad answer")] = None,
    starts_after: Annotated[AwareDatetime | None, Query(description=f"Strictly after. {TIME_RULE}.")] = None,
    starts_before: Annotated[AwareDatetime | None, Query(description=f"Strictly before. {TIME_RULE}.")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Plain digits, 1-500"), PLAIN_DIGITS] = 100,
    cursor: Annotated[str | None, Query(max_length=512, pattern=r"^[A-Za-z0-9_-]+$", description=_CURSOR_DOC)] = None,
) -> Response:
    """Appointments ordered by start time, a page at a time."""
    page = await appointments.list_page(
        _db(request), limit=limit, status=status_, confirmation=confirmation, starts_after=starts_after,
        starts_before=starts_before,
        after=_decode_cursor(cursor) if cursor is not None else None,
    )
    for item in page.items:
        del item["version"]  # type: ignore[misc]
    return _answer(_PAGE, {"items": page.items, "next_cursor": _encode_cursor(page.items[-1]) if page.more else None})


@router.get("/{appointment_id}", response_model=AppointmentOut, responses={200: _WITH_ETAG, **_NOT_FOUND},
            operation_id="getAppointment")
async def get_appointment(appointment_id: str, request: Request) -> Response:
    """One appointment with its reminders; its version in the `ETag` header."""
    with _as_http():
        return _one(await appointments.read(_db(request), appointment_id))


_PRECONDITION = {
    412: {"model": ErrorOut, "description": "If-Match names none of the appointment's current ETag: nothing changed"}
}


@router.patch(
    "/{appointment_id}",
    response_model=AppointmentOut,
    operation_id="patchAppointment",
    openapi_extra=_IF_MATCH,
    responses={200: _WITH_ETAG, **_NOT_FOUND, **_PRECONDITION,
               409: {"model": ErrorOut, "description": "The appointment is cancelled or erased"}},
)
async def patch_appointment(appointment_id: str, body: AppointmentPatch, request: Request) -> Response:
    """Change an appointment; a change to what a call says or when (all fields but `notes`) re-plans its
    pending reminders under new idempotency keys. With `If-Match`, only if it is still at that version."""
    expected = _expected(request)
    with _as_http():
        changed = await appointments.change(
            _db(request), appointment_id, body.model_dump(exclude_unset=True), _planning(request), expected=expected
        )
    return _one(changed)


@router.delete(
    "/{appointment_id}", response_model=AppointmentOut, responses={**_NOT_FOUND, **_PRECONDITION},
    operation_id="cancelAppointment", openapi_extra=_IF_MATCH,
)
async def cancel_appointment(
    appointment_id: str, request: Request,
    erase: Annotated[bool, Query(description="Also erase its personal data now: name, number, notes, the calls' "
                                             "words (the appointment and its reminders' outcomes stay)")] = False,
) -> Response:
    """Cancel an appointment: its pending reminders become `cancelled`. Cancelling twice is harmless;
    `erase=true` erases its personal data too (also after an earlier cancel). With `If-Match`, only if it
    is still at that version. The answer carries no ETag: read the appointment for the next one."""
    expected = _expected(request)
    with _as_http():
        cancelled = await appointments.cancel(_db(request), appointment_id, erase=erase, expected=expected)
    return _one(cancelled, with_etag=False)
