"""Database: models, engine and sessions, schema version checks."""

from .engine import Database, SchemaOutOfDate
from .models import (
    Appointment,
    AppointmentStatus,
    AttemptState,
    Base,
    CallAttempt,
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
    "LeaderFence",
    "Reminder",
    "ReminderOutcome",
    "ReminderStatus",
    "SchemaOutOfDate",
]
