"""The events' outbox after the insert (service.ledger.events): the feed's numbering, the delivery's
bookkeeping and the retention — the leader's writes, each under its fence — and the reads of the
feed (`feed`, any replica) and of the backlog (`backlog`, every replica's gauges).

Positions: the leader numbers the events it can see, in one short transaction at a time that holds
the feed's row (`number`). An event whose transaction commits late is not visible yet, so it gets a
later position than every event numbered before it: a reader that pages by position never skips
one (docs/decisions/0251). The feed and the delivery see numbered events only.

Delivery, in order per appointment: a head is the appointment's pending event with the lowest
position (an event without an appointment is its own head); later events of the appointment wait
until it is delivered or given up. The delivering code (service.dispatch.events) knows HTTP; this
module the rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, bindparam, delete, exists, func, literal_column, or_, select, update
from sqlalchemy.engine import Connection

from service.db import Database
from service.db.clock import db_now
from service.db.models import FEED_ROW, Event, EventFeed
from service.ledger.fence import StaleTerm, fence_holds

__all__ = ["Backlog", "Delivery", "FeedPage", "Head", "OutboxStore", "backlog", "endpoint_key", "feed", "resume"]

_E, _F = Event.__table__, EventFeed.__table__
_EARLIER = _E.alias("earlier")


def endpoint_key(url: str) -> str:
    """What the outbox records of an endpoint that answered 410: a hash of EVENTS_URL (a new URL
    is a new endpoint; the URL itself may carry a token)."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


class Delivery:
    """An event's delivery state (`events.delivery`)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    GIVEN_UP = "given_up"


# literal in the SQL, so PostgreSQL matches the partial indexes' predicate
_PENDING = literal_column(f"'{Delivery.PENDING}'")
_ERROR_LEN = 200


@dataclass(frozen=True)
class Head:
    """An event due for a delivery try: the oldest pending one of its appointment."""

    id: str
    appointment_id: str | None
    body: str
    created_at: datetime
    attempts: int
    now: datetime  # the database's time when it was read


@dataclass(frozen=True)
class FeedPage:
    bodies: list[str]  # the events' JSON, in feed order
    last: int | None  # the position of the last one (None: none)
    pruned_through: int  # positions up to this one were pruned
    last_position: int  # the newest position given


@dataclass(frozen=True)
class Backlog:
    depth: int  # events not delivered nor given up
    oldest_seconds: float  # the age of the oldest of them (0: none)
    gone: bool  # the endpoint answered 410: delivery to it is stopped


def _lock_feed(connection: Connection, token: int) -> Any:
    """The feed's row, locked until the transaction ends (one writer of positions at a time);
    StaleTerm when the fence is no longer `token`."""
    row = connection.execute(
        update(_F).where(_F.c.id == FEED_ROW, fence_holds(token)).values(last_position=_F.c.last_position)
        .returning(_F.c.last_position, _F.c.pruned_through)
    ).first()
    if row is None:
        raise StaleTerm(f"the fence moved past token {token}")
    return row


_NUMBER = update(_E).where(_E.c.seq == bindparam("b_seq"), _E.c.position.is_(None)).values(
    position=bindparam("b_position"))
_HEADS = (
    select(_E.c.id, _E.c.appointment_id, _E.c.body, _E.c.created_at, _E.c.attempts, db_now().label("now"))
    .where(_E.c.delivery == _PENDING, _E.c.position.is_not(None),
           or_(_E.c.next_try_at.is_(None), _E.c.next_try_at <= db_now()),
           ~exists().where(_EARLIER.c.appointment_id == _E.c.appointment_id, _EARLIER.c.delivery == _PENDING,
                           _EARLIER.c.position < _E.c.position))
    .order_by(_E.c.position)
    .limit(bindparam("limit"))
)


def _finish(event_id: str, token: int) -> Any:
    """UPDATE of one pending event's delivery, only while the fence is `token`."""
    return update(_E).where(_E.c.id == event_id, _E.c.delivery == _PENDING, fence_holds(token))


# A delivery taken (`_finish` with bind parameters `event_id` and `token`), built once: the relay
# marks every event it delivers.
_DELIVERED = (
    update(_E).where(_E.c.id.in_(bindparam("event_ids", expanding=True)), _E.c.delivery == _PENDING,
                     fence_holds(bindparam("token", type_=BigInteger)))
    .values(delivery=Delivery.DELIVERED, delivered_at=db_now(), attempts=_E.c.attempts + 1, last_error=None)
    .returning(_E.c.id)
)


class OutboxStore:
    """The leader's writes of the outbox, each fenced by its term's token."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def unnumbered(self) -> tuple[bool, str | None]:
        """(whether events wait for a position, the endpoint key that answered 410 or None)."""
        waiting = exists().where(_E.c.position.is_(None))
        row = await self.db.read(lambda connection: connection.execute(
            select(waiting.label("waiting"), _F.c.gone_endpoint).where(_F.c.id == FEED_ROW)).one())
        return bool(row.waiting), row.gone_endpoint

    async def number(self, token: int, *, batch: int = 1000) -> int:
        """Give up to `batch` visible events without a position the next positions, in the order
        they were inserted; how many. StaleTerm when the fence moved on."""

        def work(connection: Connection) -> int:
            base = _lock_feed(connection, token).last_position
            seqs = connection.execute(
                select(_E.c.seq).where(_E.c.position.is_(None)).order_by(_E.c.seq).limit(batch)).scalars().all()
            if not seqs:
                return 0
            connection.execute(_NUMBER, [{"b_seq": seq, "b_position": base + i} for i, seq in enumerate(seqs, 1)])
            connection.execute(update(_F).where(_F.c.id == FEED_ROW).values(last_position=base + len(seqs)))
            return len(seqs)

        return await self.db.write(work)

    async def heads(self, limit: int) -> list[Head]:
        """Up to `limit` heads due for a try (their retry time has come), in feed order."""
        rows = await self.db.read(lambda connection: connection.execute(_HEADS, {"limit": limit}).all())
        return [Head(*row) for row in rows]

    async def delivered(self, token: int, event_ids: Collection[str]) -> set[str]:
        """The receiver took them (a 2xx each), in one statement: the ids marked delivered. One
        missing: the fence moved on (the next term sends it again) or it is no longer pending."""
        return await self.db.write_one(lambda connection: set(
            connection.execute(_DELIVERED, {"event_ids": list(event_ids), "token": token}).scalars()))

    async def give_up(self, token: int, event_id: str, reason: str) -> bool:
        """No more tries: EVENTS_MAX_AGE passed before the next one. An event tried before keeps its
        last try's error (what an operator needs); `reason` is recorded only for one never tried."""
        return await self._write(_finish(event_id, token).values(
            delivery=Delivery.GIVEN_UP, last_error=func.coalesce(_E.c.last_error, reason[:_ERROR_LEN])))

    async def failed(self, token: int, event_id: str, error: str, *, retry_in: timedelta,
                     max_age: timedelta) -> str | None:
        """A try that failed: tried again `retry_in` later, if that is still within `max_age` after
        the event; else given up now. Delivery.PENDING (a retry), Delivery.GIVEN_UP, or None when
        the fence moved on."""

        def work(connection: Connection) -> str | None:
            row = connection.execute(select(_E.c.created_at, db_now().label("now")).where(_E.c.id == event_id)).first()
            if row is None:
                return None
            if row.now + retry_in >= row.created_at + max_age:
                values: dict[str, Any] = {"delivery": Delivery.GIVEN_UP}
            else:
                values = {"next_try_at": row.now + retry_in}
            done = connection.execute(_finish(event_id, token).values(
                attempts=_E.c.attempts + 1, last_error=error[:_ERROR_LEN], **values))
            if done.rowcount != 1:
                return None
            return values.get("delivery", Delivery.PENDING)

        return await self.db.write(work)

    async def gone(self, endpoint: str) -> None:
        """The endpoint (a key of EVENTS_URL) answered 410: no more deliveries to it (`resume`)."""
        await self._write(update(_F).where(_F.c.id == FEED_ROW).values(gone_endpoint=endpoint, gone_at=db_now()))

    async def prune(self, token: int, retention: timedelta, *, batch: int = 5000) -> int:
        """Delete up to `batch` events older than `retention`, oldest positions first, and move the
        feed's pruned mark (a cursor below it is too old); how many."""

        def work(connection: Connection) -> int:
            pruned = _lock_feed(connection, token).pruned_through
            top = connection.execute(select(func.max(_E.c.position)).where(
                _E.c.created_at < db_now(-retention), _E.c.position.is_not(None))).scalar()
            if top is None or top <= pruned:
                return 0
            upto = min(top, pruned + batch)
            deleted = connection.execute(delete(_E).where(_E.c.position <= upto)).rowcount
            connection.execute(update(_F).where(_F.c.id == FEED_ROW).values(pruned_through=upto))
            return int(deleted or 0)

        return await self.db.write(work)

    async def _write(self, statement: Any) -> bool:
        """One fenced UPDATE (atomic on its own: no transaction of its own on PostgreSQL); True if it wrote its row."""
        return await self.db.write_one(lambda connection: connection.execute(statement).rowcount == 1)


async def resume(db: Database) -> bool:
    """Deliver again to an endpoint that answered 410; whether one was stopped."""
    return await db.write(lambda connection: connection.execute(
        update(_F).where(_F.c.id == FEED_ROW, _F.c.gone_endpoint.is_not(None))
        .values(gone_endpoint=None, gone_at=None)).rowcount == 1)


def _feed_statement(after: bool) -> Any:
    lower = bindparam("after") if after else _F.c.pruned_through
    return (
        select(_F.c.pruned_through, _F.c.last_position, _E.c.position, _E.c.body)
        .select_from(_F.outerjoin(_E, _E.c.position > lower))
        .where(_F.c.id == FEED_ROW)
        .order_by(_E.c.position)
        .limit(bindparam("limit"))
    )


_FEED = {True: _feed_statement(True), False: _feed_statement(False)}


async def feed(db: Database, after: int | None, limit: int) -> FeedPage:
    """Up to `limit` numbered events after position `after` (None: from the oldest kept), in one
    statement: the page and the feed's marks are one snapshot."""
    params = {"limit": limit} if after is None else {"limit": limit, "after": after}
    rows: Sequence[Any] = await db.read(lambda connection: connection.execute(_FEED[after is not None], params).all())
    first = rows[0]
    bodies = [row.body for row in rows if row.position is not None]
    last = rows[-1].position if bodies else None
    return FeedPage(bodies, last, first.pruned_through, first.last_position)


async def backlog(db: Database, endpoint: str) -> Backlog:
    """The events still to deliver to `endpoint` (a key of EVENTS_URL) and the age of the oldest."""
    gone = select(_F.c.gone_endpoint).where(_F.c.id == FEED_ROW).scalar_subquery()
    row = await db.read(lambda connection: connection.execute(
        select(func.count(), func.min(_E.c.created_at), db_now(), gone).where(_E.c.delivery == _PENDING)).one())
    depth, oldest, now, gone_endpoint = row
    age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
    return Backlog(int(depth), age, gone_endpoint == endpoint)
