"""The do-not-call list: numbers that are never called again (docs/decisions/0231).

The list holds a keyed hash of each number (HMAC-SHA256 under a key the service generated and
keeps in the database), how it was listed and when: enough for an exact lookup, not the number.
Appointments carry the same hash of their number (`phone_hash`), so the leader's claim and the
last check before a create (`AttemptStore.begin`) find a listed number in SQL.

Listing a number, skipping ("opted out") every unfinished reminder of its appointments and the
events saying so are one transaction (`list_number`); a call already placed binds nothing after
it (the leader's sweep ends it, or the answer hangs up). Removing a number from the list changes
no reminder: the ones skipped stay skipped, new ones call.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import weakref
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import delete, exists, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from service.db import Database
from service.db.clock import db_now
from service.db.models import Appointment, DoNotCall, ServiceKey
from service.ledger import events
from service.ledger.cancellation import skip_number
from service.ledger.events import EventSource
from service.metrics import OPT_OUTS, SKIPPED_BY_CONSENT
from service.privacy import mask_phone

__all__ = [
    "APPOINTMENT_LISTED", "PHONE_KEY", "Listing", "ListingSource", "PhoneHasher", "add", "hash_phone", "is_listed",
    "list_number", "listed", "listed_since", "number_listed", "phone_hasher", "unlist",
]

PHONE_KEY = "phone_hash"


class ListingSource(StrEnum):
    KEYPAD = "keypad"  # the customer pressed OPT_OUT_DIGIT on a reminder call
    API = "api"  # PUT /do-not-call/{phone}


class PhoneHasher:
    """The keyed hash of an E.164 number (64 hex characters)."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()

    def __call__(self, phone: str) -> str:
        return hmac.new(self._key, phone.encode(), hashlib.sha256).hexdigest()


_HASHERS: weakref.WeakKeyDictionary[Database, PhoneHasher] = weakref.WeakKeyDictionary()


async def phone_hasher(db: Database) -> PhoneHasher:
    """The database's phone hasher (its key read once per process; made if the database has none)."""
    hasher = _HASHERS.get(db)
    if hasher is None:
        hasher = PhoneHasher(await db.write(_phone_key))
        _HASHERS[db] = hasher
    return hasher


def _phone_key(connection: Connection) -> str:
    insert = postgresql.insert if connection.dialect.name != "sqlite" else sqlite.insert
    connection.execute(insert(ServiceKey).values(name=PHONE_KEY, value=secrets.token_hex(32))
                       .on_conflict_do_nothing(index_elements=[ServiceKey.name]))
    return connection.execute(select(ServiceKey.value).where(ServiceKey.name == PHONE_KEY)).scalar_one()


def hash_phone(connection: Connection, phone: str) -> str:
    """The keyed hash of `phone`, its key read in the caller's transaction (a row stored before
    appointments carried their hash)."""
    return PhoneHasher(_phone_key(connection))(phone)


def number_listed(phone_hash: object) -> ColumnElement[bool]:
    """A WHERE clause: the number whose hash is `phone_hash` (a column or a value) is listed."""
    return exists().where(DoNotCall.phone_hash == phone_hash)


def is_listed(connection: Connection, phone_hash: str) -> bool:
    return connection.execute(select(number_listed(phone_hash))).scalar_one()


@dataclass(frozen=True)
class Listing:
    listed_at: datetime
    source: ListingSource
    new: bool = False  # this request listed it
    skipped: frozenset[str] = frozenset()  # reminders this listing skipped ("opted out")


def list_number(connection: Connection, phone_hash: str, source: ListingSource, masked_phone: str, *,
                event_source: EventSource | None = None) -> Listing:
    """List the number (if it is not yet) and skip every unfinished reminder of its appointments,
    in the caller's transaction; a new listing emits `phone.opted_out` (with `masked_phone`), its
    source `event_source` (by default the listing's)."""
    event_source = event_source or EventSource(source.value)
    insert = postgresql.insert if connection.dialect.name != "sqlite" else sqlite.insert
    added = connection.execute(
        insert(DoNotCall).values(phone_hash=phone_hash, source=source, listed_at=db_now())
        .on_conflict_do_nothing(index_elements=[DoNotCall.phone_hash]).returning(DoNotCall.listed_at)
    ).first()
    now = connection.execute(select(db_now())).scalar_one()
    rows = skip_number(connection, phone_hash, now)
    skipped = frozenset(row.id for row in rows)
    opted = events.opted_out(connection, phone_hash, masked_phone, event_source, now) if added is not None else []
    events.insert(connection, [*opted, *events.finished_rows(rows, event_source, now)])
    if added is not None:
        return Listing(added.listed_at, source, new=True, skipped=skipped)
    row = connection.execute(select(DoNotCall.listed_at, DoNotCall.source)
                             .where(DoNotCall.phone_hash == phone_hash)).one()
    return Listing(row.listed_at, ListingSource(row.source), skipped=skipped)


async def listed(db: Database, phone: str) -> Listing | None:
    """The number's listing, or None."""
    phone_hash = (await phone_hasher(db))(phone)
    row = await db.read(lambda connection: connection.execute(
        select(DoNotCall.listed_at, DoNotCall.source).where(DoNotCall.phone_hash == phone_hash)).first())
    return None if row is None else Listing(row.listed_at, ListingSource(row.source))


async def add(db: Database, phone: str, source: ListingSource = ListingSource.API) -> Listing:
    """List `phone` (E.164) and skip its unfinished reminders (one transaction)."""
    phone_hash = (await phone_hasher(db))(phone)
    listing = await db.write(list_number, phone_hash, source, mask_phone(phone))
    if listing.new:
        OPT_OUTS.labels(source.value).inc()
    if listing.skipped:
        SKIPPED_BY_CONSENT.labels("opted_out").inc(len(listing.skipped))
    return listing


async def unlist(db: Database, phone: str) -> bool:
    """Take `phone` off the list; whether it was on it. Its skipped reminders stay skipped."""
    phone_hash = (await phone_hasher(db))(phone)

    def remove(connection: Connection) -> bool:
        return connection.execute(delete(DoNotCall).where(DoNotCall.phone_hash == phone_hash)).rowcount == 1

    return await db.write(remove)


async def listed_since(db: Database, since: datetime) -> frozenset[str]:
    """The hashes of the numbers listed at or after `since` (the database's clock)."""
    rows = await db.read(lambda connection: connection.execute(
        select(DoNotCall.phone_hash).where(DoNotCall.listed_at >= since)).scalars().all())
    return frozenset(rows)


# the appointments' column, for the ledger's claims and attempts
APPOINTMENT_LISTED = number_listed(Appointment.phone_hash)
