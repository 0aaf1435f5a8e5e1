"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, field_validator

from service.db.models import AppointmentStatus
from service.privacy import E164_PATTERN
from service.reminders import Confirmation, ReminderOutcome, ReminderStatus, normalize_language, parse_phone

__all__ = [
    "DoNotCallOut",
    "AppointmentCreate",
    "AppointmentList",
    "AppointmentOut",
    "AppointmentPatch",
    "AwareDatetime",
    "ErrorOut",
    "EventOut",
    "EventPage",
    "LeaderOut",
    "ReminderOut",
    "UnplannedOut",
]

# Appointments further ahead than this are refused: they are typos, and date arithmetic near
# year 9999 would overflow.
MAX_AHEAD = timedelta(days=3660)
MAX_REMINDERS = 20


def _require_string(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 string with a UTC offset")
    return value


def _require_offset(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("must carry a UTC offset (e.g. 2030-01-31T09:00:00+01:00 or …Z)")
    if not datetime(1971, 1, 1, tzinfo=UTC) <= value <= datetime.now(UTC) + MAX_AHEAD:
        raise ValueError("is outside the supported range (1971 … 10 years ahead)")
    return value


def _require_future(value: datetime) -> datetime:
    if value <= datetime.now(UTC):
        raise ValueError("must be in the future")
    return value


AwareDatetime = Annotated[datetime, BeforeValidator(_require_string), AfterValidator(_require_offset)]
FutureDatetime = Annotated[AwareDatetime, AfterValidator(_require_future)]


def _valid_phone(value: str) -> str:
    return parse_phone(value)  # a PhoneNumber: the number policy reads its type without parsing again


def _valid_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError("unknown IANA time zone (e.g. Europe/Berlin, America/New_York, UTC)") from None
    return value


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold U+0000: without this the INSERT fails and the client gets a 503
    # "database unavailable" for what is bad input (found by the chaos suite's input tests).
    if "\x00" in value:
        raise ValueError("must not contain NUL (U+0000) characters")
    return value


Phone = Annotated[
    StrictStr,
    Field(pattern=f"^{E164_PATTERN}$", examples=["+14155552671"], description="E.164, a valid number"),
    AfterValidator(_valid_phone),
]
TimeZoneName = Annotated[
    StrictStr, Field(min_length=1, max_length=64, examples=["Europe/Berlin"]), AfterValidator(_valid_zone)
]
# No NUL, said in the OpenAPI too (a pattern), so that a schema-valid text is never refused.
_NO_NUL = r"^[^\x00]*$"
CustomerName = Annotated[StrictStr, Field(min_length=1, max_length=200, pattern=_NO_NUL), AfterValidator(_no_nul)]
Notes = Annotated[StrictStr, Field(max_length=2000, pattern=_NO_NUL), AfterValidator(_no_nul)]
Language = Annotated[
    StrictStr,
    Field(min_length=2, max_length=35, pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$", examples=["en-US", "de-DE"],
          description="BCP 47 tag of the calls' language; needs a message template (MESSAGE_TEMPLATES)"),
    AfterValidator(normalize_language),
]
RemindAt = Annotated[list[FutureDatetime], Field(min_length=1, max_length=MAX_REMINDERS)]


class AppointmentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_name: CustomerName
    phone: Phone
    starts_at: FutureDatetime
    timezone: TimeZoneName = "UTC"
    notes: Notes | None = None
    remind_at: RemindAt | None = Field(
        default=None, description="Explicit reminder times; when absent the REMINDER_OFFSETS policy applies."
    )
    language: Language | None = Field(default=None, description="When absent: DEFAULT_LANGUAGE.")


def _not_nullable_in_schema(*names: str) -> Any:
    """json_schema_extra: document `names` as absent-or-a-value, since null is refused (422)."""

    def adjust(schema: dict[str, Any]) -> None:
        for name in names:
            prop = schema.get("properties", {}).get(name)
            if not prop or "anyOf" not in prop:
                continue
            kept = [alt for alt in prop.pop("anyOf") if alt.get("type") != "null"]
            prop.pop("default", None)
            if len(kept) == 1:
                prop.update(kept[0])
            else:
                prop["anyOf"] = kept

    return adjust


class AppointmentPatch(BaseModel):
    """Fields to change; `remind_at: null` returns to the offsets policy."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=_not_nullable_in_schema("customer_name", "phone", "starts_at", "timezone", "language"),
    )

    # Absent means "unchanged"; null is refused (422) for these five, and the OpenAPI says so
    # (json_schema_extra above): typed `| None` only so that absence can default.
    customer_name: CustomerName | None = None
    phone: Phone | None = None
    starts_at: FutureDatetime | None = None
    timezone: TimeZoneName | None = None
    language: Language | None = None
    notes: Notes | None = None
    remind_at: RemindAt | None = None

    @field_validator("customer_name", "phone", "starts_at", "timezone", "language", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("cannot be null")
        return value


class ReminderOut(BaseModel):
    id: str
    due_at: datetime
    status: ReminderStatus
    attempts: int
    last_error: str | None
    skip_reason: str | None = Field(description="Why the reminder was skipped or cancelled, if it was.")
    sent_at: datetime | None
    provider_call_id: str | None
    outcome: ReminderOutcome | None = Field(
        default=None,
        description="Real providers: what the reminder's call achieved (`answered`, `voicemail`, `no_answer`, `busy`, "
                    "`failed`); null until known, and for `generic`.",
    )
    answered_at: datetime | None = Field(default=None, description="When the reminder's bound call was answered.")


class UnplannedOut(BaseModel):
    rule: str = Field(description="The offset rule or explicit time that produced no reminder.")
    reason: str


class AppointmentOut(BaseModel):
    id: str
    customer_name: str
    phone: str
    starts_at: datetime
    timezone: str
    notes: str | None
    status: AppointmentStatus
    language: str = Field(description="BCP 47 tag of the calls' language.")
    confirmation: Confirmation | None = Field(
        description="The customer's keypad answer: `confirmed` (1), `declined` (2: the appointment is then "
                    "cancelled); null until one is given."
    )
    remind_at: list[datetime] | None
    reminders: list[ReminderOut]
    unplanned: list[UnplannedOut] = Field(
        default_factory=list, description="Reminders that could not be planned by the last create/patch, and why."
    )
    created_at: datetime
    updated_at: datetime
    erased_at: datetime | None = Field(
        default=None, description="When its personal data was erased (`DELETE …?erase=true`, or "
                                  "PERSONAL_DATA_RETENTION): `customer_name` and `phone` read \"\", `notes` null.")


class AppointmentList(BaseModel):
    items: list[AppointmentOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class LeaderOut(BaseModel):
    instance: str
    is_leader: bool
    leader: str | None
    fencing_token: int | None
    lease_ttl: int
    etcd_error: str | None = Field(
        default=None, description="A configuration error etcd reported (e.g. refused credentials), while it lasts."
    )


class DoNotCallOut(BaseModel):
    phone: str = Field(description="The number, as asked for (the list itself keeps only its keyed hash).")
    listed_at: datetime = Field(description="When the number was put on the list.")
    source: Literal["keypad", "api"] = Field(description="How: the customer pressed OPT_OUT_DIGIT, or this API.")
    skipped: int = Field(default=0, description="PUT: reminders this request skipped (`opted out`).")


class EventOut(BaseModel):
    """An event, as delivered to EVENTS_URL (docs/decisions/0251)."""

    id: str = Field(description="Unique; the `webhook-id` of its deliveries: a receiver dedupes on it.")
    type: str = Field(description="appointment.confirmed, appointment.declined, appointment.cancelled, "
                                  "reminder.finished, phone.opted_out (the list can grow: ignore a type you do not "
                                  "know).")
    timestamp: datetime = Field(description="When the change happened.")
    data: dict[str, Any] = Field(description="`appointment_id` (null: a phone.opted_out that affects none), `source` "
                                             "(api, keypad, call-back, system) and the type's fields; never a phone "
                                             "number unmasked.")


class EventPage(BaseModel):
    events: list[EventOut]
    next_cursor: str = Field(description="Pass it as `after` for the next page (also when this one is empty).")


class ErrorOut(BaseModel):
    detail: Any
