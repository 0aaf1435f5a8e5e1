"""Request and response bodies of the HTTP API, and the rules of its input: times, zones,
integers in query strings, names and notes (every route takes them from here)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, field_validator

from service.db.models import AppointmentStatus
from service.privacy import BIDI_CONTROLS, CONTROL_CHARACTERS, E164_PATTERN, INVISIBLE
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
    "IANA_ZONES",
    "LeaderOut",
    "PLAIN_DIGITS",
    "ReminderOut",
    "TIME_RULE",
    "UnplannedOut",
]

# -- times ----------------------------------------------------------------------------------------

# Appointments further ahead than this are refused: they are typos, and date arithmetic near
# year 9999 would overflow.
MAX_AHEAD = timedelta(days=3660)
EARLIEST = datetime(1971, 1, 1, tzinfo=UTC)
MAX_REMINDERS = 20
# ISO 8601's extended format with an offset (RFC 3339's profile of it, seconds optional), and
# nothing else: pydantic alone also reads "1798765432" as a Unix time, "+0100", a space for "T".
_ISO_WITH_OFFSET = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
TIME_RULE = ("ISO 8601 with an offset: `YYYY-MM-DDThh:mm[:ss[.fraction]]` then `Z` or `±hh:mm` (no Unix "
             "timestamps, no local times); from 1971-01-01 to 3,660 days (10 years) from now")
# Examples the default configuration accepts for as long as a replica runs: a start in March two
# years ahead (Europe/Berlin is at +01:00 then), a reminder the day before.
_EXAMPLE_YEAR = datetime.now(UTC).year + 2
EXAMPLE_START = f"{_EXAMPLE_YEAR}-03-12T15:00:00+01:00"
EXAMPLE_REMINDER = f"{_EXAMPLE_YEAR}-03-11T15:00:00+01:00"


def _require_iso(value: Any) -> Any:
    if not isinstance(value, str) or not _ISO_WITH_OFFSET.fullmatch(value):
        raise ValueError("must be an ISO 8601 string with an offset (e.g. 2030-01-31T09:00:00+01:00 or …Z)")
    return value


def _require_range(value: datetime) -> datetime:
    if not EARLIEST <= value <= datetime.now(UTC) + MAX_AHEAD:
        raise ValueError("is outside the supported range (1971-01-01 … 3,660 days from now)")
    return value


def _require_future(value: datetime) -> datetime:
    if value <= datetime.now(UTC):
        raise ValueError("must be in the future")
    return value


AwareDatetime = Annotated[datetime, BeforeValidator(_require_iso), AfterValidator(_require_range)]
FutureDatetime = Annotated[AwareDatetime, AfterValidator(_require_future)]

# -- zones ----------------------------------------------------------------------------------------


def _zone_names() -> frozenset[str]:
    """The zone database's names, from the tzdata package (the same list on every host), without
    `Factory`, which names no place. Files of the host's zoneinfo directory that are no zone
    (`localtime`, `posixrules`, `right/…`, `posix/…`) are not in it."""
    return frozenset(resources.files("tzdata").joinpath("zones").read_text().split()) - {"Factory"}


IANA_ZONES = _zone_names()


def _valid_zone(value: str) -> str:
    if value not in IANA_ZONES:
        raise ValueError("unknown IANA time zone (e.g. Europe/Berlin, America/New_York, UTC)")
    return value


# -- integers in query strings --------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")


def _plain_digits(value: Any) -> Any:
    # pydantic alone reads "5_0" as 50, and " 5", "+5", "5.0" as 5
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("must be a whole number in plain digits (0-9)")
    return value


# Last in an integer parameter's Annotated, after its Query(ge=…, le=…): placed before them, pydantic
# would no longer write the bounds into the OpenAPI as minimum and maximum.
PLAIN_DIGITS = BeforeValidator(_plain_digits)

def _valid_phone(value: str) -> str:
    return parse_phone(value)  # a PhoneNumber: the number policy reads its type without parsing again


# -- names and notes ------------------------------------------------------------------------------

# A name is spoken: at least one visible character, no control character or line break, no
# bidirectional formatting. Notes are never spoken, but shown to whoever reads them: line breaks
# and tabs allowed, other controls and bidirectional formatting not; they may be empty. Each rule is
# the OpenAPI's pattern too, so that a text the document allows is never refused.
_NAME_PATTERN = f"^[^{CONTROL_CHARACTERS}{BIDI_CONTROLS}]*[^{INVISIBLE}][^{CONTROL_CHARACTERS}{BIDI_CONTROLS}]*$"
_CONTROLS_BUT_LINES = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"  # C0/C1 without tab, LF, CR
_NOTES_PATTERN = f"^[^{_CONTROLS_BUT_LINES}{BIDI_CONTROLS}]*$"
_CONTROL_IN_NAME = re.compile(f"[{CONTROL_CHARACTERS}]")
_CONTROL_IN_NOTES = re.compile(f"[{_CONTROLS_BUT_LINES}]")
_BIDI = re.compile(f"[{BIDI_CONTROLS}]")
_VISIBLE = re.compile(f"[^{INVISIBLE}]")


def _no_bidi(value: str) -> str:
    if _BIDI.search(value):
        raise ValueError("must not contain bidirectional formatting characters (U+061C, U+200E, U+200F, "
                         "U+202A-U+202E, U+2066-U+2069)")
    return value


def _spoken(value: str) -> str:
    if _CONTROL_IN_NAME.search(value):
        # NUL too: PostgreSQL text cannot hold it (the INSERT would fail, a 503 for bad input)
        raise ValueError("must not contain control characters or line breaks (U+0000-U+001F, U+007F-U+009F, "
                         "U+2028, U+2029)")
    _no_bidi(value)
    if not _VISIBLE.search(value):
        raise ValueError("must contain a visible character, not only spaces or invisible characters")
    return value


def _shown(value: str) -> str:
    if _CONTROL_IN_NOTES.search(value):
        raise ValueError("must not contain control characters other than tab and line breaks")
    return _no_bidi(value)


Phone = Annotated[
    StrictStr,
    Field(pattern=f"^{E164_PATTERN}$", examples=["+14155552671"], description="E.164, a valid number"),
    AfterValidator(_valid_phone),
]
TimeZoneName = Annotated[
    StrictStr,
    Field(min_length=1, max_length=64, examples=["Europe/Berlin"],
          description="An IANA time zone name from the zone database's list (Europe/Berlin, UTC); not "
                      "`localtime`, `posixrules`, `Factory`, `right/…` or `posix/…`"),
    AfterValidator(_valid_zone),
]
# The patterns go into the OpenAPI only (json_schema_extra): the validators say which rule failed.
CustomerName = Annotated[
    StrictStr,
    Field(min_length=1, max_length=200, examples=["Ada Lovelace"], json_schema_extra={"pattern": _NAME_PATTERN},
          description="Spoken in the calls: at least one visible character; no control characters, line breaks "
                      "or bidirectional formatting characters"),
    AfterValidator(_spoken),
]
Notes = Annotated[
    StrictStr,
    Field(max_length=2000, json_schema_extra={"pattern": _NOTES_PATTERN},
          description="Never spoken. Tabs and line breaks allowed; other control characters and bidirectional "
                      "formatting characters are not"),
    AfterValidator(_shown),
]
Language = Annotated[
    StrictStr,
    Field(min_length=2, max_length=35, pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$", examples=["en-US"],
          description="BCP 47 tag of the calls' language; needs a message template (MESSAGE_TEMPLATES: the "
                      "default has en-US only)"),
    AfterValidator(normalize_language),
]
StartsAt = Annotated[FutureDatetime, Field(description=f"In the future. {TIME_RULE}.", examples=[EXAMPLE_START])]
ReminderTime = Annotated[FutureDatetime, Field(description=f"In the future, before `starts_at`. {TIME_RULE}.",
                                               examples=[EXAMPLE_REMINDER])]
RemindAt = Annotated[list[ReminderTime], Field(min_length=1, max_length=MAX_REMINDERS)]


class AppointmentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_name: CustomerName
    phone: Phone
    starts_at: StartsAt
    timezone: TimeZoneName = "UTC"
    notes: Notes | None = None
    remind_at: RemindAt | None = Field(
        default=None, description="Explicit reminder times, at least MIN_REMINDER_SPACING apart; when absent the "
                                  "REMINDER_OFFSETS policy applies."
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
    starts_at: StartsAt | None = None
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
