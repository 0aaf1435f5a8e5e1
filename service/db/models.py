"""Tables: appointments, their reminders (one row each), call attempts (real providers), the leader
fence, the do-not-call list, the service's keys, and the events' outbox with its feed's counters."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text, literal_column, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.db.clock import UTCDateTime, db_now, utcnow
from service.reminders.attempts import AttemptState
from service.reminders.lifecycle import ReminderStatus
from service.reminders.outcomes import Confirmation, ReminderOutcome
from service.reminders.wording import DEFAULT_LANGUAGE

__all__ = [
    "FEED_ROW", "Appointment", "AppointmentStatus", "AttemptState", "Base", "CallAttempt", "Confirmation",
    "DoNotCall", "Event", "EventFeed", "LeaderFence", "ProviderEvent", "Reminder", "ReminderOutcome",
    "ReminderStatus", "ServiceKey", "UTCDateTime", "new_id", "utcnow",
]


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


class AppointmentStatus(StrEnum):
    SCHEDULED = "scheduled"
    CANCELLED = "cancelled"


class Appointment(Base):
    __tablename__ = "appointments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    customer_name: Mapped[str] = mapped_column(String(200))
    phone: Mapped[str] = mapped_column(String(32))
    # The number's keyed hash (service.ledger.consent): how the do-not-call list and the caps per
    # number find an appointment's calls.
    phone_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime())
    timezone: Mapped[str] = mapped_column(String(64))
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The explicit reminder times asked for (ISO strings), or NULL when the offsets policy applies.
    remind_at: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=AppointmentStatus.SCHEDULED)
    # BCP 47 tag of the calls' words; the customer's keypad answer (null, confirmed, declined)
    language: Mapped[str] = mapped_column(String(35), default=DEFAULT_LANGUAGE, server_default=DEFAULT_LANGUAGE)
    confirmation: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Which plan of reminders is current: a re-plan starts the next one, and a reminder of an
    # earlier plan may no longer bind a call, take digits or be retried (docs/decisions/0221).
    plan: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When its personal data (name, number, notes, the calls' words) was erased (service.ledger.erasure).
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    # Its ETag (service/api/conditional.py): 1 when created, raised by the database in every UPDATE
    # of the row that does not set it (the column's onupdate, so no writer can forget it), atomically.
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1",
                                         onupdate=literal_column("version", Integer) + 1)

    reminders: Mapped[list[Reminder]] = relationship(
        back_populates="appointment", order_by="Reminder.due_at", lazy="selectin", cascade="all, delete-orphan"
    )

    __table_args__ = (Index("ix_appointments_starts_at_id", "starts_at", "id"),)


class Reminder(Base):
    __tablename__ = "reminders"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    appointment_id: Mapped[str] = mapped_column(ForeignKey("appointments.id", ondelete="CASCADE"), index=True)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16), default=ReminderStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the reminder may next be claimed: due_at at first, later the retry backoff.
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    fence_token: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    provider_call_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    skip_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Real providers: what the call achieved (`answered`, …) and the call that speaks the message,
    # bound when it is answered (first answer wins; docs/DESIGN.md "Real providers").
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    bound_attempt_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    bound_call_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # The words of its calls, rendered when it was planned (`Wording` as JSON; null for reminders
    # planned before wording was stored), and how many no-answer retries it has had.
    wording: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    no_answer_retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    plan: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # the appointment's, when planned
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    appointment: Mapped[Appointment] = relationship(back_populates="reminders", lazy="raise")

    # The dispatcher's due query: status + next_attempt_at, never a full scan.
    __table_args__ = (Index("ix_reminders_status_next_attempt_at", "status", "next_attempt_at"),)


class CallAttempt(Base):
    """One create request of a real provider, recorded (fenced) before it is sent."""

    __tablename__ = "call_attempts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    reminder_id: Mapped[str] = mapped_column(ForeignKey("reminders.id", ondelete="CASCADE"), index=True)
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default=AttemptState.CREATING)
    # From the create's response or from the first webhook, whichever comes first.
    provider_call_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    # The newest status a webhook reported, ordered by the provider's sequence (never goes back).
    call_status: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_sequence: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_event_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Who answered, as the provider's machine detection said (human, machine, not_sure, fax, …).
    answered_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The greeting (the first words of the bound call) where speech is a command: its kind
    # (`person`, `machine`) and time, recorded BEFORE the command is sent, and what the provider
    # said of the command (`accepted`; `ended`: the call was over, nothing spoken; NULL: unknown).
    greeting: Mapped[str | None] = mapped_column(String(16), nullable=True)
    greeting_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    greeting_result: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The keypad rounds (the question asked the 1st, 2nd… time) already answered: bit n-1 for round n.
    keypad_rounds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The provider's time of the hang-up, when it gives one; the leader's cancel request and its
    # last look at the call's state (for a call whose final event never came).
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When the provider first reported the call ringing or later (it reached the number: it counts
    # against the caps per number whatever its last status says).
    rang_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # On the database's clock: the leader compares them with its own idea of now (service.db.clock).
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=db_now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=db_now(), onupdate=db_now())


class ProviderEvent(Base):
    """A provider event already applied (Telnyx's `data.id`): a redelivery of it changes nothing.
    Kept for a day (the leader prunes), far past any redelivery."""

    __tablename__ = "provider_events"

    id: Mapped[str] = mapped_column(String(160), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class DoNotCall(Base):
    """A number that is never called: its keyed hash only (service.ledger.consent), how it was
    listed (`keypad`, `api`) and when, on the database's clock."""

    __tablename__ = "do_not_call"

    phone_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(16))
    listed_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class ServiceKey(Base):
    """Keys the service generated for itself (the phone hash key), one row each."""

    __tablename__ = "service_keys"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))


class LeaderFence(Base):
    """One row: the newest fencing token the database has accepted from a leader."""

    __tablename__ = "leader_fence"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[int] = mapped_column(BigInteger)
    holder: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


# SQLite autoincrements only an INTEGER PRIMARY KEY
_SEQ = BigInteger().with_variant(Integer(), "sqlite")
_PENDING = text("delivery = 'pending'")


class Event(Base):
    """An event for the booking system (service.ledger.events), inserted in the transaction of the
    change it reports; numbered for the feed (`position`) and delivered by the leader
    (service.ledger.outbox, docs/decisions/0251)."""

    __tablename__ = "events"

    # the order of insertion: within one numbering round, the feed's order
    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)  # the event's id, sent as webhook-id
    type: Mapped[str] = mapped_column(String(40))
    appointment_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # the JSON delivered and shown in the feed, written once: every try sends the same bytes
    body: Mapped[str] = mapped_column(Text)
    # at most one event per key (`reminder.finished:<reminder id>`)
    dedupe: Mapped[str | None] = mapped_column(String(80), nullable=True, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    # the feed's order, given by the leader in the order events became visible (never skips one
    # committed late); NULL until then
    position: Mapped[int | None] = mapped_column(BigInteger, nullable=True, unique=True)
    # delivery to EVENTS_URL: pending, delivered, given_up
    delivery: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_try_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(200), nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index("ix_events_unnumbered", "seq", postgresql_where=text("position IS NULL"),
              sqlite_where=text("position IS NULL")),
        # the delivery's heads: pending events in feed order, and an appointment's earlier ones
        Index("ix_events_pending", "position", postgresql_where=_PENDING, sqlite_where=_PENDING),
        Index("ix_events_pending_of", "appointment_id", "position", postgresql_where=_PENDING, sqlite_where=_PENDING),
    )


FEED_ROW = 1


class EventFeed(Base):
    """One row: the feed's last position given, the last one pruned (a cursor below it is too old),
    and the endpoint that answered 410 (a hash of EVENTS_URL: delivery to it stops)."""

    __tablename__ = "event_feed"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_position: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    pruned_through: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    gone_endpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    gone_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
