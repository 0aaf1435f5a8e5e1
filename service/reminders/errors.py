"""The reminder domain's one base error. A ValueError: the settings' parsers (durations, offsets,
windows, languages) raise it for pydantic to report, and a write asking for a transition the
lifecycle table lacks raises its `IllegalTransition`."""

from __future__ import annotations

__all__ = ["ReminderError"]


class ReminderError(ValueError):
    """A value or a change the reminder domain refuses."""
