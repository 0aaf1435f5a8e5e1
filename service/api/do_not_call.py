"""The do-not-call list over HTTP: `PUT`, `GET` and `DELETE /do-not-call/{phone}` (E.164; the `+`
as it is or as `%2B`). Listing a number skips every unfinished reminder of its appointments; a
listed number is never called again (service.ledger.consent)."""

from __future__ import annotations

import logging
from typing import Annotated

import orjson
from fastapi import APIRouter, HTTPException, Path, Request, Response, status

from service.api.deps import invalid
from service.api.schemas import DoNotCallOut, ErrorOut
from service.ledger import consent
from service.logs import actor
from service.privacy import E164_PATTERN, mask_phone
from service.reminders import ReminderError, parse_phone

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/do-not-call",
    tags=["do-not-call"],
    responses={
        401: {"model": ErrorOut, "description": "Missing or invalid bearer token (when API_TOKEN is set)"},
        422: {"description": "Not an E.164 number; `detail` names the path parameter"},
        503: {"model": ErrorOut, "description": "The database is unavailable"},
    },
)

PhonePath = Annotated[str, Path(description="E.164, a valid number (`+` or `%2B`)", examples=["+14155552671"],
                                 pattern=f"^{E164_PATTERN}$")]


def _number(phone: str) -> str:
    try:
        return parse_phone(phone.strip())
    except ReminderError as error:
        raise invalid(("path", "phone"), str(error), None) from None


def _answer(phone: str, listing: consent.Listing, status_code: int) -> Response:
    body = DoNotCallOut(phone=phone, listed_at=listing.listed_at, source=listing.source.value,
                        skipped=len(listing.skipped))
    return Response(orjson.dumps(body.model_dump(), option=orjson.OPT_UTC_Z), status_code,
                    media_type="application/json")


@router.put(
    "/{phone}", response_model=DoNotCallOut, status_code=status.HTTP_201_CREATED, operation_id="listNumber",
    responses={200: {"model": DoNotCallOut, "description": "Already on the list (its unfinished reminders skipped)"},
               201: {"description": "Listed now"}},
)
async def list_number(phone: PhonePath, request: Request) -> Response:
    """Never call this number again: its appointments' unfinished reminders are skipped now."""
    number = _number(phone)
    listing = await consent.add(request.app.state.db, number, consent.ListingSource.API)
    log.info("%s put on the do-not-call list by %s%s: %d reminder(s) skipped", mask_phone(number), actor(),
             "" if listing.new else " (listed before)", len(listing.skipped))
    return _answer(number, listing, status.HTTP_201_CREATED if listing.new else status.HTTP_200_OK)


@router.get("/{phone}", response_model=DoNotCallOut, operation_id="getListedNumber",
            responses={404: {"model": ErrorOut, "description": "The number is not on the list"}})
async def get_number(phone: PhonePath, request: Request) -> Response:
    """Whether the number is on the list, since when and how."""
    number = _number(phone)
    listing = await consent.listed(request.app.state.db, number)
    if listing is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="the number is not on the do-not-call list")
    return _answer(number, listing, status.HTTP_200_OK)


@router.delete("/{phone}", status_code=status.HTTP_204_NO_CONTENT, operation_id="unlistNumber")
async def unlist_number(phone: PhonePath, request: Request) -> Response:
    """Take the number off the list: reminders planned from now on call it again (those skipped stay
    skipped). 204 whether or not it was listed."""
    number = _number(phone)
    removed = await consent.unlist(request.app.state.db, number)
    log.info("%s taken off the do-not-call list by %s%s", mask_phone(number), actor(), "" if removed else
             " (it was not on it)")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
