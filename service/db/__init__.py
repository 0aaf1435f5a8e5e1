"""Database: models, engine and sessions, schema version checks."""

from .engine import Database, SchemaOutOfDate
from .models import (
    Appointment,
    AppointmentStatus,
    AttemptState,
    Base,
    CallAttempt,
    Event,
    EventFeed,
    LeaderFence,
    Reminder,
    ReminderOutcome,
    ReminderStatus,
)

__all__ = [
    "Appointment",
    "AppointmentStatus",
    "AttemptState",
    "Base",
    "CallAttempt",
    "Database",
    "Event",
    "EventFeed",
    "LeaderFence",
    "Reminder",
    "ReminderOutcome",
    "ReminderStatus",
    "SchemaOutOfDate",
]
