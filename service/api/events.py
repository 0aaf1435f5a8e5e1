"""The events' feed over HTTP: `GET /events?after=<cursor>&limit=`, for those who pull rather than
receive them at EVENTS_URL (service.ledger.outbox; docs/decisions/0251)."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated

import orjson
from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from service.api.deps import invalid
from service.api.schemas import ErrorOut, EventPage
from service.ledger import outbox

__all__ = ["router"]

router = APIRouter(
    prefix="/events",
    tags=["events"],
    responses={
        401: {"model": ErrorOut, "description": "Missing or invalid bearer token (when API_TOKEN is set)"},
        422: {"description": "A malformed `after` or `limit`; `detail` names it"},
        503: {"model": ErrorOut, "description": "The database is unavailable"},
    },
)

_CURSOR = re.compile(r"p([0-9]{1,18})")
_CURSOR_DOC = ("Opaque: the `next_cursor` of the previous page, passed back unchanged (URL-safe base64). "
               "None: from the oldest event kept.")


def _encode(position: int) -> str:
    return base64.urlsafe_b64encode(f"p{position}".encode()).decode().rstrip("=")


def _decode(cursor: str) -> int:
    try:
        match = _CURSOR.fullmatch(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii"))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        match = None
    if match is None:
        raise invalid(("query", "after"), "malformed cursor: pass back a next_cursor unchanged", cursor)
    return int(match[1])


@router.get(
    "", response_model=EventPage, operation_id="listEvents",
    responses={410: {"model": ErrorOut, "description": "`after` is older than EVENTS_RETENTION: events after it "
                                                       "were deleted; start again without `after`"}},
)
async def list_events(
    request: Request,
    after: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description=_CURSOR_DOC)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    """Events in a stable order, a page at a time; an event committed late comes after the cursor
    of every page read before it was visible, never before."""
    position = _decode(after) if after is not None else None
    page = await outbox.feed(request.app.state.db, position, limit)
    if position is not None and position > page.last_position:
        raise invalid(("query", "after"), "not a cursor of this feed", after)
    if position is not None and position < page.pruned_through:
        raise HTTPException(status.HTTP_410_GONE, detail="the cursor is older than EVENTS_RETENTION: events after it "
                                                         "were deleted; start again without `after`")
    following = page.last if page.last is not None else position if position is not None else page.pruned_through
    content = b'{"events":[' + b",".join(body.encode() for body in page.bodies) + b'],"next_cursor":' + orjson.dumps(
        _encode(following)) + b"}"
    return Response(content, media_type="application/json")
