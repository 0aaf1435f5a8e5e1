"""Customers who call back, for every provider (docs/decisions/0252): who the caller is, what an
unattested caller gets, and the one question the ledger answers (`callbacks.call_back`).

- The caller's number is read with the project's one phone rule (`parse_phone`): anything else
  (a withheld number, `anonymous`, a SIP URI, garbage) is `withheld`.
- Only STIR/SHAKEN attestation A (the carrier vouches that the caller may use that number) lets a
  call-back select, hear or answer a reminder: B, C, a failed verification or none hears the
  neutral message and changes nothing (`unattested`). A spoofed caller ID is exactly a number
  the caller does not own; B and C do not rule it out.
- An attested number with no reminder to answer hears the same neutral message (`unknown`): what
  the caller hears never tells whether the number has an appointment.

Each incoming call is counted once in `reminders_incoming_calls_total{provider,result}`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

from fastapi import Request

from service.ledger import callbacks
from service.metrics import INCOMING_CALLS
from service.privacy import mask_phone
from service.providers.common import fallback_wording, with_retries
from service.reminders.errors import ReminderError
from service.reminders.numbers import parse_phone

__all__ = ["NEUTRAL_MESSAGE", "Caller", "IncomingResult", "identify"]

log = logging.getLogger(__name__)

# What every caller who does not hear a reminder hears: true whoever calls, nothing of anyone's
# appointment, not even whether the number has one.
NEUTRAL_MESSAGE = ("This is the appointment reminder line. There is no reminder we can play on this call. "
                   "Goodbye.")
# A call-back's one transaction is tried this long (seconds) while the database fails: the caller
# is waiting on the line (Twilio waits 15 s for the TwiML; Telnyx's answer command can wait).
INCOMING_DATABASE_BUDGET = 6.0


class IncomingResult(StrEnum):
    IDENTIFIED = "identified"
    UNATTESTED = "unattested"
    WITHHELD = "withheld"
    UNKNOWN = "unknown"
    ERROR = "error"


@dataclass(frozen=True)
class Caller:
    """The caller ID of an incoming call as the provider reported it."""

    number: str | None  # E.164 by the phone rule; None: withheld or not a number
    attested: bool  # STIR/SHAKEN attestation A, verified


def caller_number(text: object) -> str | None:
    """The caller's number in E.164 by the project's phone rule, or None (withheld, anonymous, …)."""
    if not isinstance(text, str) or not 0 < len(text) <= 64:
        return None
    try:
        return str(parse_phone(text.strip()))
    except (ReminderError, ValueError):
        return None


async def identify(request: Request, provider: str, caller: Caller, call_id: str) -> callbacks.CallBack:
    """The reminder an incoming call answers (bound to it, through the first-answer gate), or an
    empty `CallBack` when the caller hears the neutral message. Counted once, by result."""
    result, found = IncomingResult.UNKNOWN, callbacks.CallBack()
    if caller.number is None:
        result = IncomingResult.WITHHELD
    elif not caller.attested:
        result = IncomingResult.UNATTESTED
    else:
        number = caller.number
        try:
            found = await with_retries(
                lambda: callbacks.call_back(request.app.state.db, number, call_id, fallback=fallback_wording(request)),
                INCOMING_DATABASE_BUDGET, f"incoming call {call_id}")
        except Exception as error:  # noqa: BLE001 - the caller hears the neutral message, nothing changes
            log.warning("incoming call %s: database unavailable (%s); the neutral message", call_id,
                        type(error).__name__)
            result = IncomingResult.ERROR
        else:
            result = IncomingResult.IDENTIFIED if found.stamp is not None else IncomingResult.UNKNOWN
    INCOMING_CALLS.labels(provider, result.value).inc()
    shown = mask_phone(caller.number) if caller.number else "withheld"
    if found.stamp is not None:
        log.info("incoming call %s from %s: reminder %s (was %s) bound to it, attempt %s", call_id, shown,
                 found.stamp.reminder_id, found.was, found.stamp.attempt_id)
    else:
        log.info("incoming call %s from %s: %s, the neutral message", call_id, shown, result.value)
    return found
