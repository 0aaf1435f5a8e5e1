"""Reminder planning and the misfire / call-window decision, including DST days."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from service.config import CallWindow, ReminderOffset, parse_duration
from service.reminders import decide_call, fit_call_window, plan_reminders

NY = ZoneInfo("America/New_York")
UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
WINDOW = CallWindow.parse("08:00-21:00")
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


def offsets(text: str) -> list[ReminderOffset]:
    return [ReminderOffset.parse(part) for part in text.split(",")]


def plan(starts_at: datetime, zone: ZoneInfo, rules: str, now: datetime = LONG_AGO):
    return plan_reminders(starts_at=starts_at, zone=zone, window=WINDOW, now=now, offsets=offsets(rules))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("24h", 86400), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("2d", 172800), ("30", 30), ("500ms", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "h", "10x", "1h 30", "-5m", "1h-2m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["0m", "1d@09:00", "-1d@25:00", "2h@09:00", "x"])
def test_bad_offsets(text: str) -> None:
    with pytest.raises(ValueError):
        ReminderOffset.parse(text)


def test_duration_offset_inside_window() -> None:
    starts = datetime(2030, 6, 12, 15, 0, tzinfo=UTC)
    result = plan(starts, ZoneInfo("UTC"), "24h,2h")
    assert result.due_times == [starts - timedelta(hours=24), starts - timedelta(hours=2)]
    assert result.unplanned == []


def test_day_at_local_time() -> None:
    starts = datetime(2030, 6, 12, 14, 0, tzinfo=BERLIN)  # CEST, UTC+2
    result = plan(starts, BERLIN, "-1d@09:00,0d@08:30")
    assert result.due_times == [
        datetime(2030, 6, 11, 7, 0, tzinfo=UTC),
        datetime(2030, 6, 12, 6, 30, tzinfo=UTC),
    ]


def test_outside_window_moves_to_latest_earlier_moment() -> None:
    # 24h before a 07:00 appointment is 07:00 the day before: too early, so 21:00 two days before.
    starts = datetime(2030, 6, 12, 7, 0, tzinfo=UTC)
    assert plan(starts, ZoneInfo("UTC"), "24h").due_times == [datetime(2030, 6, 10, 21, 0, tzinfo=UTC)]
    # 2h before 23:30 is 21:30: late, so 21:00 the same day.
    starts = datetime(2030, 6, 12, 23, 30, tzinfo=UTC)
    assert plan(starts, ZoneInfo("UTC"), "2h").due_times == [datetime(2030, 6, 12, 21, 0, tzinfo=UTC)]


def test_no_time_before_the_appointment_is_unplanned() -> None:
    # 30 minutes before a 08:10 appointment is 07:40: the window's latest earlier moment is the
    # previous evening, which is fine; but 0d@22:00 on the appointment's day cannot precede it.
    starts = datetime(2030, 6, 12, 8, 10, tzinfo=UTC)
    result = plan(starts, ZoneInfo("UTC"), "30m,0d@09:00")
    assert result.due_times == [datetime(2030, 6, 11, 21, 0, tzinfo=UTC)]
    assert [u.rule for u in result.unplanned] == ["0d@09:00"]
    assert "before the appointment" in result.unplanned[0].reason


def test_past_times_are_unplanned() -> None:
    starts = datetime(2030, 6, 12, 15, 0, tzinfo=UTC)
    result = plan(starts, ZoneInfo("UTC"), "24h,1h", now=starts - timedelta(hours=3))
    assert result.due_times == [starts - timedelta(hours=1)]
    assert "passed" in result.unplanned[0].reason


def test_duplicates_collapse() -> None:
    starts = datetime(2030, 6, 12, 6, 0, tzinfo=UTC)
    # Both rules land before 08:00 and move to 21:00 the previous day.
    result = plan(starts, ZoneInfo("UTC"), "1h,2h")
    assert result.due_times == [datetime(2030, 6, 11, 21, 0, tzinfo=UTC)]


def test_dst_spring_forward_day_has_23_hours() -> None:
    # New York springs forward on 2030-03-10 at 02:00. 24h before 12:00 EDT is 11:00 EST local.
    starts = datetime(2030, 3, 10, 12, 0, tzinfo=NY)
    (due,) = plan(starts, NY, "24h").due_times
    assert due == datetime(2030, 3, 9, 16, 0, tzinfo=UTC)
    assert due.astimezone(NY).hour == 11
    # A local-time rule keeps the wall clock: 09:00 the day before is 09:00 EST = 14:00 UTC.
    (local_rule,) = plan(starts, NY, "-1d@09:00").due_times
    assert local_rule == datetime(2030, 3, 9, 14, 0, tzinfo=UTC)


def test_dst_fall_back_day_has_25_hours() -> None:
    # New York falls back on 2030-11-03 at 02:00. 24h before 12:00 EST is 13:00 EDT local.
    starts = datetime(2030, 11, 3, 12, 0, tzinfo=NY)
    (due,) = plan(starts, NY, "24h").due_times
    assert due.astimezone(NY).hour == 13
    # The window's end on that day is 21:00 EST (UTC-5), one hour later in UTC than the day before.
    late = datetime(2030, 11, 3, 22, 0, tzinfo=NY)
    assert fit_call_window(late.astimezone(UTC), NY, WINDOW) == datetime(2030, 11, 4, 2, 0, tzinfo=UTC)
    before = datetime(2030, 11, 2, 22, 0, tzinfo=NY)
    assert fit_call_window(before.astimezone(UTC), NY, WINDOW) == datetime(2030, 11, 3, 1, 0, tzinfo=UTC)


def test_dst_gap_local_time_is_normalised() -> None:
    window = CallWindow.parse("00:00-24:00")
    starts = datetime(2030, 3, 10, 12, 0, tzinfo=NY)
    result = plan_reminders(starts_at=starts, zone=NY, window=window, now=LONG_AGO, offsets=offsets("0d@02:30"))
    # 02:30 does not exist that day; it comes out as 03:30 EDT (07:30 UTC).
    assert result.due_times == [datetime(2030, 3, 10, 7, 30, tzinfo=UTC)]


def test_explicit_times_replace_the_policy() -> None:
    starts = datetime(2030, 6, 12, 15, 0, tzinfo=UTC)
    explicit = [datetime(2030, 6, 12, 10, 0, tzinfo=UTC), datetime(2030, 6, 12, 3, 0, tzinfo=UTC)]
    result = plan_reminders(
        starts_at=starts, zone=ZoneInfo("UTC"), window=WINDOW, now=LONG_AGO, offsets=offsets("24h"), explicit=explicit
    )
    assert result.due_times == [datetime(2030, 6, 11, 21, 0, tzinfo=UTC), datetime(2030, 6, 12, 10, 0, tzinfo=UTC)]


def decide(now: datetime, scheduled: datetime, starts: datetime, zone: ZoneInfo = UTC_ZONE):
    return decide_call(
        scheduled_at=scheduled, starts_at=starts, zone=zone, window=WINDOW, grace=timedelta(minutes=30), now=now
    )


def test_decide_call_on_time() -> None:
    now = datetime(2030, 6, 12, 12, 0, tzinfo=UTC)
    assert decide(now, now - timedelta(minutes=5), now + timedelta(hours=1)).call


def test_decide_misfire_skips_with_reason() -> None:
    now = datetime(2030, 6, 12, 12, 0, tzinfo=UTC)
    decision = decide(now, now - timedelta(minutes=31), now + timedelta(hours=1))
    assert not decision.call and "misfire" in decision.skip_reason


def test_decide_appointment_started_skips() -> None:
    now = datetime(2030, 6, 12, 12, 0, tzinfo=UTC)
    decision = decide(now, now - timedelta(minutes=1), now - timedelta(seconds=1))
    assert "started" in decision.skip_reason


def test_decide_outside_window_waits_or_skips() -> None:
    now = datetime(2030, 6, 12, 21, 10, tzinfo=UTC)
    waits = decide(now, now - timedelta(minutes=1), now + timedelta(days=1))
    assert waits.wait_until == datetime(2030, 6, 13, 8, 0, tzinfo=UTC)
    skips = decide(now, now - timedelta(minutes=1), now + timedelta(hours=2))
    assert "window" in skips.skip_reason


def test_all_day_window_ends_exclusive_at_midnight() -> None:
    window = CallWindow.parse("00:00-24:00")
    assert str(window) == "00:00-24:00"
    # the last minute of the day is inside ("00:00-23:59" stalled there: 23:59:30 was outside)
    assert window.contains(datetime(2030, 1, 1, 23, 59, 30).time())
    late = datetime(2030, 1, 1, 23, 59, 30, tzinfo=UTC)
    decision = decide_call(
        scheduled_at=late, starts_at=late + timedelta(hours=1), zone=ZoneInfo("UTC"), window=window,
        grace=timedelta(minutes=5), now=late,
    )
    assert decision.call


def test_window_until_midnight_moves_an_early_time_to_the_evening_before() -> None:
    window = CallWindow.parse("08:00-24:00")
    early = datetime(2030, 1, 2, 5, 0, tzinfo=BERLIN)
    assert fit_call_window(early.astimezone(UTC), BERLIN, window) == datetime(2030, 1, 1, 23, 59, 59, tzinfo=BERLIN)


@pytest.mark.parametrize("text", ["00:00-24:01", "24:00-24:00", "08:00-25:00", "24:00-08:00"])
def test_24_is_only_an_end(text: str) -> None:
    with pytest.raises(ValueError):
        CallWindow.parse(text)
