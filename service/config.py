"""Settings: every knob of the service, read from the environment and validated at start."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
from datetime import time, timedelta
from functools import cached_property, lru_cache
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.database_url import VERIFY_FULL, postgres_transport
from service.privacy import E164
from service.reminders.caps import CallCaps
from service.reminders.numbers import NumberPolicy
from service.reminders.outcomes import NoAnswerPolicy
from service.reminders.planning import PlanningConfig, offsets_too_close, spacing_text
from service.reminders.rules import CallWindow, ReminderOffset, parse_duration
from service.reminders.wording import (
    DEFAULT_LANGUAGE,
    DEFAULT_OPT_OUT_DIGIT,
    MessageTemplates,
    check_opt_out_digit,
    normalize_language,
)

__all__ = [
    "EVERY_COUNTRY", "CallWindow", "ReminderOffset", "Settings", "check_webhook_secret", "local_host", "loopback",
    "parse_duration", "plain_remote", "setting_error_line",
]


# ALLOWED_COUNTRIES=*: every country, chosen (unset means the same to the generic provider only)
EVERY_COUNTRY: frozenset[str] = frozenset({"*"})


def _split(value: object) -> object:
    return [part for part in value.split(",") if part.strip()] if isinstance(value, str) else value


class Settings(BaseSettings):
    """Every setting of the service; the environment variable is the field name in upper case."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    database_url: str = "sqlite+aiosqlite:///./reminders.db"
    db_pool_size: int | None = Field(default=None, ge=1, le=500)
    etcd_endpoints: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("http://127.0.0.1:2379",),
        validation_alias=AliasChoices("ETCD_ENDPOINTS", "ETCD_ENDPOINT"),
    )
    etcd_username: str | None = None
    etcd_password: SecretStr | None = None
    etcd_ca_cert: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    pod_name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=200)
    election_prefix: str = "/reminders/leader"
    lease_ttl: int = Field(default=10, ge=2, le=300)
    leader_max_term: float | None = Field(default=None, gt=0)
    # one of service.providers.PROVIDERS, checked with the provider's own settings (service.components.check)
    telephony_provider: str = "generic"
    public_url: str | None = None
    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_api_url: str = "https://api.twilio.com"
    # SignalWire's compatibility API (TELEPHONY_PROVIDER=twilio): its webhooks are signed with the
    # project's signing key, not the API token
    signalwire_signing_key: SecretStr | None = None
    telnyx_api_key: SecretStr | None = None
    telnyx_connection_id: str | None = None
    telnyx_public_key: str | None = None
    telnyx_api_url: str = "https://api.telnyx.com"
    # seconds from a webhook request's start by which its whole body must have arrived (else 408);
    # the providers wait 15 s at most for an answer, so more than a minute is never useful
    webhook_body_timeout: float = Field(default=10.0, gt=0, le=60)
    # None: derived (`effective_reconcile_grace`)
    reconcile_grace: Annotated[timedelta | None, NoDecode] = None
    telephony_url: str = "http://127.0.0.1:8090"
    telephony_token: SecretStr | None = None
    telephony_from: str = "+15550000000"
    telephony_timeout: float = Field(default=10.0, gt=0, le=120)
    dispatch_concurrency: int = Field(default=50, ge=1, le=10_000)
    dispatch_max_attempts: int = Field(default=5, ge=1, le=100)
    retry_base_delay: float = Field(default=2.0, gt=0, le=3600)
    calls_per_second: float = Field(default=0, ge=0)
    reminder_offsets: Annotated[tuple[ReminderOffset, ...], NoDecode] = (ReminderOffset(before=timedelta(hours=24)),)
    call_window: Annotated[CallWindow, NoDecode] = CallWindow(time(8, 0), time(21, 0))
    misfire_grace: Annotated[timedelta, NoDecode] = timedelta(minutes=30)
    no_answer_retries: int = Field(default=1, ge=0, le=10)
    no_answer_retry_delay: Annotated[timedelta, NoDecode] = timedelta(minutes=30)
    default_language: str = DEFAULT_LANGUAGE
    # the key a call offers to be called no more (never 1 or 2); checked before MESSAGE_TEMPLATES
    opt_out_digit: str = DEFAULT_OPT_OUT_DIGIT
    # inline JSON or a file path; None: the built-in English. Parsed and checked at start (`templates`).
    message_templates: str | None = None
    # Calls people agreed to (issue 23): caps per number (0: none), whether a confirmed appointment
    # is still called, and how far apart one appointment's reminders must be.
    max_calls_per_number_per_day: int = Field(default=0, ge=0, le=1000)
    max_calls_per_number_per_week: int = Field(default=0, ge=0, le=10_000)
    call_after_confirmation: bool = False
    min_reminder_spacing: Annotated[timedelta, NoDecode] = timedelta(hours=1)
    # How long after an appointment its personal data is kept (None: for ever); the leader erases it.
    personal_data_retention: Annotated[timedelta | None, NoDecode] = None
    # Events for the booking system (docs/decisions/0251): where the leader delivers them (None: no
    # delivery, the feed still works), their Standard Webhooks secret, how long one try may take and
    # how long an event is tried, and how long the feed keeps them. EVENTS_SECRET without
    # EVENTS_URL and the URL's transport are checked by service.components.
    events_url: str | None = None
    events_secret: SecretStr | None = None
    events_timeout: float = Field(default=10.0, gt=0, le=60)
    events_max_age: Annotated[timedelta, NoDecode] = timedelta(hours=24)
    events_retention: Annotated[timedelta, NoDecode] = timedelta(days=7)
    drain_timeout: float = Field(default=10.0, gt=0, le=600)
    api_token: SecretStr | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Hardening (issue 12): see README's settings table.
    # None: unset (every country; a real provider refuses it), EVERY_COUNTRY: `*`, said on purpose
    allowed_countries: Annotated[frozenset[str] | None, NoDecode] = None
    allow_voip: bool = False
    allow_insecure_transport: bool = False
    # a real provider refuses to start without API_TOKEN unless this says the open API is meant
    allow_open_api: bool = False
    # The public port serves what must be public (issue 24, docs/decisions/0243): /docs, /redoc and
    # /openapi.json only when asked for; /metrics on a port of its own (0: none).
    api_docs: bool = False
    metrics_port: int = Field(default=9464, ge=0, le=65535)

    @field_validator("etcd_endpoints", mode="before")
    @classmethod
    def _endpoints(cls, value: object) -> object:
        endpoints = _split(value)
        if isinstance(endpoints, list | tuple):
            for endpoint in endpoints:
                if not re.fullmatch(r"(https?://)?[\w.\-]+:\d{1,5}", str(endpoint).strip()):
                    raise ValueError(f"{endpoint!r} is not host:port or http(s)://host:port")
            if not endpoints:
                raise ValueError("at least one endpoint is needed")
            return tuple(str(e).strip() for e in endpoints)
        return value

    @field_validator("reminder_offsets", mode="before")
    @classmethod
    def _offsets(cls, value: object) -> object:
        parts = _split(value)
        if isinstance(parts, list):
            return tuple(ReminderOffset.parse(p) for p in parts)
        return value

    @field_validator("call_window", mode="before")
    @classmethod
    def _window(cls, value: object) -> object:
        return CallWindow.parse(value) if isinstance(value, str) else value

    @field_validator("misfire_grace", mode="before")
    @classmethod
    def _grace(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("misfire_grace")
    @classmethod
    def _grace_positive(cls, value: timedelta) -> timedelta:
        # 0 would skip every reminder as a misfire: none is ever called at the exact instant it is due
        if value <= timedelta(0):
            raise ValueError("must be a positive duration (e.g. 30m)")
        return value

    @field_validator("no_answer_retry_delay", mode="before")
    @classmethod
    def _retry_delay(cls, value: object) -> object:
        value = parse_duration(value) if isinstance(value, str) else value
        if isinstance(value, timedelta) and value <= timedelta(0):
            raise ValueError("must be a positive duration (e.g. 30m)")
        return value

    @field_validator("default_language")
    @classmethod
    def _default_language(cls, value: str) -> str:
        return normalize_language(value)

    @field_validator("opt_out_digit")
    @classmethod
    def _opt_out_digit(cls, value: str) -> str:
        return check_opt_out_digit(value.strip())

    @field_validator("message_templates")
    @classmethod
    def _message_templates(cls, value: str | None, info: ValidationInfo) -> str | None:
        if "default_language" in info.data and "opt_out_digit" in info.data:  # else those were refused
            MessageTemplates.parse(value, info.data["default_language"], opt_out_digit=info.data["opt_out_digit"])
        return value

    @field_validator("personal_data_retention", mode="before")
    @classmethod
    def _retention(cls, value: object) -> object:
        if isinstance(value, str):
            value = None if value.strip().lower() in ("", "off") else parse_duration(value)
        if isinstance(value, timedelta) and value < timedelta(days=1):
            raise ValueError("must be at least 1d after the appointment (e.g. 90d), or off")
        return value

    @field_validator("personal_data_retention")
    @classmethod
    def _retention_keeps_what_caps_count(cls, value: timedelta | None, info: ValidationInfo) -> timedelta | None:
        # an erased appointment's calls no longer count against the caps: keep them while they could
        caps = CallCaps(per_day=info.data.get("max_calls_per_number_per_day", 0),
                        per_week=info.data.get("max_calls_per_number_per_week", 0))
        if value is not None and caps.active and value < caps.lookback:
            raise ValueError(f"must be at least {caps.lookback.days}d while MAX_CALLS_PER_NUMBER_PER_"
                             f"{'WEEK' if caps.per_week else 'DAY'} is set (its calls are counted that long)")
        return value

    @field_validator("events_url", mode="before")
    @classmethod
    def _events_url(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip() or None
            if value is not None and not re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", value):
                raise ValueError("must be an http(s) URL, e.g. https://booking.example.com/hooks/reminders")
        return value

    @field_validator("events_secret")
    @classmethod
    def _events_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_webhook_secret(value.get_secret_value())
        return value

    @field_validator("events_max_age", "events_retention", mode="before")
    @classmethod
    def _events_durations(cls, value: object) -> object:
        value = parse_duration(value) if isinstance(value, str) else value
        if isinstance(value, timedelta) and value < timedelta(seconds=1):
            raise ValueError("must be a duration of at least 1s (e.g. 24h)")
        return value

    @field_validator("events_retention")
    @classmethod
    def _retention_outlasts_tries(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        # an event deleted while it is still being tried would never be delivered nor given up
        max_age = info.data.get("events_max_age")
        if max_age is not None and value < max_age:
            raise ValueError(f"must be at least EVENTS_MAX_AGE ({max_age})")
        return value

    @field_validator("min_reminder_spacing", mode="before")
    @classmethod
    def _spacing(cls, value: object) -> object:
        value = parse_duration(value) if isinstance(value, str) else value
        if isinstance(value, timedelta) and value < timedelta(0):
            raise ValueError("must be a duration ≥ 0 (e.g. 1h; 0: reminders may be any distance apart)")
        return value

    @field_validator("min_reminder_spacing")
    @classmethod
    def _offsets_spaced(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        # offsets closer than this would plan reminders the API refuses when asked for explicitly:
        # refused at start instead of unplanned on every appointment
        offsets = info.data.get("reminder_offsets", ())
        pair = offsets_too_close(offsets, value)
        if pair is not None:
            first, second = (offsets[i] for i in pair)
            raise ValueError(f"REMINDER_OFFSETS {first} and {second} are closer than MIN_REMINDER_SPACING "
                             f"({spacing_text(value)})")
        return value


    @field_validator("telephony_from")
    @classmethod
    def _caller_id(cls, value: str) -> str:
        # the provider refuses any other caller id, which would fail every reminder at its first call
        if not E164.fullmatch(value):
            raise ValueError("must be an E.164 number, e.g. +15550000000")
        return value

    @field_validator("api_token")
    @classmethod
    def _api_token(cls, value: SecretStr | None) -> SecretStr | None:
        # an empty token would match the empty credentials of every request: no auth at all
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty (unset it to run without a token)")
        return value

    @field_validator("election_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or value.endswith("/") or len(value) < 2:
            raise ValueError("must start with '/' and not end with '/'")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must be sqlite+aiosqlite://… or postgresql+asyncpg://…")
        return value

    @field_validator("telephony_url", "twilio_api_url", "telnyx_api_url")
    @classmethod
    def _telephony_url(cls, value: str) -> str:
        if not re.match(r"https?://[^/\s]+", value):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        # the base of every webhook signature check: a query or fragment would never match
        if value is not None and not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", value):
            raise ValueError("must be an http(s) URL without query or fragment, e.g. https://reminders.example.com")
        return value.rstrip("/") if value is not None else None

    @field_validator("reconcile_grace", mode="before")
    @classmethod
    def _reconcile_grace(cls, value: object) -> object:
        if isinstance(value, str):
            value = parse_duration(value)
        if isinstance(value, timedelta) and value <= timedelta(0):
            raise ValueError("must be a positive duration (e.g. 2m)")
        return value

    @property
    def effective_reconcile_grace(self) -> timedelta:
        """RECONCILE_GRACE, or a default that covers a create still on its way (twice the request
        timeout), Twilio's queue at CALLS_PER_SECOND (twice DISPATCH_CONCURRENCY calls' worth),
        and at least a minute."""
        if self.reconcile_grace is not None:
            return self.reconcile_grace
        seconds = max(60.0, 2 * self.telephony_timeout)
        if self.calls_per_second > 0:
            seconds = max(seconds, 2 * self.dispatch_concurrency / self.calls_per_second)
        return timedelta(seconds=seconds)

    @field_validator("allowed_countries", mode="before")
    @classmethod
    def _countries(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        codes = [part.strip().upper() for part in value.split(",") if part.strip()]
        if not codes:
            return None  # empty: unset
        if codes == ["*"]:
            return EVERY_COUNTRY
        unknown = [code for code in codes if code not in _region_codes()]
        if unknown:
            raise ValueError(f"not ISO 3166 alpha-2 country codes with a phone plan: {', '.join(unknown)} (e.g. US,DE)")
        return frozenset(codes)

    @model_validator(mode="after")
    def _secrets_over_plain_http(self) -> Settings:
        # A password sent in clear text can be read by anything on the path; loopback never leaves
        # the machine. The provider packages check their own secrets (service.providers).
        if self.allow_insecure_transport or self.etcd_password is None or self.etcd_ca_cert:
            return self
        remote = [e for e in self.etcd_endpoints if not e.startswith("https://") and plain_remote(e)]
        if remote:
            raise ValueError(
                "ETCD_ENDPOINTS: ETCD_PASSWORD would be sent over plain http:// to a non-loopback host "
                f"({remote[0]}); use https:// with ETCD_CA_CERT (or ALLOW_INSECURE_TRANSPORT=true, never in production)"
            )
        return self

    @model_validator(mode="after")
    def _database_over_plain_text(self) -> Settings:
        # The same rule for the database's password and every row: verified TLS beyond loopback.
        if self.is_sqlite:
            return self
        try:
            transport = postgres_transport(self.database_url)
        except ValueError as error:
            raise ValueError(f"DATABASE_URL: {error}") from None
        missing = transport.ca_missing()
        if missing:
            raise ValueError(f"DATABASE_URL: {missing}")
        remote = [host for host in transport.hosts if not local_host(host)]
        if remote and transport.mode != VERIFY_FULL and not self.allow_insecure_transport:
            raise ValueError(
                f"DATABASE_URL: PostgreSQL on a non-loopback host ({remote[0]}) without verified TLS; add "
                f"?ssl={VERIFY_FULL}&sslrootcert=<CA file> (or ALLOW_INSECURE_TRANSPORT=true, never in production)"
            )
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if bool(self.etcd_cert) != bool(self.etcd_key):
            raise ValueError("ETCD_CERT and ETCD_KEY go together")
        return self

    @cached_property
    def templates(self) -> MessageTemplates:
        """MESSAGE_TEMPLATES parsed (checked at start: a bad one stops the process)."""
        return MessageTemplates.parse(self.message_templates, self.default_language,
                                      opt_out_digit=self.opt_out_digit)

    def planning_config(self) -> PlanningConfig:
        return PlanningConfig(
            call_window=self.call_window,
            offsets=self.reminder_offsets,
            numbers=NumberPolicy(allow_voip=self.allow_voip, allowed_countries=self.country_allowlist),
            templates=self.templates,
            spacing=self.min_reminder_spacing,
            call_after_confirmation=self.call_after_confirmation,
        )

    def call_caps(self) -> CallCaps:
        return CallCaps(per_day=self.max_calls_per_number_per_day, per_week=self.max_calls_per_number_per_week)

    def no_answer_policy(self) -> NoAnswerPolicy:
        return NoAnswerPolicy(retries=self.no_answer_retries, delay=self.no_answer_retry_delay,
                              window=self.call_window)

    @property
    def country_allowlist(self) -> frozenset[str] | None:
        """The countries numbers may belong to; None: every country (ALLOWED_COUNTRIES unset or `*`)."""
        return None if self.allowed_countries in (None, EVERY_COUNTRY) else self.allowed_countries

    @cached_property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache(maxsize=1)
def _region_codes() -> frozenset[str]:
    import phonenumbers

    return frozenset(phonenumbers.SUPPORTED_REGIONS)


def loopback(url: str) -> bool:
    """True for a URL (any scheme, or none) whose host is localhost, 127.0.0.0/8 or ::1."""
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def local_host(host: str) -> bool:
    """True for a host that never leaves the machine: loopback, or a Unix socket directory."""
    return host.startswith("/") or loopback(f"[{host}]" if ":" in host else host)


def plain_remote(url: str) -> bool:
    """True for an http:// (or scheme-less) URL whose host is not loopback."""
    return not url.startswith("https://") and not loopback(url)


def check_webhook_secret(secret: str) -> None:
    """ValueError unless `secret` is a Standard Webhooks secret: `whsec_` and the base64 of 24 to
    64 bytes."""
    key = secret.removeprefix("whsec_")
    try:
        size = len(base64.b64decode(key, validate=True)) if key != secret else 0
    except (binascii.Error, ValueError):
        size = 0
    if not 24 <= size <= 64:
        raise ValueError("must be whsec_ and the base64 of 24 to 64 random bytes "
                         "(e.g. whsec_$(openssl rand -base64 32))")


def setting_error_line(error: Exception) -> str:
    """One line naming the offending variable(s) of a settings ValidationError."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return f"invalid settings: {error}"
    parts = []
    for item in error.errors():
        name = "_".join(str(p) for p in item["loc"]).upper()
        message = item["msg"]
        # a check across settings has no field of its own: its message starts with the variable
        named = re.match(r"Value error, ([A-Z][A-Z0-9_]*): ", message) if not name else None
        if named:
            name, message = named[1], message[named.end():]
        parts.append(f"{name or 'settings'}: {message}")
    return "invalid setting " + "; ".join(parts)
