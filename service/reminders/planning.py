"""Planning: when an appointment's reminders are due, and whether a due one may be called now.

All arithmetic is done on aware datetimes; local times go through the appointment's IANA zone,
so a day with a DST change has its real length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from service.reminders.numbers import NumberPolicy
from service.reminders.rules import CallWindow, ReminderOffset
from service.reminders.wording import MessageTemplates

__all__ = [
    "CallDecision", "Plan", "PlanningConfig", "Unplanned", "decide_call", "fit_call_window", "plan_reminders",
    "offsets_too_close", "spacing_text", "too_close",
]


@dataclass(frozen=True)
class PlanningConfig:
    """What planning takes from the settings: the call window, the default offset rules, which
    numbers may be called at all, the message templates a reminder's wording is rendered from
    when it is planned, how far apart an appointment's reminders must be (MIN_REMINDER_SPACING),
    and whether a confirmed appointment is still called (CALL_AFTER_CONFIRMATION)."""

    call_window: CallWindow
    offsets: tuple[ReminderOffset, ...]
    numbers: NumberPolicy = NumberPolicy()
    templates: MessageTemplates = field(default_factory=lambda: MessageTemplates.parse(None))
    spacing: timedelta = timedelta(0)
    call_after_confirmation: bool = False


@dataclass(frozen=True)
class Unplanned:
    """A reminder rule or time that produced no reminder, and why."""

    rule: str
    reason: str


@dataclass(frozen=True)
class Plan:
    due_times: list[datetime]
    unplanned: list[Unplanned]


def _local(moment: datetime, zone: ZoneInfo) -> datetime:
    return moment.astimezone(zone)


def _at_local(day: datetime, clock, zone: ZoneInfo) -> datetime:
    """The instant `clock` on the local date of `day`; a time skipped by DST moves past the gap."""
    naive = datetime.combine(day.date(), clock)
    # Round-trip through UTC: a non-existent local time (spring forward) comes back normalised.
    return naive.replace(tzinfo=zone).astimezone(UTC)


def fit_call_window(due: datetime, zone: ZoneInfo, window: CallWindow) -> datetime:
    """`due` if it lies in the window, else the latest in-window moment before it."""
    local = _local(due, zone)
    if window.contains(local.time().replace(tzinfo=None)):
        return due.astimezone(UTC)
    if window.end is None:  # open until midnight: the last second of the day before
        return _at_local(local, time(0, 0), zone) - timedelta(seconds=1)
    if local.time() > window.end:
        return _at_local(local, window.end, zone)
    return _at_local(local - timedelta(days=1), window.end, zone)


def _rule_time(rule: ReminderOffset, starts_at: datetime, zone: ZoneInfo) -> datetime:
    if rule.before is not None:
        # In UTC: aware arithmetic in a ZoneInfo zone would be wall-clock time, not elapsed time.
        return starts_at.astimezone(UTC) - rule.before
    assert rule.day is not None and rule.at is not None
    local_start = _local(starts_at, zone)
    return _at_local(local_start + timedelta(days=rule.day), rule.at, zone)


def too_close(times: Iterable[datetime], spacing: timedelta) -> tuple[int, int] | None:
    """The positions of two of `times` closer than `spacing` (exactly `spacing` apart is fine), or None."""
    ordered = sorted(enumerate(times), key=lambda item: item[1])
    for (i, earlier), (j, later) in zip(ordered, ordered[1:], strict=False):
        if later - earlier < spacing:
            return min(i, j), max(i, j)
    return None


def offsets_too_close(offsets: Sequence[ReminderOffset], spacing: timedelta) -> tuple[int, int] | None:
    """The positions of two offset rules of one kind that always plan closer than `spacing`
    (`24h` and `23h30m`; `-1d@18:00` and `-1d@18:30`), or None. Rules of different kinds are
    compared per appointment, when planned."""
    def position(rule: ReminderOffset) -> tuple[str, timedelta]:
        if rule.before is not None:
            return "before", rule.before
        assert rule.day is not None and rule.at is not None
        return "day", timedelta(days=rule.day, hours=rule.at.hour, minutes=rule.at.minute)

    positions = [position(rule) for rule in offsets]
    for i, (kind, at) in enumerate(positions):
        for j in range(i + 1, len(positions)):
            if positions[j][0] == kind and abs(positions[j][1] - at) < spacing:
                return i, j
    return None


def _spaced(due: datetime, due_times: list[datetime], spacing: timedelta) -> bool:
    return all(abs(due - other) >= spacing for other in due_times)


def plan_reminders(
    *,
    starts_at: datetime,
    zone: ZoneInfo,
    window: CallWindow,
    now: datetime,
    offsets: Sequence[ReminderOffset] = (),
    explicit: Iterable[datetime] | None = None,
    owed: Iterable[datetime] = (),
    spacing: timedelta = timedelta(0),
) -> Plan:
    """Due times for an appointment: the explicit times if given, else one per offset rule.

    Each time is moved into the call window (earlier, never later). A time that would not come
    before the appointment, or that has already passed, is reported as unplanned. `owed`: calls an
    earlier plan owed and had not made (a re-plan supersedes them): each stays due, at its time or
    now, whatever the rules say, while the appointment is still ahead (the dispatcher waits for the
    call window). A time that fitting into the window (or an owed call) brings closer than
    `spacing` to one already planned is unplanned too.
    """
    candidates = (
        [(t.isoformat(), t.astimezone(UTC)) for t in explicit]
        if explicit is not None
        else [(str(rule), _rule_time(rule, starts_at, zone)) for rule in offsets]
    )
    due_times: list[datetime] = []
    unplanned: list[Unplanned] = []
    for rule, candidate in candidates:
        due = fit_call_window(candidate, zone, window)
        if due >= starts_at:
            unplanned.append(Unplanned(rule, "no time inside the call window before the appointment"))
        elif due < now:
            unplanned.append(Unplanned(rule, "its time (after fitting the call window) has already passed"))
        elif due in due_times and not spacing:
            continue  # the same time twice: one call
        elif not _spaced(due, due_times, spacing):
            unplanned.append(Unplanned(rule, f"fitting the call window moves it within {spacing_text(spacing)} of "
                                             "another reminder (MIN_REMINDER_SPACING)"))
        else:
            due_times.append(due)
    for moment in owed:
        due = max(moment, now)
        if due >= starts_at:
            unplanned.append(Unplanned("owed by the plan before",
                                       "the appointment starts before the call could be made"))
        elif due in due_times and not spacing:
            continue
        elif not _spaced(due, due_times, spacing):
            unplanned.append(Unplanned("owed by the plan before", f"a reminder of this plan is due within "
                                                                  f"{spacing_text(spacing)} (MIN_REMINDER_SPACING)"))
        else:
            due_times.append(due)
    return Plan(sorted(due_times), unplanned)


def spacing_text(spacing: timedelta) -> str:
    """A spacing as people write it: `1h00m`, `90s`."""
    minutes = int(spacing.total_seconds() // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{int(spacing.total_seconds())}s"


@dataclass(frozen=True)
class CallDecision:
    """What to do with a due reminder now: call, wait until `wait_until`, or skip for `skip_reason`."""

    call: bool = False
    wait_until: datetime | None = None
    skip_reason: str | None = None


def decide_call(
    *,
    scheduled_at: datetime,
    starts_at: datetime,
    zone: ZoneInfo,
    window: CallWindow,
    grace: timedelta,
    now: datetime,
) -> CallDecision:
    """Misfire policy for a reminder that is due (or overdue) at `now`.

    `scheduled_at` is when it was meant to be tried: its due time, a retry's time, or the
    opening of the call window it waited for; lateness is measured from there.
    """
    if now >= starts_at:
        return CallDecision(skip_reason="the appointment has already started")
    lateness = now - scheduled_at
    if lateness > grace:
        late, allowed = int(lateness.total_seconds()), int(grace.total_seconds())
        return CallDecision(skip_reason=f"misfire: {late}s late, grace is {allowed}s")
    local = _local(now, zone)
    if window.contains(local.time().replace(tzinfo=None)):
        return CallDecision(call=True)
    opens = _at_local(local if local.time() < window.start else local + timedelta(days=1), window.start, zone)
    if opens >= starts_at:
        return CallDecision(skip_reason="outside the call window and the appointment starts before it opens")
    return CallDecision(wait_until=opens)
