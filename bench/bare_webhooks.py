"""The webhook routes' floors (issue 26): Starlette + one asyncpg pool, the service's signature check
and the same SQL the service's route sends, answering the same body. `python -m bench webhooks`
measures each route of a replica beside its floor (bench/webhooks.py).

Each floor route is served at the service's own path, so the requests `bench/webhooks.py` signed
for the replica's PUBLIC_URL verify here too (the floor checks them against the same PUBLIC_URL):

- `POST /telephony/twilio/status` (`CallStatus=ringing`): `TwilioSignature`, then the ledger's
  one UPDATE (`calls.PROGRESS["ringing"]`) outside a transaction; 204.
- `POST /telephony/twilio/voice` (the first answer, a person): `TwilioSignature`, then in ONE
  transaction the statements of `calls._answer` for an unbound `sent` reminder: the locked SELECT
  (`calls.ANSWERED`), the attempt's UPDATE, the binding (`calls.BIND` … RETURNING) and its
  `reminder.finished` INSERT; the TwiML `<Gather>` with the message and the question.
- `POST /telephony/twilio/gather` (`Digits=1`, round 1, the bound call): `TwilioSignature`, then
  in ONE transaction the statements of `calls._keypad` confirming: the locked SELECT, the keypad
  round's UPDATE, the appointment's UPDATE, `skip_confirmed`'s lock and UPDATE, the
  `appointment.confirmed` INSERT; the TwiML `<Say>` of the confirmation.
- `POST /telephony/telnyx/events` (`call.initiated`): `TelnyxSignature`, the event parsed by the
  service's `parse_event`, then in ONE transaction the event id's INSERT … ON CONFLICT DO NOTHING
  RETURNING and the ledger's UPDATE (`calls.PROGRESS["initiated"]`); 200.
- `GET /appointments/{id}`: the API's read as `bench/bare.py`'s floor makes it (one joined
  SELECT, the same fields), on this Starlette app: the GET that issue 26 measures a call against,
  at its floor beside the webhooks' floors.

Every statement is compiled ONCE at start from the ledger's prebuilt SQLAlchemy statements (or
built exactly as the ledger builds it inline) with the asyncpg dialect: the SQL text is the
service's, sent with positional parameters through SQLAlchemy's own bind processors (JSON, times).
`sql_sequence(route)` lists them; bench/webhooks.py compares that list with what the ledger sends
for the same route (`before_cursor_execute`), so a ledger change that the floor missed shows.

  python -m bench.bare_webhooks --port P --database-url postgresql://… --public-url URL
      [--twilio-token T] [--telnyx-public-key K] [--telnyx-connection-id C]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import asyncpg
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .bare import starlette_read

ROUTES = ("twilio/status", "twilio/voice", "twilio/gather", "telnyx/initiated")
_TWIML = "application/xml"


@dataclass(frozen=True)
class Statement:
    """One statement compiled for asyncpg: its SQL, its parameters' order, defaults and processors."""

    sql: str
    names: tuple[str, ...]
    defaults: dict[str, Any]
    processors: dict[str, Any]
    generated: dict[str, Any]  # columns whose default / onupdate is a Python callable: called per execution

    def args(self, **values: Any) -> list[Any]:
        out = []
        for name in self.names:
            if name in values:
                value = values[name]
            elif name in self.generated:
                value = self.generated[name](None)
            else:
                value = self.defaults[name]
            processor = self.processors.get(name)
            out.append(processor(value) if processor is not None else value)
        return out


def compile_statement(statement: Any, column_keys: list[str] | None = None) -> Statement:
    """`statement` as the asyncpg dialect sends it: its constant IN lists expanded as SQLAlchemy
    expands them at execution (`construct_expanded_state`), the rest positional parameters."""
    from sqlalchemy.dialects.postgresql.asyncpg import dialect
    from sqlalchemy.sql.base import _NoArg

    REQUIRED = _NoArg.NO_ARG

    compiled = statement.compile(dialect=dialect(), column_keys=column_keys)
    state = compiled.construct_expanded_state(compiled.construct_params(_check=False))
    processors = {name: processor for name, processor in state.processors.items() if processor is not None}
    defaults, generated = dict(state.parameters), {}
    table = getattr(statement, "table", None)
    for column in table.columns if table is not None and (statement.is_insert or statement.is_update) else ():
        # what the execution context fills in: a column's Python default (INSERT) or onupdate (UPDATE)
        spec = column.default if statement.is_insert else column.onupdate
        if spec is None or column.key not in defaults or defaults[column.key] not in (None, REQUIRED):
            continue
        if spec.is_scalar:
            defaults[column.key] = spec.arg
        elif spec.is_callable:
            generated[column.key] = spec.arg
    return Statement(state.statement, tuple(state.positiontup or ()), defaults, processors, generated)


class FloorSQL:
    """The routes' statements, compiled once (the ledger's own statement objects where it has them)."""

    def __init__(self) -> None:
        from sqlalchemy import bindparam, update

        from service.db.models import CallAttempt
        from service.ledger import calls, cancellation, events
        from service.ledger.events import EventSource, EventType, event_row, finished_rows

        self.ringing = compile_statement(calls.PROGRESS["ringing"])
        self.initiated = compile_statement(calls.PROGRESS["initiated"])
        self.first_time = compile_statement(calls.FIRST_TIME["postgresql"])
        # the voice answer (`calls._answer`): an unbound, never-rung call answered by a person
        self.answered = compile_statement(calls.ANSWERED)
        self.answer_update = compile_statement(
            update(CallAttempt).where(CallAttempt.id == bindparam("id"))
            .values({"provider_call_id": bindparam("provider_call_id"), "last_event_at": bindparam("last_event_at"),
                     "rang_at": bindparam("rang_at"), "answered_by": bindparam("answered_by")}))
        self.bind = compile_statement(calls.BIND)
        sample = finished_rows([_Finished("r", "a", "sent", "answered", None, None)], EventSource.SYSTEM,
                               _epoch())[0]
        self.event_keys = list(sample)
        self.insert_event = compile_statement(events.INSERT_ONE, self.event_keys)
        # the keypad (`calls._keypad`): digits 1 on the bound call, round 1
        self.keypad_read = compile_statement(calls.KEYPAD_READ)
        self.keypad_round = compile_statement(calls.KEYPAD_ROUND)
        self.confirm = compile_statement(calls.CONFIRM)
        self.lock_calls = compile_statement(cancellation.LOCK_OF_APPOINTMENT)
        self.skip = compile_statement(cancellation.SKIP_OF_APPOINTMENT)
        self.confirmed_reason = cancellation.CONFIRMED_BY_CUSTOMER
        confirmed = event_row(EventType.APPOINTMENT_CONFIRMED, EventSource.KEYPAD, "x", _epoch(), reminder_id="r",
                              confirmation="confirmed")
        if list(confirmed) != self.event_keys:
            raise RuntimeError("the confirmed event's row has other columns than reminder.finished's")

    def sequence(self, route: str) -> list[str]:
        """The SQL each route sends, in order (for the comparison with the ledger's)."""
        return {
            "twilio/status": [self.ringing.sql],
            "twilio/voice": [self.answered.sql, self.answer_update.sql, self.bind.sql, self.insert_event.sql],
            "twilio/gather": [self.keypad_read.sql, self.keypad_round.sql, self.confirm.sql, self.lock_calls.sql,
                              self.skip.sql, self.insert_event.sql],
            "telnyx/initiated": [self.first_time.sql, self.initiated.sql],
        }[route]


@dataclass(frozen=True)
class _Finished:
    id: str
    appointment_id: str
    status: str
    outcome: str | None
    skip_reason: str | None
    last_error: str | None


def _epoch() -> Any:
    from datetime import UTC, datetime

    return datetime(2030, 1, 1, tzinfo=UTC)


def sql_sequence(route: str) -> list[str]:
    return FloorSQL().sequence(route)


# -- the app -------------------------------------------------------------------------------------------


async def _no_reset(_connection: asyncpg.Connection) -> None:
    """As bench/bare.py: no reset query on release (the service's autocommit pool sends none)."""


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    from service.providers.telnyx.signature import TelnyxSignature
    from service.providers.twilio.signature import TwilioSignature

    state = app.state
    state.sql = FloorSQL()
    public_url = os.environ["FLOOR_PUBLIC_URL"]
    state.public_url = public_url.rstrip("/")
    state.twilio = TwilioSignature(os.environ.get("FLOOR_TWILIO_TOKEN", ""), public_url)
    key = os.environ.get("FLOOR_TELNYX_PUBLIC_KEY")
    state.telnyx = TelnyxSignature(key) if key else None
    state.connection_id = os.environ.get("FLOOR_TELNYX_CONNECTION_ID") or None
    state.pool = await asyncpg.create_pool(os.environ["FLOOR_DATABASE_URL"], min_size=4, max_size=10,
                                           reset=_no_reset)
    try:
        yield
    finally:
        await state.pool.close()


async def _twilio_form(request: Request) -> FormData | None:
    """The form once `X-Twilio-Signature` holds over PUBLIC_URL + path + query (as the service checks it)."""
    from service.providers.twilio.signature import MAX_SIGNATURE_LENGTH, SIGNATURE_HEADER, SIGNATURE_HEADERS
    from service.telephony.webhook import SignatureFailure, one_header

    form = FormData(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
    query = request.scope.get("query_string", b"").decode("latin-1")
    name = next((name for name in SIGNATURE_HEADERS if name in request.headers), SIGNATURE_HEADER)
    given = one_header(request.headers.getlist(name), MAX_SIGNATURE_LENGTH)
    if isinstance(given, SignatureFailure):
        return None
    if request.app.state.twilio.failure(request.scope["path"], query, form, given) is not None:
        return None
    return form


def _forbidden() -> Response:
    return Response('{"detail":"invalid signature"}', 403, media_type="application/json")


def _hangup() -> Response:
    from service.providers.twilio.twiml import hangup_twiml

    return Response(hangup_twiml(), media_type=_TWIML)


async def twilio_status(request: Request) -> Response:
    from service.telephony.provider import Stamp

    form = await _twilio_form(request)
    if form is None:
        return _forbidden()
    stamp, call_sid, call_status = Stamp.from_query(request.query_params), form.get("CallSid"), form.get("CallStatus")
    if stamp is not None and isinstance(call_sid, str) and call_status == "ringing":
        sequence = form.get("SequenceNumber")
        sql: FloorSQL = request.app.state.sql
        await request.app.state.pool.fetchrow(
            sql.ringing.sql, *sql.ringing.args(attempt_id=stamp.attempt_id, stamp_reminder_id=stamp.reminder_id,
                                               call_id=call_sid, order=int(sequence) if sequence else None),
            timeout=10)
    return Response(status_code=204)


async def twilio_voice(request: Request) -> Response:
    from service.ledger.events import EventSource, finished_rows
    from service.providers.twilio.twiml import gather_twiml
    from service.reminders import Wording
    from service.telephony.provider import Stamp

    form = await _twilio_form(request)
    if form is None:
        return _forbidden()
    stamp, call_sid = Stamp.from_query(request.query_params), form.get("CallSid")
    if stamp is None or not isinstance(call_sid, str):
        return _hangup()
    answered_by = form.get("AnsweredBy")
    sql: FloorSQL = request.app.state.sql
    async with request.app.state.pool.acquire(timeout=10) as connection, connection.transaction():
        row = await connection.fetchrow(sql.answered.sql, *sql.answered.args(attempt_id=stamp.attempt_id), timeout=10)
        if row is None or row["reminder_id"] != stamp.reminder_id or row["call_status"] is not None:
            return _hangup()  # the floor serves the bench's first answers only
        now = row["now"]
        await connection.execute(sql.answer_update.sql, *sql.answer_update.args(
            id=row["id"], provider_call_id=call_sid, last_event_at=now, rang_at=now, answered_by=answered_by[:32]),
            timeout=10)
        bound = await connection.fetchrow(sql.bind.sql, *sql.bind.args(
            stamp_reminder_id=stamp.reminder_id, call_id=call_sid, attempt_id=stamp.attempt_id,
            answer_outcome="answered", answered_at=now), timeout=10)
        if bound is None:
            return _hangup()
        if bound["status"] == "sent":
            event = finished_rows([_Finished(*(bound[k] for k in ("id", "appointment_id", "status", "outcome",
                                                                   "skip_reason", "last_error")))],
                                  EventSource.SYSTEM, now)[0]
            await connection.execute(sql.insert_event.sql, *sql.insert_event.args(**event), timeout=10)
    wording = Wording.from_json(json.loads(row["wording"]))
    action = request.app.state.twilio.signed_url("/telephony/twilio/gather", urlencode({**stamp.query(), "n": "1"}))
    text = f"{wording.message} {wording.question}"
    return Response(gather_twiml(text, language=wording.language, action=action), media_type=_TWIML)


async def twilio_gather(request: Request) -> Response:
    from service.ledger.events import EventSource, EventType, event_row
    from service.providers.twilio.twiml import say_twiml
    from service.reminders import Wording
    from service.telephony.provider import Stamp

    form = await _twilio_form(request)
    if form is None:
        return _forbidden()
    stamp, call_sid = Stamp.from_query(request.query_params), form.get("CallSid")
    if stamp is None or not isinstance(call_sid, str) or form.get("Digits") != "1" or \
            request.query_params.get("n") != "1":
        return _hangup()  # the floor serves the bench's confirmations only
    sql: FloorSQL = request.app.state.sql
    async with request.app.state.pool.acquire(timeout=10) as connection, connection.transaction():
        row = await connection.fetchrow(sql.keypad_read.sql, *sql.keypad_read.args(
            attempt_id=stamp.attempt_id, reminder_id=stamp.reminder_id), timeout=10)
        if (row is None or row["bound_call_id"] != call_sid or row["bound_attempt_id"] != stamp.attempt_id
                or row["plan"] != row["current_plan"] or row["appointment_status"] != "scheduled"
                or row["status"] == "cancelled" or row["keypad_rounds"] & 1):
            return _hangup()
        now = row["now"]
        await connection.execute(sql.keypad_round.sql, *sql.keypad_round.args(attempt_id=stamp.attempt_id, bit=1),
                                 timeout=10)
        await connection.execute(sql.confirm.sql, *sql.confirm.args(
            appointment_id=row["appointment_id"], confirmation="confirmed", now=now), timeout=10)
        params = {"of_appointment": row["appointment_id"], "reason": sql.confirmed_reason, "now": now}
        await connection.fetch(sql.lock_calls.sql, *sql.lock_calls.args(**params), timeout=10)
        skipped = await connection.fetch(sql.skip.sql, *sql.skip.args(**params), timeout=10)
        if skipped:
            raise RuntimeError("the bench's confirmations skip no reminder (each appointment has one, finished)")
        event = event_row(EventType.APPOINTMENT_CONFIRMED, EventSource.KEYPAD, row["appointment_id"], now,
                          reminder_id=stamp.reminder_id, confirmation="confirmed")
        await connection.execute(sql.insert_event.sql, *sql.insert_event.args(**event), timeout=10)
    wording = Wording.from_json(json.loads(row["wording"]))
    return Response(say_twiml(wording.confirmed, language=wording.language), media_type=_TWIML)


async def telnyx_events(request: Request) -> Response:
    from service.providers.telnyx.events import parse_event
    from service.providers.telnyx.signature import (
        MAX_SIGNATURE_LENGTH,
        MAX_TIMESTAMP_LENGTH,
        SIGNATURE_HEADER,
        TIMESTAMP_HEADER,
    )
    from service.telephony.webhook import SignatureFailure, one_header

    body = await request.body()
    signature = one_header(request.headers.getlist(SIGNATURE_HEADER), MAX_SIGNATURE_LENGTH)
    timestamp = one_header(request.headers.getlist(TIMESTAMP_HEADER), MAX_TIMESTAMP_LENGTH)
    if isinstance(signature, SignatureFailure) or isinstance(timestamp, SignatureFailure):
        return _forbidden()
    if request.app.state.telnyx.failure(body, signature, timestamp) is not None:
        return _forbidden()
    event = parse_event(body)
    ours = request.app.state.connection_id
    if event is None or (ours and event.connection_id is not None and event.connection_id != ours):
        return Response(status_code=200)
    if event.event_type == "call.initiated" and event.stamp is not None and event.call_id is not None:
        sql: FloorSQL = request.app.state.sql
        stamp = event.stamp
        async with request.app.state.pool.acquire(timeout=10) as connection, connection.transaction():
            first = await connection.fetchrow(sql.first_time.sql, *sql.first_time.args(event_id=event.event_id[:160]),
                                              timeout=10)
            if first is not None:
                await connection.fetchrow(sql.initiated.sql, *sql.initiated.args(
                    attempt_id=stamp.attempt_id, stamp_reminder_id=stamp.reminder_id, call_id=event.call_id,
                    order=event.order), timeout=10)
    return Response(status_code=200)


app = Starlette(
    routes=[Route("/appointments/{appointment_id}", starlette_read, methods=["GET"]),
            Route("/telephony/twilio/status", twilio_status, methods=["POST"]),
            Route("/telephony/twilio/voice", twilio_voice, methods=["POST"]),
            Route("/telephony/twilio/gather", twilio_gather, methods=["POST"]),
            Route("/telephony/telnyx/events", telnyx_events, methods=["POST"])],
    lifespan=_lifespan,
)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--public-url", required=True, help="the PUBLIC_URL the requests are signed for")
    parser.add_argument("--twilio-token", default="")
    parser.add_argument("--telnyx-public-key", default="")
    parser.add_argument("--telnyx-connection-id", default="")
    args = parser.parse_args()
    os.environ.update({
        "FLOOR_DATABASE_URL": args.database_url.replace("postgresql+asyncpg://", "postgresql://"),
        "FLOOR_PUBLIC_URL": args.public_url, "FLOOR_TWILIO_TOKEN": args.twilio_token,
        "FLOOR_TELNYX_PUBLIC_KEY": args.telnyx_public_key, "FLOOR_TELNYX_CONNECTION_ID": args.telnyx_connection_id,
    })
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
