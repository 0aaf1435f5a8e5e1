"""Twilio's webhooks: `POST /telephony/twilio/{voice,status,gather,incoming}`, on every replica.

Each request's `X-Twilio-Signature` is checked against PUBLIC_URL + path + query before anything
is read from or written to the database: a bad, missing, repeated or malformed one is a 403 and
nothing happens (counted by reason, warned of at most once a minute: `common.SignatureRefusals`).
Every validly signed request gets a 2xx; an event for an unknown, finished or already bound call
changes nothing. The voice route always answers TwiML: the message for the reminder's bound call,
`<Hangup/>` for any other. The incoming route (the number's voice URL: customers who call back,
docs/decisions/0252) answers the message and the keypad question to an attested caller whose number
selects a reminder, and a neutral message to anyone else; its digits go to the gather route as a
bound call's.

The app provides `app.state.db`, `app.state.twilio_signature` (`TwilioSignature`),
`app.state.provider` (to cancel a bound reminder's other calls, after the response is sent), and
optionally `app.state.no_answer_policy` (`NoAnswerPolicy`; absent: no retries) and
`app.state.templates` (`MessageTemplates`, for reminders planned before wording was stored).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode

from fastapi import BackgroundTasks, HTTPException, Request, Response, status
from starlette.datastructures import FormData

from service.ledger import calls
from service.privacy import mask_phone
from service.providers.callers import NEUTRAL_MESSAGE, Caller, caller_number, identify
from service.providers.common import (
    call_after_confirmation,
    cancel_calls,
    fallback_wording,
    signature_refused,
    with_retries,
)
from service.providers.routes import WebhookRoutes
from service.providers.twilio.rest import WEBHOOK_PATHS
from service.providers.twilio.signature import (
    MAX_SIGNATURE_LENGTH,
    SIGNATURE_HEADER,
    SIGNATURE_HEADERS,
    TwilioSignature,
)
from service.providers.twilio.twiml import gather_twiml, hangup_twiml, hold_twiml, say_twiml
from service.reminders import Confirmation, answerer
from service.telephony.provider import Stamp
from service.telephony.webhook import SignatureFailure, one_header

__all__ = ["router"]

log = logging.getLogger(__name__)

router = WebhookRoutes()

_TWIML = "application/xml"
_ROUND = "n"  # on the gather URL: which time the keypad question is asked (1, 2)
_DIGITS = re.compile(r"[0-9]{1,17}")
_SID = re.compile(r"[A-Za-z0-9-]{1,64}")
# Seconds a webhook keeps trying a database that fails (a restart, a failover) before it gives up:
# the voice request well inside Twilio's 15 s, so that a call answered during a short outage still
# hears its message; a status event a little less (Twilio does not send it again).
VOICE_DATABASE_BUDGET = 8.0
# The first voice request gives up sooner, inside the 6 s Twilio waits for it (VOICE_OVERRIDES),
# so that the FallbackUrl — another replica — gets its turn.
FIRST_VOICE_DATABASE_BUDGET = 4.0
STATUS_DATABASE_BUDGET = 5.0
# How often a call is held — a second of silence, then the voice URL again (any replica) — while
# the database fails, once the first request and its fallback could not reach it: each try up to
# VOICE_DATABASE_BUDGET, so at most about 4 + 4 × 9 s of silence before the call is hung up.
VOICE_HOLDS = 3
_HOLD = "hold"  # on a held call's voice URL: how often it was held
_ANSWERED_BY = "ab"  # and Twilio's AnsweredBy, should a redirected request not carry it
_DIGITS_HELD = "d"  # on a held keypad answer's gather URL: the digits Twilio posted


async def _verified(request: Request) -> FormData:
    """The POST form, once the signature over PUBLIC_URL + path + query holds; else 403.

    Twilio posts `application/x-www-form-urlencoded`: parsed here, with no multipart parser."""
    signature: TwilioSignature = request.app.state.twilio_signature
    form = FormData(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
    query = request.scope.get("query_string", b"").decode("latin-1")
    # the first of the names present, as before (SignalWire may send both), and given once
    name = next((name for name in SIGNATURE_HEADERS if name in request.headers), SIGNATURE_HEADER)
    given = one_header(request.headers.getlist(name), MAX_SIGNATURE_LENGTH)
    failure = given if isinstance(given, SignatureFailure) else signature.failure(request.scope["path"], query,
                                                                                  form, given)
    if failure is not None:
        signature_refused(request, "twilio", failure,
                          f"twilio webhook {request.scope['path']} refused: bad or missing signature")
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="invalid signature")
    return form


def _sequence(form: FormData) -> int | None:
    value = form.get("SequenceNumber")
    # ASCII digits only: `²` passes isdigit() and fails int()
    return int(value) if isinstance(value, str) and _DIGITS.fullmatch(value) else None


def _call_sid(form: FormData) -> str | None:
    """Twilio's `CA…` sid, or SignalWire's UUID (ASCII letters, digits and dashes)."""
    value = form.get("CallSid")
    return value if isinstance(value, str) and _SID.fullmatch(value) else None


def _gather_url(request: Request, stamp: Stamp, round_: int) -> str:
    """Where the keypad's digits go: PUBLIC_URL + the gather route + the stamp + the question's round."""
    signature: TwilioSignature = request.app.state.twilio_signature
    return signature.signed_url(WEBHOOK_PATHS["gather"], urlencode({**stamp.query(), _ROUND: str(round_)}))


def _holds(request: Request) -> int:
    """How often the call was held already (from our own signed URL; 0 for Twilio's first asks)."""
    value = request.query_params.get(_HOLD, "")
    return min(int(value), VOICE_HOLDS) if _DIGITS.fullmatch(value) and len(value) < 3 else 0


def _held(request: Request, route: str, stamp: Stamp, holds: int, keep: dict[str, str | None]) -> Response:
    """A held call's TwiML: silence, then `route` again (PUBLIC_URL + path) with the stamp, the holds
    so far and what the next request must still know (`keep`: Twilio's AnsweredBy, the digits)."""
    signature: TwilioSignature = request.app.state.twilio_signature
    query = {**stamp.query(), _HOLD: str(holds), **{name: value for name, value in keep.items() if value}}
    return _twiml(hold_twiml(signature.signed_url(WEBHOOK_PATHS[route], urlencode(query))))


def _twiml(body: str) -> Response:
    return Response(body, media_type=_TWIML)


@router.post(WEBHOOK_PATHS["voice"])
async def voice(request: Request, background: BackgroundTasks) -> Response:
    """An answered call asks what to do: the message and the keypad question if it is (or becomes)
    the bound call of a current reminder and a person answered; the short voicemail if a machine
    did (after its greeting: MachineDetection=DetectMessageEnd); else hang up (a fax too).

    The same request comes again at the FallbackUrl (another replica, with `ErrorCode`) when this
    one failed or stalled; it is the same call, so the bound call's words are said by whichever
    answer Twilio takes. A database that stays down: the first request answers 503, so that the
    fallback tries; the fallback holds the call (silence, then this URL again) up to VOICE_HOLDS
    times, then hangs up (an unknown state must not speak)."""
    form = await _verified(request)
    stamp, call_sid = Stamp.from_query(request.query_params), _call_sid(form)
    if stamp is None or call_sid is None:
        return _twiml(hangup_twiml())
    holds = _holds(request)
    given = form.get("AnsweredBy") if isinstance(form.get("AnsweredBy"), str) else None
    answered_by = given or (request.query_params.get(_ANSWERED_BY) if holds else None)
    who = answerer(answered_by)  # type: ignore[arg-type]
    first = holds == 0 and "ErrorCode" not in form
    try:
        result = await with_retries(
            lambda: calls.answer(request.app.state.db, stamp, call_sid, who=who, answered_by=answered_by,  # type: ignore[arg-type]
                                 fallback=fallback_wording(request)),
            getattr(request.app.state, "voice_database_budget",
                    FIRST_VOICE_DATABASE_BUDGET if first else VOICE_DATABASE_BUDGET),
            f"voice webhook for reminder {stamp.reminder_id}",
        )
    except Exception as error:  # noqa: BLE001 - an unknown state must not speak
        if first:
            log.warning("voice webhook for reminder %s: database unavailable (%s); 503: Twilio asks the fallback URL",
                        stamp.reminder_id, type(error).__name__)
            return Response(status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
        if holds < VOICE_HOLDS:
            log.warning("voice webhook for reminder %s: database unavailable (%s); the call is held (%d of %d)",
                        stamp.reminder_id, type(error).__name__, holds + 1, VOICE_HOLDS)
            return _held(request, "voice", stamp, holds + 1, {_ANSWERED_BY: answered_by[:32] if answered_by else None})
        log.warning("voice webhook for reminder %s: database unavailable (%s); hanging up", stamp.reminder_id,
                    type(error).__name__)
        return _twiml(hangup_twiml())
    if result.cancel:
        background.add_task(cancel_calls, request, result.cancel)
    if not result.speak or result.wording is None:
        log.info("call %s to %s answered (%s), reminder %s is bound to another call or no longer calls: hang up",
                 call_sid, mask_phone(str(form.get("To", ""))), who, stamp.reminder_id)
        return _twiml(hangup_twiml())
    if result.newly_bound:
        log.info("reminder %s bound to call %s (attempt %s)%s", stamp.reminder_id, call_sid, stamp.attempt_id,
                 ", a machine: voicemail" if result.machine else "")
    wording = result.wording
    if result.machine:
        return _twiml(say_twiml(wording.voicemail, language=wording.language))
    text = f"{wording.message} {wording.question}"
    return _twiml(gather_twiml(text, language=wording.language, action=_gather_url(request, stamp, 1)))


@router.post(WEBHOOK_PATHS["status"])
async def status_event(request: Request, background: BackgroundTasks) -> Response:
    """A call's progress (initiated, ringing, answered, completed, no-answer, busy, …), applied by
    state and SequenceNumber; the reminder's last call ending unanswered records its outcome."""
    form = await _verified(request)
    stamp, call_sid = Stamp.from_query(request.query_params), _call_sid(form)
    call_status = form.get("CallStatus")
    if stamp is not None and call_sid is not None and isinstance(call_status, str) and len(call_status) <= 32:
        sequence, policy = _sequence(form), getattr(request.app.state, "no_answer_policy", None)
        result = await with_retries(
            lambda: calls.record_event(request.app.state.db, stamp, call_sid, call_status, sequence, policy),
            STATUS_DATABASE_BUDGET, f"status webhook for reminder {stamp.reminder_id}",
        )
        if result.cancel:
            background.add_task(cancel_calls, request, result.cancel)
        if result.recalled:
            log.warning("reminder %s: call %s was answered, but ended before its voice request was answered: "
                        "nothing was said; calling again", stamp.reminder_id, call_sid)
        elif result.retry_at is not None:
            log.info("reminder %s: %s, calling again at %s", stamp.reminder_id, result.outcome,
                     result.retry_at.isoformat(timespec="seconds"))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(WEBHOOK_PATHS["gather"])
async def gather(request: Request) -> Response:
    """The keypad: 1 confirms, 2 declines, OPT_OUT_DIGIT (as the call's wording announced it) lists
    the number; nothing usable → the question once more, then goodbye. The database failing: the
    call is held (silence, then this URL again with the digits) as the voice route holds it.
    Only the bound call of a current reminder is heard, each round once (a repeat of a round hears
    the words again and changes nothing); any other gets <Hangup/> and changes nothing."""
    form = await _verified(request)
    stamp, call_sid = Stamp.from_query(request.query_params), _call_sid(form)
    if stamp is None or call_sid is None:
        return _twiml(hangup_twiml())
    holds = _holds(request)
    given = form.get("Digits")
    # a held keypad answer carries its digits in our own signed URL (a redirect posts none)
    digits = given if isinstance(given, str) else (request.query_params.get(_DIGITS_HELD) if holds else None)
    round_ = 2 if request.query_params.get(_ROUND) == "2" else 1  # in the signed URL: ours
    try:
        result = await with_retries(
            lambda: calls.keypad(request.app.state.db, stamp, call_sid, digits if isinstance(digits, str) else None,
                                 round_=round_, fallback=fallback_wording(request),
                                 call_after_confirmation=call_after_confirmation(request)),
            getattr(request.app.state, "voice_database_budget", VOICE_DATABASE_BUDGET),
            f"gather webhook for reminder {stamp.reminder_id}",
        )
    except Exception as error:  # noqa: BLE001 - Twilio must hear TwiML; held, then the customer can answer next time
        if holds < VOICE_HOLDS:
            log.warning("gather webhook for reminder %s: database unavailable (%s); the call is held (%d of %d)",
                        stamp.reminder_id, type(error).__name__, holds + 1, VOICE_HOLDS)
            return _held(request, "gather", stamp, holds + 1,
                         {_ROUND: str(round_), _DIGITS_HELD: digits[:17] if isinstance(digits, str) else None})
        log.warning("gather webhook for reminder %s: database unavailable (%s); hanging up", stamp.reminder_id,
                    type(error).__name__)
        return _twiml(hangup_twiml())
    if not result.bound or result.wording is None:
        return _twiml(hangup_twiml())
    wording = result.wording
    if result.opted_out:
        if result.changed:
            log.info("reminder %s: the customer asked for no more calls; the number is on the do-not-call list",
                     stamp.reminder_id)
        return _twiml(say_twiml(wording.opted_out, language=wording.language))
    if result.changed:
        log.info("reminder %s: the customer %s the appointment", stamp.reminder_id, result.answer)
    if result.answer is not None:
        words = {Confirmation.CONFIRMED: wording.confirmed, Confirmation.DECLINED: wording.declined}
        # a repeat of an answer already recorded hears it again; an answer too late (the appointment
        # was cancelled meanwhile) hears goodbye
        said = words[result.answer] if result.confirmation == result.answer else wording.goodbye
        return _twiml(say_twiml(said, language=wording.language))
    if round_ == 1:  # the question once more (not the message)
        return _twiml(gather_twiml(wording.question, language=wording.language, action=_gather_url(request, stamp, 2)))
    return _twiml(say_twiml(wording.goodbye, language=wording.language))


# Twilio's `StirVerstat` of a caller ID the carrier verified with attestation A ("Trusted Calling
# with SHAKEN/STIR"); -B, -C, TN-Validation-Failed-*, No-TN-Validation, or none: not attested.
ATTESTED_A = "TN-Validation-Passed-A"


@router.post(WEBHOOK_PATHS["incoming"])
async def incoming(request: Request, background: BackgroundTasks) -> Response:
    """A customer calls the number (its voice URL): an attested caller (StirVerstat A) whose number
    selects a reminder hears its message and the keypad question, their digits going to the gather
    route as the bound call's; anyone else hears the neutral message (docs/decisions/0252)."""
    form = await _verified(request)
    call_sid = _call_sid(form)
    if call_sid is None:
        return _twiml(hangup_twiml())
    caller = Caller(number=caller_number(form.get("From")), attested=form.get("StirVerstat") == ATTESTED_A)
    found = await identify(request, "twilio", caller, call_sid)
    if found.stamp is None or found.wording is None:
        return _twiml(say_twiml(NEUTRAL_MESSAGE))
    if found.cancel:
        background.add_task(cancel_calls, request, found.cancel)
    wording = found.wording
    text = f"{wording.message} {wording.question}"
    return _twiml(gather_twiml(text, language=wording.language, action=_gather_url(request, found.stamp, 1)))
