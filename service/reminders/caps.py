"""Caps on calls per number (MAX_CALLS_PER_NUMBER_PER_DAY, MAX_CALLS_PER_NUMBER_PER_WEEK): how
many calls one number may get in any rolling 24 hours and 7 days, across all its appointments,
and what a reminder over a cap does instead — wait for the next allowed time, or be skipped when
that comes too late (docs/decisions/0231).

What counts is decided where the calls are stored (service.ledger.claims): every call the
provider reported ringing or later, every call whose fate is not known yet (in doubt, queued,
being placed), and the calls the leader is placing right now. Here: the rule over those times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from service.reminders.errors import ReminderError
from service.reminders.planning import decide_call
from service.reminders.rules import CallWindow

__all__ = ["CAP_SPANS", "IN_FLIGHT_RECHECK", "CallCaps", "CapHold", "cap_hold"]

# The rolling spans of the caps, by the name the settings and the metrics use.
CAP_SPANS = {"day": timedelta(days=1), "week": timedelta(days=7)}
# A reminder held back only by calls being placed right now looks again this soon: whether those
# reach the number is known by then.
IN_FLIGHT_RECHECK = timedelta(seconds=5)


@dataclass(frozen=True)
class CallCaps:
    """At most `per_day` calls to a number in any 24 hours and `per_week` in any 7 days (0: no cap)."""

    per_day: int = 0
    per_week: int = 0

    def __post_init__(self) -> None:
        if self.per_day < 0 or self.per_week < 0:
            raise ReminderError("a cap is a number of calls ≥ 0 (0: no cap)")

    @property
    def active(self) -> bool:
        return bool(self.per_day or self.per_week)

    @property
    def lookback(self) -> timedelta:
        """How far back the calls that count go."""
        return CAP_SPANS["week"] if self.per_week else CAP_SPANS["day"]

    def limits(self) -> list[tuple[str, int]]:
        return [(span, cap) for span, cap in (("day", self.per_day), ("week", self.per_week)) if cap]


@dataclass(frozen=True)
class CapHold:
    """A reminder over a cap: it waits until `wait_until`, or is skipped for `skip_reason`; `cap`
    names the cap that holds it (`day`, `week`)."""

    cap: str
    wait_until: datetime | None = None
    skip_reason: str | None = None


def _allowed_from(times: list[datetime], cap: int, span: timedelta, now: datetime) -> datetime | None:
    """When one more call fits under `cap` calls per `span` (None: now)."""
    recent = sorted((t for t in times if t > now - span), reverse=True)
    if len(recent) < cap:
        return None
    return recent[cap - 1] + span  # the cap-th newest call leaves the span then


def cap_hold(
    caps: CallCaps, *, calls: Sequence[datetime], in_flight: int, now: datetime, starts_at: datetime,
    zone: ZoneInfo, window: CallWindow,
) -> CapHold | None:
    """Whether a reminder may call its number now (None), given when each counted call to the
    number was placed (`calls`) and how many are being placed right now (`in_flight`, counted as
    placed now). Held: it waits for the next allowed time — fitted into the call window — if that
    comes before the appointment, else it is skipped with the reason."""
    if not caps.active:
        return None
    placed = [*calls, *([now] * in_flight)]
    allowed, holding = None, None
    for name, cap in caps.limits():
        at = _allowed_from(placed, cap, CAP_SPANS[name], now)
        if at is not None and (allowed is None or at > allowed):
            allowed, holding = at, (name, cap)
    if allowed is None or holding is None:
        return None
    name, cap = holding
    if in_flight and all(_allowed_from(list(calls), c, CAP_SPANS[n], now) is None for n, c in caps.limits()):
        # only the calls being placed now hold it back: they may not reach anyone
        allowed = min(allowed, now + IN_FLIGHT_RECHECK)
    decision = decide_call(scheduled_at=allowed, starts_at=starts_at, zone=zone, window=window,
                           grace=timedelta.max, now=allowed)
    if decision.call:
        return CapHold(name, wait_until=allowed)
    if decision.wait_until is not None:
        return CapHold(name, wait_until=decision.wait_until)
    return CapHold(name, skip_reason=f"call cap: {cap} call(s) per {name} to this number; the next allowed time "
                                     "is not before the appointment")
