"""Telnyx's events: `POST /telephony/telnyx/events`, on every replica.

The Ed25519 signature over `"{telnyx-timestamp}|{raw body}"` is checked before the body is parsed
or anything is read from or written to the database: a bad, missing or stale one (more than five
minutes off) is a 403 and nothing happens. Every validly signed event is acknowledged (2xx); an
event for an unknown, finished or already bound call changes nothing. Events carry no sequence
number: they are applied by the call's state (never back) and `occurred_at`.

Speech is a command, not the answer to the webhook: on `call.answered` of the reminder's bound
call the message is spoken (`actions/speak`, `command_id` from the attempt) *before* the event is
acknowledged, so that a replica dying in between leaves the event unacknowledged and Telnyx
delivers it again (to any replica: the repeat is deduped by the `command_id`). A command Telnyx
did not accept is answered 503 for the same reason (a call already over is acknowledged: its
hangup follows); the leader's sweep (service.dispatch.speech) is the backstop. Any other answered
call is hung up without a word. The bound call's outcome (`answered`) is recorded when its speech
begins; one that ends before is released by the sweep for a new call.

`HANDLERS` maps an event type to what it does; the keypad and machine-detection flows plug in
there (`call.gather.ended`, `call.machine.detection.ended` are acknowledged and recorded today).

The app provides `app.state.db`, `app.state.telnyx_signature` (`TelnyxSignature`) and
`app.state.provider` (a `TelnyxProvider`, or anything with `speak`, `hang_up` and `cancel`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, BackgroundTasks, HTTPException, Request, Response, status

from service.reminders import MessageTemplates, Wording
from service.telephony.telnyx import (
    EVENTS_PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    TelnyxEvent,
    TelnyxSignature,
    hangup_command_id,
    parse_event,
    speak_command_id,
)
from service.webhooks import calls

__all__ = ["HANDLERS", "Handler", "hangup_status", "router"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["telephony webhooks"], include_in_schema=False)

# (request, event with a stamp and a call id, background tasks) → a response, or None for 200
Handler = Callable[[Request, TelnyxEvent, BackgroundTasks], Awaitable[Response | None]]

# Telnyx's hangup causes → the call status the attempts record (Twilio's vocabulary).
_HANGUP_STATUS = {"user_busy": "busy", "timeout": "no-answer", "originator_cancel": "canceled",
                  "call_rejected": "failed", "not_found": "failed", "unallocated_number": "failed"}


def hangup_status(payload: Any) -> str:
    """The final status of a call from its `call.hangup` payload's `hangup_cause`."""
    return _HANGUP_STATUS.get(str(payload.get("hangup_cause")), "completed")


def _ok() -> Response:
    return Response(status_code=status.HTTP_200_OK)


async def _record(request: Request, event: TelnyxEvent, background: BackgroundTasks, status_: str | None) -> bool:
    """Apply the event's status; hang up the call if its reminder is bound to another. Known?"""
    assert event.stamp is not None and event.call_id is not None
    result = await calls.record_event(request.app.state.db, event.stamp, event.call_id, status_, event.order,
                                      datetime.now(UTC), getattr(request.app.state, "no_answer_policy", None))
    if result.cancel:
        background.add_task(_hang_up_all, request, result.cancel)
    return result.known


async def _hang_up_all(request: Request, call_ids: list[str]) -> None:
    provider: Any = request.app.state.provider
    for call_id in call_ids:
        done = await provider.cancel(call_id)
        log.info("hung up call %s of a reminder bound to another call: %s", call_id, done)


def _fallback(request: Request) -> calls.Fallback:
    """The words for a reminder planned before wording was stored: rendered now, as then."""
    templates: MessageTemplates = getattr(request.app.state, "templates", None) or MessageTemplates.parse(None)

    def wording(row: Any) -> Wording:
        language = row.language if templates.supports(row.language) else templates.default_language
        return templates.render(language, row.customer_name, row.starts_at, row.timezone)

    return wording


async def initiated(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> Response | None:
    await _record(request, event, background, "initiated")
    return None


async def answered(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> Response | None:
    """Bind the call if its reminder has none (first answer wins); speak on the bound call, hang up
    any other — both before the acknowledgement."""
    assert event.stamp is not None and event.call_id is not None
    provider: Any = request.app.state.provider
    await _record(request, event, background, "in-progress")
    # bound without an outcome: `answered` comes with the speech (mark_heard), and a bound call
    # that ends before its message is released by the leader's sweep for a new call
    result = await calls.answer(request.app.state.db, event.stamp, event.call_id, datetime.now(UTC),
                                fallback=_fallback(request), heard_later=True)
    if result.cancel:
        background.add_task(_hang_up_all, request, result.cancel)
    if not result.speak:
        log.info("call %s answered, reminder %s is bound to another call (or unknown): hang up", event.call_id,
                 event.stamp.reminder_id)
        done = await provider.hang_up(event.call_id, command_id=hangup_command_id(event.stamp.attempt_id),
                                      stamp=event.stamp)
        return None if done else _retry_later("hangup")
    if result.newly_bound:
        log.info("reminder %s bound to call %s (attempt %s)", event.stamp.reminder_id, event.call_id,
                 event.stamp.attempt_id)
    assert result.wording is not None
    spoken = await provider.speak(event.call_id, result.wording.message,
                                  command_id=speak_command_id(event.stamp.attempt_id), stamp=event.stamp)
    return None if spoken else _retry_later("speak")


def _retry_later(command: str) -> Response:
    """Not acknowledged: Telnyx delivers the event again (the command's id dedupes a repeat)."""
    log.warning("telnyx did not accept the %s command: the event stays unacknowledged", command)
    return Response(status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


async def speak_started(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> Response | None:
    assert event.stamp is not None and event.call_id is not None
    if await _record(request, event, background, calls.SPEAKING):
        await calls.mark_heard(request.app.state.db, event.stamp, event.call_id)
    return None


async def speak_ended(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> Response | None:
    """The message was spoken: the call ends (the keypad flow replaces this with a gather)."""
    assert event.stamp is not None and event.call_id is not None
    if await _record(request, event, background, calls.SPOKEN):
        await calls.mark_heard(request.app.state.db, event.stamp, event.call_id)  # if `.started` was lost
        background.add_task(request.app.state.provider.hang_up, event.call_id,
                            command_id=hangup_command_id(event.stamp.attempt_id), stamp=event.stamp)
    return None


async def hangup(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> Response | None:
    await _record(request, event, background, hangup_status(event.payload))
    return None


async def recorded(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> Response | None:
    """An event that moves no call state (gathered digits, machine detection): noted, acknowledged."""
    await _record(request, event, background, None)
    return None


HANDLERS: dict[str, Handler] = {
    "call.initiated": initiated,
    "call.answered": answered,
    "call.speak.started": speak_started,
    "call.speak.ended": speak_ended,
    "call.hangup": hangup,
    "call.gather.ended": recorded,
    "call.machine.detection.ended": recorded,
}


@router.post(EVENTS_PATH)
async def events(request: Request, background: BackgroundTasks) -> Response:
    """One signed event of a call: verified first, then applied by its type."""
    signature: TelnyxSignature = request.app.state.telnyx_signature
    body = await request.body()
    if not signature.valid(body, request.headers.get(SIGNATURE_HEADER), request.headers.get(TIMESTAMP_HEADER)):
        log.warning("telnyx event refused: bad, missing or stale signature")
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="invalid signature")
    event = parse_event(body)
    if event is None or event.stamp is None or event.call_id is None:
        return _ok()  # signed, but not a call of ours: acknowledged, nothing to do
    handler = HANDLERS.get(event.event_type)
    if handler is None:
        return _ok()
    return await handler(request, event, background) or _ok()
