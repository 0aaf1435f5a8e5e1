"""What a reminder's call is: its idempotency key, its words, and which appointment fields make it."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from service.privacy import strip_control

__all__ = ["REPLAN_FIELDS", "call_message", "idempotency_key"]

# Fields a call is made of (who, to which number, what it says, when): changing one re-plans the
# pending reminders under new keys, so that a key always stands for one and the same request body.
REPLAN_FIELDS = frozenset({"customer_name", "phone", "starts_at", "timezone", "remind_at", "language"})

_KEY_PREFIX = "reminder-"


def idempotency_key(reminder_id: str) -> str:
    """The key of every call of one reminder: from the reminder alone, never the attempt, replica or time."""
    return f"{_KEY_PREFIX}{reminder_id}"


def call_message(customer_name: str, starts_at: datetime, timezone: str) -> str:
    """The words of the call: stable for a reminder, since its key stands for one body."""
    local = starts_at.astimezone(ZoneInfo(timezone))
    name = " ".join(strip_control(customer_name).split())  # escapes and line breaks are not spoken
    return (
        f"Hello {name}, this is a reminder of your appointment on "
        f"{local:%A %d %B %Y at %H:%M} ({timezone})."
    )
