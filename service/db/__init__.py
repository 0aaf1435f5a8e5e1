"""Database: models, engine and sessions, schema version checks."""

from .engine import Database, SchemaOutOfDate
from .models import Appointment, AppointmentStatus, Base, LeaderFence, Reminder, ReminderStatus

__all__ = [
    "Appointment",
    "AppointmentStatus",
    "Base",
    "Database",
    "LeaderFence",
    "Reminder",
    "ReminderStatus",
    "SchemaOutOfDate",
]
