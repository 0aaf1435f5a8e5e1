"""Telnyx's events: `POST /telephony/telnyx/events`, on every replica.

The Ed25519 signature over `"{telnyx-timestamp}|{raw body}"` is checked before the body is parsed
or anything is read from or written to the database: a bad, missing or stale one (more than five
minutes off) is a 403 and nothing happens (counted by reason, warned of at most once a minute:
`common.SignatureRefusals`). An event of another Call Control connection of the account
(`connection_id` other than TELNYX_CONNECTION_ID) is acknowledged and ignored. Every validly signed
event is acknowledged with a 200, whatever became of it: Telnyx does not deliver a non-2xx event
again (it goes to the failover URL, if one is set); only an answer slower than 2 s is retried. So
nothing here relies on a redelivery: what an event could not do, the leader's sweep does
(service.dispatch.sweep).

Events come late, twice, or out of order. Each is applied once by its `data.id`, by the call's
state (never back) and `occurred_at`. Speech is a command, not the answer to the webhook
(docs/decisions/0221, the greeting protocol): the bound call's first words — the message with the
keypad question for a person (`gather_using_speak`), the voicemail for a machine after its beep
(`speak`) — are ONE command per call, recorded before it is sent (`calls.command_greeting`), so a
late detection event, a redelivery or the sweep never sends a second one. The commands an event
sets off (the greeting, the question again, the last words, a hangup) are sent once the event is
acknowledged: Telnyx waits 2 s for the answer, and an answer held up by a command's round trip to
Telnyx's API made it deliver the event again (and again), each delivery costing the replicas more.
A replica that dies in between leaves a recorded greeting of unknown fate: the sweep sends it.

`HANDLERS` maps an event type to what it does: `call.answered` binds the call (first answer wins;
any other call is hung up) and, without machine detection, greets; `call.machine.detection.ended`
greets a person (or `not_sure`) at once and waits for a machine's beep
(`call.machine.greeting.ended`, which binds the call itself when it comes first);
`call.gather.ended` applies the key of the bound call of a current reminder, each round once, if
pressed before the hang-up; `call.hangup`'s cause gives the call's final status (`HANGUP_STATUS` in
events.py), from which the outcome and no-answer retry follow.

Customers who call back (docs/decisions/0252): a `call.initiated` with `direction: "incoming"` (on
our connection) is answered (`actions/answer`, one `command_id` per call). An attested caller (A,
validated) whose number selects a reminder gets the reminder's stamp as `client_state`, so that
every later event of the call is handled as its bound call's: `call.answered` greets it at once
(no machine detection on a call the customer placed), its keypad answers count. Anyone else gets
`NEUTRAL_STATE`: the neutral message once answered, then the hang-up.

The app provides `app.state.db`, `app.state.telnyx_signature` (`TelnyxSignature`), optionally
`app.state.telnyx_connection_id` (absent: no event is foreign) and `app.state.signature_refusals`, and
`app.state.provider` (a `TelnyxProvider`, or anything with `greet`, `gather_using_speak`, `speak`,
`hang_up` and `cancel`).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import BackgroundTasks, HTTPException, Request, Response, status

from service.ledger import calls
from service.metrics import TELNYX_FOREIGN_EVENTS
from service.providers.callers import NEUTRAL_MESSAGE, Caller, caller_number, identify
from service.providers.common import (
    call_after_confirmation,
    cancel_calls,
    fallback_wording,
    signature_refused,
    with_retries,
)
from service.providers.routes import WebhookRoutes
from service.providers.telnyx.events import TelnyxEvent, hangup_status, parse_event
from service.providers.telnyx.rest import (
    EVENTS_PATH,
    answer_command_id,
    gather_command_id,
    hangup_command_id,
    last_words_command_id,
)
from service.providers.telnyx.signature import (
    MAX_SIGNATURE_LENGTH,
    MAX_TIMESTAMP_LENGTH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    TelnyxSignature,
)
from service.reminders import Answerer, Confirmation, answerer
from service.telephony.provider import GreetingWords, Stamp
from service.telephony.webhook import SignatureFailure, one_header

__all__ = ["HANDLERS", "Handler", "router"]

# Seconds the greeting's answer keeps trying a failing database: inside the 10 s after a call's
# end that the leader's sweep waits before it settles the call on what is recorded.
GREETING_RECORD_BUDGET = 8.0
# Seconds an event whose handler failed is applied again after it was acknowledged.
LATE_EVENT_BUDGET = 30.0

log = logging.getLogger(__name__)

router = WebhookRoutes()

# (request, event with a stamp and a call id, background tasks) → None (acknowledged)
Handler = Callable[[Request, TelnyxEvent, BackgroundTasks], Awaitable[None]]

# The `client_state` of an incoming call that answers no reminder: it hears the neutral message.
NEUTRAL_STATE = base64.b64encode(b'["neutral"]').decode()


async def _record(request: Request, event: TelnyxEvent, background: BackgroundTasks, status_: str | None) -> bool:
    """Apply the event's status (once, by its id); hang up the call if its reminder is bound to
    another. True when the event names a known call and is new."""
    result = await _apply(request, event, background, status_)
    return result.known and not result.duplicate


async def _apply(request: Request, event: TelnyxEvent, background: BackgroundTasks,
                 status_: str | None) -> calls.EventResult:
    """Apply the event's status (once, by its id); hang up the call if its reminder is bound to another."""
    assert event.stamp is not None and event.call_id is not None
    ended_at = event.occurred_at if status_ is not None and calls.is_final(status_) else None
    result = await calls.record_event(request.app.state.db, event.stamp, event.call_id, status_, event.order,
                                      getattr(request.app.state, "no_answer_policy", None),
                                      event_id=event.event_id or None, ended_at=ended_at)
    if result.cancel:
        background.add_task(cancel_calls, request, result.cancel)
    return result


def _hang_up(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> None:
    """The call's hangup command, sent once the event is acknowledged."""
    assert event.stamp is not None and event.call_id is not None
    background.add_task(request.app.state.provider.hang_up, event.call_id,
                        command_id=hangup_command_id(event.stamp.attempt_id), stamp=event.stamp)


async def initiated(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> None:
    await _record(request, event, background, "initiated")


def _call_event(event: TelnyxEvent, status: str | None) -> calls.CallEvent:
    """The event as the ledger applies it with what it sets off, in one transaction."""
    return calls.CallEvent(status, event.order, event.event_id or None)


async def answered(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> None:
    """Bind the call if its reminder has none (first answer wins) and, without machine detection,
    greet it; hang up any other call. One transaction: the event, the binding, the greeting's record."""
    assert event.stamp is not None and event.call_id is not None
    detection = getattr(request.app.state.provider, "machine_detection", False)
    result = await calls.answer(request.app.state.db, event.stamp, event.call_id,
                                fallback=fallback_wording(request), heard_later=True,
                                event=_call_event(event, "in-progress"), greet=None if detection else Answerer.PERSON)
    if not result.event.known:
        return
    if result.cancel:
        background.add_task(cancel_calls, request, result.cancel)
    if result.over:
        return  # a late answer of a call already over: nothing to say, nothing to end
    if not result.speak:
        log.info("call %s answered, reminder %s is bound to another call (or no longer calls): hang up",
                 event.call_id, event.stamp.reminder_id)
        _hang_up(request, event, background)
        return
    if result.newly_bound:
        log.info("reminder %s bound to call %s (attempt %s)", event.stamp.reminder_id, event.call_id,
                 event.stamp.attempt_id)
    if result.greeting is not None:
        _command(request, event, result.greeting, background)
    elif result.incoming:  # a call the customer placed: no machine detection to wait for
        await _greet(request, event, Answerer.PERSON, background)
    # else greeted when the machine detection says who answered; should it never, the sweep does


async def machine_detection_ended(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> None:
    """Who answered: a person (or `not_sure`) is greeted at once; a machine after its beep
    (`call.machine.greeting.ended`); a fax is hung up. It may come before `call.answered` is
    applied: it binds the call too. One transaction: the event, the binding, a person's greeting's record."""
    assert event.stamp is not None and event.call_id is not None
    result = str(event.payload.get("result") or "")
    who = answerer(result)
    bound = await calls.answer(request.app.state.db, event.stamp, event.call_id, who=who, answered_by=result,
                               fallback=fallback_wording(request), heard_later=True, event=_call_event(event, None),
                               greet=Answerer.PERSON if who is Answerer.PERSON else None)
    _answered_by_detection(request, event, bound, background)


async def machine_greeting_ended(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> None:
    """The machine's greeting is over (its beep, or silence): the voicemail, recorded now (with the
    event). Only a machine's call has this event, so it may bind the call as a machine's when it
    comes first — `call.answered` and the detection late or lost (decision 0221): hanging up there
    left the machine nothing. One transaction: the event, the binding, the voicemail's record."""
    assert event.stamp is not None and event.call_id is not None
    bound = await calls.answer(request.app.state.db, event.stamp, event.call_id, who=Answerer.MACHINE,
                               fallback=fallback_wording(request), heard_later=True, event=_call_event(event, None),
                               greet=Answerer.MACHINE)
    _answered_by_detection(request, event, bound, background)


def _answered_by_detection(request: Request, event: TelnyxEvent, bound: calls.Answer,
                           background: BackgroundTasks) -> None:
    """What a detection event's binding sets off once the event is acknowledged: the reminder's
    other calls ended, the greeting it recorded sent; a call that may not speak hung up."""
    if not bound.event.known:
        return
    if bound.cancel:
        background.add_task(cancel_calls, request, bound.cancel)
    if bound.over:
        return
    if not bound.speak:
        _hang_up(request, event, background)
    elif bound.greeting is not None:
        _command(request, event, bound.greeting, background)


async def _greet(request: Request, event: TelnyxEvent, who: Answerer, background: BackgroundTasks) -> None:
    """The bound call's greeting: recorded as commanded first (here), then its one command, sent
    once the event is acknowledged; nothing when it was commanded before (by another event or the
    sweep); a call that is not the bound call of a current reminder is hung up."""
    assert event.stamp is not None and event.call_id is not None
    greeting = await calls.command_greeting(request.app.state.db, event.stamp, event.call_id, who,
                                            fallback=fallback_wording(request))
    _command(request, event, greeting, background)


def _command(request: Request, event: TelnyxEvent, greeting: calls.Greeting, background: BackgroundTasks) -> None:
    """What a recorded greeting sets off once the event is acknowledged: its command if this
    request recorded it, nothing if it was recorded before, the hangup if the call is not bound."""
    assert event.stamp is not None and event.call_id is not None
    if not greeting.bound:
        _hang_up(request, event, background)
        return
    if not greeting.send or greeting.words is None:
        return
    background.add_task(_send_greeting, request, event.stamp, event.call_id, greeting.words)


async def _send_greeting(request: Request, stamp: Stamp, call_id: str, words: GreetingWords) -> None:
    """The greeting's command and what Telnyx said of it. A replica that dies before this leaves
    the greeting recorded with its fate unknown: the leader's sweep sends it again (same command id).
    Telnyx's answer is recorded with retries: only the first send's answer can say "nothing was
    spoken" (a resend's "over" cannot), and lost to a database blip it would count the call heard."""
    accepted = await request.app.state.provider.greet(call_id, words, stamp=stamp)
    await with_retries(lambda: calls.greeting_sent(request.app.state.db, stamp, call_id, accepted=accepted),
                       GREETING_RECORD_BUDGET, f"the greeting's answer for reminder {stamp.reminder_id}")
    if accepted is None:
        log.warning("reminder %s: the greeting of call %s got no answer from Telnyx; the sweep sends it again "
                    "while Telnyx dedupes it", stamp.reminder_id, call_id)


async def gather_ended(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> None:
    """The keypad: 1 confirms, 2 declines, OPT_OUT_DIGIT (as the call's wording announced it) lists
    the number; nothing usable → the question once more (round 2, in
    the gather's `client_state`), then goodbye. Only the bound call of a current reminder is heard,
    each round once, and only digits pressed before the call's hang-up. One transaction: the event
    and the answer."""
    assert event.stamp is not None and event.call_id is not None
    provider: Any = request.app.state.provider
    db, stamp, call_id = request.app.state.db, event.stamp, event.call_id
    if event.payload.get("status") == "call_hangup":
        await _record(request, event, background, None)  # ended by the hang-up: no digits to apply
        return
    digits = event.payload.get("digits")
    round_ = Stamp.round_in(event.payload.get("client_state"))
    result = await calls.keypad(db, stamp, call_id, digits if isinstance(digits, str) else None, round_=round_,
                                pressed_at=event.occurred_at, fallback=fallback_wording(request),
                                call_after_confirmation=call_after_confirmation(request),
                                event=_call_event(event, None))
    if not result.event.known or result.event.duplicate:
        return
    if not result.bound or result.wording is None:
        _hang_up(request, event, background)
        return
    if result.repeated:
        return  # this round was answered before: its words were said then
    wording = result.wording
    if result.opted_out:
        said = wording.opted_out
    elif result.answer is not None:
        words = {Confirmation.CONFIRMED: wording.confirmed, Confirmation.DECLINED: wording.declined}
        said = words[result.answer] if result.confirmation == result.answer else wording.goodbye
    elif round_ == 1:  # the question once more (not the message), once the event is acknowledged
        background.add_task(provider.gather_using_speak, call_id, wording.question,
                            command_id=gather_command_id(stamp.attempt_id, 2), stamp=stamp,
                            language=wording.language, round_=2)
        return
    else:
        said = wording.goodbye
    # its `call.speak.ended` hangs up
    background.add_task(provider.speak, call_id, said, command_id=last_words_command_id(stamp.attempt_id),
                        stamp=stamp, language=wording.language)


async def speak_started(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> None:
    """The bound call's message has begun: the reminder's outcome (`answered`), with the event."""
    await _speech(request, event, background, calls.SPEAKING)


async def speak_ended(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> None:
    """The voicemail or the last words were spoken: the call ends."""
    assert event.stamp is not None and event.call_id is not None
    if await _speech(request, event, background, calls.SPOKEN):  # heard too, if `.started` was lost
        background.add_task(request.app.state.provider.hang_up, event.call_id,
                            command_id=hangup_command_id(event.stamp.attempt_id), stamp=event.stamp)


async def _speech(request: Request, event: TelnyxEvent, background: BackgroundTasks, status_: str) -> bool:
    """A speech event applied with the message heard, in one transaction; True if it was new and known."""
    assert event.stamp is not None and event.call_id is not None
    applied = await calls.heard_event(request.app.state.db, event.stamp, event.call_id, _call_event(event, status_))
    if applied.cancel:
        background.add_task(cancel_calls, request, applied.cancel)
    return applied.known and not applied.duplicate


async def hangup(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> None:
    """The call's end; an answered call that ended before any event of its answer was applied (so
    nothing was said into it) has its reminder called again."""
    assert event.stamp is not None and event.call_id is not None
    if (await _apply(request, event, background, hangup_status(event.payload))).recalled:
        log.warning("reminder %s: call %s was answered, but ended before any event of its answer came: nothing "
                    "was said; calling again", event.stamp.reminder_id, event.call_id)


async def incoming(request: Request, event: TelnyxEvent, background: BackgroundTasks) -> None:
    """A customer calls the connection's number: bound to the reminder their number selects if
    their caller ID is attested A (validated), then answered with that reminder's stamp; else
    answered for the neutral message."""
    assert event.call_id is not None
    payload = event.payload
    attested = payload.get("shaken_stir_attestation") == "A" and payload.get("shaken_stir_validated") is True
    found = await identify(request, "telnyx", Caller(number=caller_number(payload.get("from")), attested=attested),
                           event.call_id)
    if found.cancel:
        background.add_task(cancel_calls, request, found.cancel)
    state = found.stamp.encode() if found.stamp is not None else NEUTRAL_STATE
    accepted = await request.app.state.provider.answer(event.call_id, command_id=answer_command_id(event.call_id),
                                                       client_state=state)
    if accepted is not True:
        log.warning("incoming call %s: the answer command %s", event.call_id,
                    "found the call over" if accepted is False else "got no answer from Telnyx")


async def neutral(request: Request, event: TelnyxEvent) -> None:
    """An incoming call that answers no reminder: the neutral message once answered, then hang up."""
    assert event.call_id is not None
    provider: Any = request.app.state.provider
    if event.event_type == "call.answered":
        await provider.say(event.call_id, NEUTRAL_MESSAGE, command_id=f"neutral-{event.call_id}",
                           client_state=NEUTRAL_STATE)
    elif event.event_type == "call.speak.ended":
        await provider.hang_up(event.call_id, command_id=f"hangup-{event.call_id}")


HANDLERS: dict[str, Handler] = {
    "call.initiated": initiated,
    "call.answered": answered,
    "call.speak.started": speak_started,
    "call.speak.ended": speak_ended,
    "call.hangup": hangup,
    "call.gather.ended": gather_ended,
    "call.machine.detection.ended": machine_detection_ended,
    "call.machine.premium.detection.ended": machine_detection_ended,
    "call.machine.greeting.ended": machine_greeting_ended,
    "call.machine.premium.greeting.ended": machine_greeting_ended,
}


@router.post(EVENTS_PATH)
async def events(request: Request, background: BackgroundTasks) -> Response:
    """One signed event of a call: verified first, then applied by its type; always a 200."""
    body = await request.body()
    failure = _signature_failure(request, body)
    if failure is not None:
        signature_refused(request, "telnyx", failure, "telnyx event refused: bad, missing or stale signature")
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="invalid signature")
    event = parse_event(body)
    if event is not None and _foreign(request, event):
        # another application of the account whose webhook URL points here: not ours to apply, and
        # a non-2xx would only send it to that application's failover URL
        TELNYX_FOREIGN_EVENTS.inc()
        log.debug("telnyx event %s of connection %s, not TELNYX_CONNECTION_ID: acknowledged, ignored",
                  event.event_type, event.connection_id)
        return Response(status_code=status.HTTP_200_OK)
    handler = HANDLERS.get(event.event_type) if event is not None else None
    if event is not None and event.stamp is not None and event.call_id is not None and handler is not None:
        try:
            await handler(request, event, background)
        except Exception as error:  # noqa: BLE001 - Telnyx does not deliver again an event answered non-2xx
            log.warning("telnyx event %s of reminder %s not applied (%s): acknowledged, applied again shortly",
                        event.event_type, event.stamp.reminder_id, type(error).__name__)
            background.add_task(_apply_later, request, event, handler)
    elif event is not None and event.stamp is None and event.call_id is not None:
        if event.event_type == "call.initiated" and event.payload.get("direction") == "incoming":
            await incoming(request, event, background)
        elif event.payload.get("client_state") == NEUTRAL_STATE:
            await neutral(request, event)
    return Response(status_code=status.HTTP_200_OK)


async def _apply_later(request: Request, event: TelnyxEvent, handler: Handler) -> None:
    """An event whose handler failed (the database restarting), applied again for up to
    LATE_EVENT_BUDGET seconds after it was acknowledged: answered 5xx, Telnyx would not send it again
    (its failover URL, if any, gets it), and a lost `call.hangup` leaves the outcome to a check 15
    minutes later. An event is one transaction with what it sets off: a failed try left nothing, and
    a try that committed is recognised by its id, its binding and greeting being once however often asked."""
    assert event.stamp is not None
    commands = BackgroundTasks()

    async def once() -> None:
        commands.tasks.clear()  # a failed try's commands are not sent: the next try sets them again
        await handler(request, event, commands)

    try:
        await with_retries(once, LATE_EVENT_BUDGET, f"telnyx event {event.event_type} of reminder "
                           f"{event.stamp.reminder_id}")
    except Exception as error:  # noqa: BLE001 - the leader's sweep settles the call from what is recorded
        log.error("telnyx event %s of reminder %s could not be applied (%s): the leader's sweep settles the call",
                  event.event_type, event.stamp.reminder_id, type(error).__name__)
        return
    await commands()


def _signature_failure(request: Request, body: bytes) -> SignatureFailure | None:
    """Why the event's signature does not hold, None when it does; its headers read so that no
    value (repeated, non-ASCII, `²`, a megabyte of digits) can raise."""
    signature = one_header(request.headers.getlist(SIGNATURE_HEADER), MAX_SIGNATURE_LENGTH)
    timestamp = one_header(request.headers.getlist(TIMESTAMP_HEADER), MAX_TIMESTAMP_LENGTH)
    if isinstance(signature, SignatureFailure):
        return signature
    if isinstance(timestamp, SignatureFailure):
        return timestamp
    check: TelnyxSignature = request.app.state.telnyx_signature
    return check.failure(body, signature, timestamp)


def _foreign(request: Request, event: TelnyxEvent) -> bool:
    """The event names a connection other than TELNYX_CONNECTION_ID (one naming none is ours: the
    field is optional in Telnyx's schema)."""
    ours = getattr(request.app.state, "telnyx_connection_id", None)
    return bool(ours) and event.connection_id is not None and event.connection_id != ours
