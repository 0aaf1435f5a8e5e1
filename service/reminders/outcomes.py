"""What a real provider's call achieved and what follows from it: the order of a call's states
(applied by state, never backwards), the reminder's outcome, the keypad answer, machine answers,
and when a call nobody answered is tried again (NO_ANSWER_RETRIES, NO_ANSWER_RETRY_DELAY).

Call states use Twilio's names; other adapters map theirs onto them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, false, or_
from sqlalchemy.sql.elements import ColumnElement

from service.reminders.errors import ReminderError
from service.reminders.planning import decide_call
from service.reminders.rules import CallWindow
from service.sql import none_of, one_of

__all__ = [
    "CALL_ANSWERED",
    "CALL_SPEAKING",
    "CALL_SPOKEN",
    "FINAL_CALL_STATES",
    "LIVE_CALL_STATES",
    "MACHINE_ANSWERS",
    "PRE_ANSWER_STATES",
    "RANG_STATES",
    "Confirmation",
    "NoAnswerPolicy",
    "ReminderOutcome",
    "advances",
    "advances_clause",
    "rank",
    "Answerer",
    "answerer",
    "round_bit",
    "keypad_answer",
    "opts_out",
    "outcome_of_final",
    "retry_time",
]


class ReminderOutcome(StrEnum):
    """What a real provider's call of the reminder achieved (null until known)."""

    ANSWERED = "answered"  # a person answered: the message was spoken
    VOICEMAIL = "voicemail"  # a machine answered: the short voicemail message was left; no retry
    NO_ANSWER = "no_answer"  # it rang out (retried while NO_ANSWER_RETRIES last)
    BUSY = "busy"  # the line was busy (retried like no_answer)
    FAILED = "failed"  # the call could not be completed, or ended without anything spoken


class Confirmation(StrEnum):
    """The customer's keypad answer: 1 confirms the appointment, 2 declines (cancels) it."""

    CONFIRMED = "confirmed"
    DECLINED = "declined"


_KEYS = {"1": Confirmation.CONFIRMED, "2": Confirmation.DECLINED}

# An answered call (Twilio's name; other adapters map theirs onto it).
CALL_ANSWERED = "in-progress"
# Providers whose speech is a command (Telnyx): the bound call's message has begun / ended.
CALL_SPEAKING, CALL_SPOKEN = "speaking", "spoken"
# A call's states in the order they happen; a final one is never followed by another.
_RANK = {"queued": 0, "initiated": 1, "ringing": 2, CALL_ANSWERED: 3, "answered": 3, CALL_SPEAKING: 4,
         CALL_SPOKEN: 5}
# A call in one of these may still ring, speak or be answered; any other state is over.
LIVE_CALL_STATES = frozenset(state for state in _RANK if state != "answered")
FINAL_CALL_STATES = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})
# Statuses of a call that has not been answered yet: it can still be cancelled.
PRE_ANSWER_STATES = ("queued", "initiated", "ringing")
# Statuses that say the call reached the number (it rang, or more): it counts against the caps
# per number (service.reminders.caps) even if a later status hides it (`canceled` after ringing).
RANG_STATES = frozenset({"ringing", CALL_ANSWERED, "answered", CALL_SPEAKING, CALL_SPOKEN, "completed", "no-answer"})
_FINAL_RANK = 6

# Who answered, as each provider's machine detection says it (docs/DESIGN.md, "Machine detection").
# Twilio's AnsweredBy: `human`, `unknown`; `machine_start` (MachineDetection=Enable, as soon as a
# machine is heard); `machine_end_beep`, `machine_end_silence`, `machine_end_other`
# (DetectMessageEnd: the machine's greeting is over, the message can be left); `fax`. Telnyx's
# `call.machine.detection.ended` result: `human`, `machine`, `not_sure`; premium: `human_residence`,
# `human_business`, `machine`, `silence`, `fax_detected`, `not_sure`. Anything unknown is spoken to
# as a person (the providers recommend it for `not_sure`).
MACHINE_ANSWERS = frozenset({"machine", "machine_start", "machine_end_beep", "machine_end_silence",
                             "machine_end_other"})
_FAX = frozenset({"fax", "fax_detected"})


class Answerer(StrEnum):
    """Who answered a call: a person hears the message and the keypad question, a machine the
    short voicemail after its beep, a fax nothing (it is hung up: not a voicemail)."""

    PERSON = "person"
    MACHINE = "machine"
    FAX = "fax"


_OUTCOME_OF_FINAL = {
    "no-answer": ReminderOutcome.NO_ANSWER,
    "busy": ReminderOutcome.BUSY,
    "failed": ReminderOutcome.FAILED,
    # ended without ever being bound (answered while the database was unreachable, or cancelled
    # by someone else): nothing was spoken
    "completed": ReminderOutcome.FAILED,
    "canceled": ReminderOutcome.FAILED,
}


def rank(status: str | None) -> int:
    """Where `status` stands in a call's order of states (-1: unknown, or none yet)."""
    if status is None:
        return -1
    return _FINAL_RANK if status in FINAL_CALL_STATES else _RANK.get(status, -1)



def advances(current: str | None, current_order: int | None, new: str, new_order: int | None) -> bool:
    """Whether event `new` moves a call on from `current`: by state (a call's state never goes
    back), then by the provider's order (Twilio's SequenceNumber, Telnyx's occurred_at); a final
    state is never replaced, a duplicate never applies twice."""
    if current in FINAL_CALL_STATES or rank(new) < 0:
        return False
    if rank(new) != rank(current):
        return rank(new) > rank(current)
    return new_order is not None and (current_order is None or new_order > current_order) and new != current


def advances_clause(current: Any, current_order: Any, new: str, new_order: Any) -> ColumnElement[bool]:
    """`advances(current, current_order, new, new_order)` in SQL, for an UPDATE that applies an
    event in one statement: `current` and `current_order` are the call's columns, `new_order` the
    event's order (a bound parameter). The same rule as `advances`, checked against it state by
    state on both databases (tests/test_outcomes.py)."""
    new_rank = rank(new)
    if new_rank < 0:
        return false()
    states = {state: rank(state) for state in (*_RANK, *FINAL_CALL_STATES)}
    # any unknown state (and none yet) ranks below every known one; a final one above every other
    below = or_(current.is_(None), none_of(current, (s for s, r in states.items() if r >= new_rank)))
    same = [s for s, r in states.items() if r == new_rank and s != new]
    if new_rank == _FINAL_RANK or not same:
        return below
    later = and_(one_of(current, same), new_order.is_not(None),
                 or_(current_order.is_(None), current_order < new_order))
    return or_(below, later)


def outcome_of_final(status: str) -> ReminderOutcome | None:
    """The outcome of a call that ended in `status` without being the reminder's bound call."""
    return _OUTCOME_OF_FINAL.get(status)


def keypad_answer(digits: str | None) -> Confirmation | None:
    """1 → confirmed, 2 → declined; anything else (or nothing) → no answer."""
    return _KEYS.get((digits or "").strip())


def opts_out(digits: str | None, opt_out_digit: str) -> bool:
    """The opt-out key was pressed: the one the call's wording announced (`opt_out_digit`)."""
    return (digits or "").strip() == opt_out_digit


def answerer(answered_by: str | None) -> Answerer:
    """Who answered, from a provider's machine detection result (None: not detected)."""
    value = (answered_by or "").strip().lower()
    if value in MACHINE_ANSWERS:
        return Answerer.MACHINE
    return Answerer.FAX if value in _FAX else Answerer.PERSON


def round_bit(round_: int) -> int:
    """The bit of keypad round `round_` (1, 2, …) in a call's `keypad_rounds`."""
    if not 1 <= round_ <= 30:
        raise ReminderError("a keypad round is 1 to 30")
    return 1 << (round_ - 1)


@dataclass(frozen=True)
class NoAnswerPolicy:
    """NO_ANSWER_RETRIES further calls after NO_ANSWER_RETRY_DELAY, inside CALL_WINDOW."""

    retries: int = 1
    delay: timedelta = timedelta(minutes=30)
    window: CallWindow | None = None  # None: any time of day

    def __post_init__(self) -> None:
        if self.retries < 0 or self.delay <= timedelta(0):
            raise ReminderError("retries must be ≥ 0 and the delay positive")


def retry_time(
    policy: NoAnswerPolicy, *, outcome: ReminderOutcome, retries_used: int, now: datetime,
    starts_at: datetime, timezone: str,
) -> datetime | None:
    """When to call again after `outcome`, or None: only no_answer / busy, while retries last, at
    `now + delay` or the next opening of the call window, and only before the appointment."""
    if outcome not in (ReminderOutcome.NO_ANSWER, ReminderOutcome.BUSY) or retries_used >= policy.retries:
        return None
    at = now + policy.delay
    if policy.window is None:
        return at if at < starts_at else None
    decision = decide_call(scheduled_at=at, starts_at=starts_at, zone=ZoneInfo(timezone), window=policy.window,
                           grace=timedelta.max, now=at)
    if decision.call:
        return at
    return decision.wait_until  # the window's next opening before the appointment, or None (skip)
