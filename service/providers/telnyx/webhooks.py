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

`HANDLERS` maps an event type to what it does. Outcomes and the keypad: the Dial asks for machine
detection; `call.machine.detection.ended` greets the bound call — a machine with the short
voicemail (`speak`), a person with the message and the keypad question (`gather_using_speak`,
one key). `call.gather.ended` applies the key of the bound call only (1 confirms, 2 declines);
nothing usable asks the question once more (its round rides in `client_state`), then goodbye; the
last words' `call.speak.ended` hangs up. `call.hangup`'s cause gives the final status (`timeout` →
no-answer, `user_busy` → busy), from which the reminder's outcome and no-answer retry follow.

The app provides `app.state.db`, `app.state.telnyx_signature` (`TelnyxSignature`) and
`app.state.provider` (a `TelnyxProvider`, or anything with `speak`, `hang_up` and `cancel`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, BackgroundTasks, HTTPException, Request, Response, status

from service.ledger import calls
from service.providers.common import cancel_calls, fallback_wording
from service.providers.telnyx.events import TelnyxEvent, hangup_status, parse_event
from service.providers.telnyx.rest import EVENTS_PATH, gather_command_id, hangup_command_id, speak_command_id
from service.providers.telnyx.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, TelnyxSignature
from service.reminders import Confirmation, is_machine
from service.telephony.provider import Stamp

__all__ = ["HANDLERS", "Handler", "router"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["telephony webhooks"], include_in_schema=False)

# (request, event with a stamp and a call id, background tasks) → a response, or None for 200
Handler = Callable[[Request, TelnyxEvent, BackgroundTasks], Awaitable[Response | None]]


def _ok() -> Response:
    return Response(status_code=status.HTTP_200_OK)


async def _record(request: Request, event: TelnyxEvent, background: BackgroundTasks, status_: str | None) -> bool:
    """Apply the event's status; hang up the call if its reminder is bound to another. Known?"""
    assert event.stamp is not None and event.call_id is not None
    result = await calls.record_event(request.app.state.db, event.stamp, event.call_id, status_, event.order,
                                      datetime.now(UTC), getattr(request.app.state, "no_answer_policy", None))
    if result.cancel:
        background.add_task(cancel_calls, request, result.cancel)
    return result.known


async def initiated(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> Response | None:
    await _record(request, event, background, "initiated")
    return None


async def answered(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> Response | None:
    """Bind the call if its reminder has none (first answer wins) and greet on the bound call —
    once the machine detection said who answered, when it is on; hang up any other call. Both
    before the acknowledgement."""
    assert event.stamp is not None and event.call_id is not None
    await _record(request, event, background, "in-progress")
    # with machine detection, bound now (other calls hung up at once) and greeted when
    # `call.machine.detection.ended` says who answered; should it never come, the sweep speaks
    waiting = getattr(request.app.state.provider, "machine_detection", False)
    return await _greet(request, event, background, machine=None if waiting else False)


async def machine_detection_ended(request: Request, event: TelnyxEvent,
                                  background: BackgroundTasks) -> Response | None:
    """Who answered: a machine gets the short voicemail, a person (or `not_sure`) the message and
    the keypad question. It may come before `call.answered` is applied: it binds the call too."""
    assert event.stamp is not None and event.call_id is not None
    await _record(request, event, background, None)
    return await _greet(request, event, background, machine=is_machine(str(event.payload.get("result"))))


async def _greet(request: Request, event: TelnyxEvent, background: BackgroundTasks,
                 *, machine: bool | None) -> Response | None:
    """The bound call's first words: the voicemail (a machine), or the message with the keypad
    question (`gather_using_speak`); `machine` None: bind only, who answered is not known yet. Any
    other call of the reminder is hung up without a word."""
    assert event.stamp is not None and event.call_id is not None
    provider: Any = request.app.state.provider
    db, stamp, call_id = request.app.state.db, event.stamp, event.call_id
    # bound without an outcome: it comes with the speech (mark_heard), and a bound call that ends
    # before its message is released by the leader's sweep for a new call
    result = await calls.answer(db, stamp, call_id, datetime.now(UTC), fallback=fallback_wording(request),
                                heard_later=True)
    if result.cancel:
        background.add_task(cancel_calls, request, result.cancel)
    if result.over:
        return None  # a late answer of a call already over: nothing to say, nothing to end
    if not result.speak or result.wording is None:
        log.info("call %s answered, reminder %s is bound to another call (or unknown): hang up", call_id,
                 stamp.reminder_id)
        done = await provider.hang_up(call_id, command_id=hangup_command_id(stamp.attempt_id), stamp=stamp)
        return None if done else _retry_later("hangup")
    if result.newly_bound:
        log.info("reminder %s bound to call %s (attempt %s)", stamp.reminder_id, call_id, stamp.attempt_id)
    wording = result.wording
    if machine is None:
        return None
    if machine:
        await calls.mark_heard(db, stamp, call_id, machine=True)  # voicemail, whatever the speech's events say
        spoken = await provider.speak(call_id, wording.voicemail, command_id=speak_command_id(stamp.attempt_id),
                                      stamp=stamp, language=wording.language)
        return None if spoken else _retry_later("speak")
    asked = await provider.gather_using_speak(call_id, f"{wording.message} {wording.prompt}",
                                              command_id=gather_command_id(stamp.attempt_id, 1), stamp=stamp,
                                              language=wording.language, round_=1)
    if not asked:
        return _retry_later("gather_using_speak")
    # the message is under way (a gather has no speak events): heard, and the sweep leaves it be
    await calls.record_event(db, stamp, call_id, calls.SPEAKING, None, datetime.now(UTC))
    await calls.mark_heard(db, stamp, call_id)
    return None


async def gather_ended(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> Response | None:
    """The keypad: 1 confirms, 2 declines; nothing usable → the question once more (round 2, in
    the gather's `client_state`), then goodbye. Only the reminder's bound call is heard."""
    assert event.stamp is not None and event.call_id is not None
    provider: Any = request.app.state.provider
    db, stamp, call_id = request.app.state.db, event.stamp, event.call_id
    if not await _record(request, event, background, None) or event.payload.get("status") == "call_hangup":
        return None
    digits = event.payload.get("digits")
    result = await calls.keypad(db, stamp, call_id, digits if isinstance(digits, str) else None, datetime.now(UTC),
                                fallback=fallback_wording(request))
    if not result.bound or result.wording is None:
        done = await provider.hang_up(call_id, command_id=hangup_command_id(stamp.attempt_id), stamp=stamp)
        return None if done else _retry_later("hangup")
    wording = result.wording
    round_ = Stamp.round_in(event.payload.get("client_state"))
    if result.answer is not None:
        words = {Confirmation.CONFIRMED: wording.confirmed, Confirmation.DECLINED: wording.declined}
        said = words[result.answer] if result.confirmation == result.answer else wording.goodbye
    elif round_ == 1:  # the question once more (not the message)
        asked = await provider.gather_using_speak(call_id, wording.prompt,
                                                  command_id=gather_command_id(stamp.attempt_id, 2),
                                                  stamp=stamp, language=wording.language, round_=2)
        return None if asked else _retry_later("gather_using_speak")
    else:
        said = wording.goodbye
    # its `call.speak.ended` hangs up
    spoken = await provider.speak(call_id, said, command_id=f"last-{stamp.attempt_id}", stamp=stamp,
                                  language=wording.language)
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
    "call.gather.ended": gather_ended,
    "call.machine.detection.ended": machine_detection_ended,
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
