"""The shapes of the reminder settings: offset rules and the call window, with their parsers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time, timedelta

from service.reminders.errors import ReminderError

__all__ = ["ALWAYS", "CallWindow", "ReminderOffset", "parse_duration"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """`90m`, `24h`, `1h30m`, `45s`, `2d` → timedelta. A bare number means seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return timedelta(seconds=float(text))
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ReminderError(f"not a duration: {text!r} (use e.g. 90m, 24h, 1h30m)")
    return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))


def _parse_clock(text: str) -> time:
    match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", text.strip())
    if not match:
        raise ReminderError(f"not a time of day: {text!r} (use HH:MM)")
    return time(int(match[1]), int(match[2]))


@dataclass(frozen=True)
class ReminderOffset:
    """One reminder rule: a duration before the appointment, or a local time on a day relative to it."""

    before: timedelta | None = None
    day: int | None = None
    at: time | None = None

    @classmethod
    def parse(cls, text: str) -> ReminderOffset:
        text = text.strip()
        match = re.fullmatch(r"([+-]?\d+)d@(.+)", text)
        if match:
            day = int(match[1])
            if day > 0:
                raise ReminderError(f"{text!r}: a reminder day must not be after the appointment's day")
            return cls(day=day, at=_parse_clock(match[2]))
        before = parse_duration(text)
        if before <= timedelta(0):
            raise ReminderError(f"{text!r}: an offset must be a positive duration before the appointment")
        return cls(before=before)

    def __str__(self) -> str:
        if self.before is not None:
            return f"{int(self.before.total_seconds())}s"
        return f"{self.day}d@{self.at:%H:%M}"


@dataclass(frozen=True)
class CallWindow:
    """Local times of day between which calls may be placed: `start` inclusive; `end` inclusive,
    except that `end=None` (written `24:00`) means "until midnight, exclusive": all day."""

    start: time
    end: time | None

    @classmethod
    def parse(cls, text: str) -> CallWindow:
        start_text, sep, end_text = text.partition("-")
        if not sep:
            raise ReminderError(f"not a window: {text!r} (use HH:MM-HH:MM; 00:00-24:00 is all day)")
        end = None if end_text.strip() == "24:00" else _parse_clock(end_text)
        window = cls(_parse_clock(start_text), end)
        if window.end is not None and window.start >= window.end:
            raise ReminderError(f"{text!r}: the window must start before it ends, within one day")
        return window

    def contains(self, moment: time) -> bool:
        return self.start <= moment and (self.end is None or moment <= self.end)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{'24:00' if self.end is None else format(self.end, '%H:%M')}"


# All day, every day: `00:00-24:00`.
ALWAYS = CallWindow(time(0, 0), None)
