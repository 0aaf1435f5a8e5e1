"""The provider interface the dispatcher uses for every telephony provider, and its value types.

A create request ends in one of five ways (`CreateKind`): the call exists; it certainly does not
(retry later, or never); nobody knows (in doubt); or it was never sent. Only a provider that
dedupes creation by an idempotency key (`generic`) may simply repeat an in-doubt create; for every
real provider an attempt in doubt is reconciled through `live_calls` before another is made.

A call's *stamp* (reminder id + attempt id) travels where the provider gives it back, so that a
webhook names its reminder and attempt before the create's response is recorded.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol, runtime_checkable

from service.privacy import mask_phone

__all__ = [
    "CallSpec",
    "CreateKind",
    "CreateResult",
    "GreetingWords",
    "LiveCall",
    "LIVE_STATUSES",
    "MACHINE_DETECTION_WITHIN",
    "Provider",
    "ProviderUnavailable",
    "TelephonyError",
    "SpeechCommands",
    "Stamp",
]

# Call statuses (Twilio's names; other adapters map theirs onto them) of a call that may still be
# answered or is being answered: a reconciliation must wait while one of these exists.
LIVE_STATUSES = ("queued", "ringing", "in-progress")

# A provider whose speech is a command (SpeechCommands) is asked to end its answering machine
# detection within this time of the answer (Telnyx: `total_analysis_time_millis`, its default):
# a call whose detection result has not come by then, and a little later, lost it or has it late.
MACHINE_DETECTION_WITHIN = timedelta(milliseconds=3_500)

_STAMP_REMINDER = "r"
_STAMP_ATTEMPT = "a"
_MAX_ID = 64


@dataclass(frozen=True)
class Stamp:
    """Which reminder and which attempt a call belongs to, as the provider hands it back."""

    reminder_id: str
    attempt_id: str

    def __post_init__(self) -> None:
        for value in (self.reminder_id, self.attempt_id):
            if not value or len(value) > _MAX_ID or not value.replace("-", "").isalnum():
                raise ValueError("a stamp holds two non-empty ids of letters, digits and '-'")

    def query(self) -> dict[str, str]:
        """Query parameters for a webhook URL (Twilio returns them unchanged)."""
        return {_STAMP_REMINDER: self.reminder_id, _STAMP_ATTEMPT: self.attempt_id}

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> Stamp | None:
        """The stamp in a webhook's query parameters; None if absent or malformed."""
        try:
            return cls(params[_STAMP_REMINDER], params[_STAMP_ATTEMPT])
        except (KeyError, ValueError, TypeError):
            return None

    def encode(self, round_: int | None = None) -> str:
        """Base64 text (Telnyx `client_state`); `round_` > 1 rides along (which time the keypad
        question is asked: Telnyx echoes it in the gather's events)."""
        values: list[object] = [self.reminder_id, self.attempt_id]
        if round_ is not None and round_ > 1:
            values.append(round_)
        raw = json.dumps(values, separators=(",", ":")).encode()
        return base64.b64encode(raw).decode()

    @classmethod
    def decode(cls, text: str | None) -> Stamp | None:
        if not text:
            return None
        try:
            values = json.loads(base64.b64decode(text, validate=True))
            if not isinstance(values, list) or len(values) not in (2, 3):
                return None
            return cls(str(values[0]), str(values[1]))
        except (ValueError, TypeError, RecursionError, binascii.Error):  # whatever came back
            return None

    @staticmethod
    def round_in(text: str | None) -> int:
        """The keypad round `encode` put in `text` (1 when none)."""
        try:
            values = json.loads(base64.b64decode(text or "", validate=True))
            round_ = values[2] if isinstance(values, list) and len(values) == 3 else 1
            return round_ if isinstance(round_, int) and 1 <= round_ <= 9 else 1
        except (ValueError, TypeError, RecursionError, binascii.Error):  # whatever came back
            return 1


@dataclass(frozen=True)
class CallSpec:
    """One create request. `message` travels with the create only where the provider takes it
    there (`generic`); real providers get their words from the webhooks when the call is answered.
    `idempotency_key` is the reminder's key (`generic`); `attempt_id` names this attempt."""

    to: str
    from_: str
    reminder_id: str
    appointment_id: str
    attempt_id: str
    message: str = ""
    idempotency_key: str = ""

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.reminder_id, self.attempt_id)

    def __repr__(self) -> str:  # keep full numbers out of logs and tracebacks
        return (
            f"CallSpec(to={mask_phone(self.to)!r}, reminder_id={self.reminder_id!r}, "
            f"attempt_id={self.attempt_id!r})"
        )


class CreateKind(StrEnum):
    """What a create request achieved, as far as the caller can know."""

    CREATED = "created"  # the provider accepted the call: `call_id` names it
    NOT_CREATED = "not_created"  # certainly no call (e.g. 429): try again after `retry_after`
    REJECTED = "rejected"  # certainly no call, and the same request will not succeed
    IN_DOUBT = "in_doubt"  # a call may exist (timeout, 5xx, lost connection): reconcile first
    NOT_SENT = "not_sent"  # `may_send` refused at the last moment: not a byte left


@dataclass(frozen=True)
class CreateResult:
    kind: CreateKind
    call_id: str | None = None
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True)
class LiveCall:
    """A call the provider reports as queued, ringing or in progress."""

    call_id: str
    status: str
    to: str
    created_at: datetime | None = None
    stamp: Stamp | None = None  # where the provider returns it with the listing (Telnyx)


class TelephonyError(Exception):
    """The base of the telephony package's errors."""


class ProviderUnavailable(TelephonyError, RuntimeError):
    """A listing or cancellation could not be done now (network, 5xx, timeout)."""


@runtime_checkable
class Provider(Protocol):
    """What the dispatcher and the webhooks need of a telephony provider."""

    name: str
    # True only where the provider collapses repeated creates with one idempotency key.
    dedupes_creation: bool

    async def create_call(self, spec: CallSpec, *, may_send: Callable[[], bool] | None = None) -> CreateResult:
        """Send one create request; never retries, never raises for HTTP or network failures.

        `may_send` is asked right before the first byte leaves; False → NOT_SENT.
        """
        ...

    async def live_calls(self, to: str) -> list[LiveCall]:
        """Calls to `to` that are queued, ringing or in progress; ProviderUnavailable if unknown."""
        ...

    async def cancel(self, call_id: str) -> bool:
        """End a queued or ringing call before it is answered; False if it could not be done."""
        ...

    async def call_state(self, call_id: str) -> str | None:
        """The call's state now (Twilio's names: a final one once it is over), for a call whose
        final event never came; None when the provider cannot tell now."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class GreetingWords:
    """The first words of a bound call: for a person the message and the keypad question (one
    command that speaks, then listens), for a machine the voicemail."""

    machine: bool
    text: str
    language: str | None = None


@runtime_checkable
class SpeechCommands(Protocol):
    """A provider whose speech is a command sent to an answered call (Telnyx), not the webhook's
    answer (Twilio's TwiML). Each command carries a `command_id`: a repeat is not spoken twice
    while the provider remembers it (Telnyx: 60 s)."""

    async def greet(self, call_id: str, words: GreetingWords, *, stamp: Stamp) -> bool | None:
        """Send the call's greeting: ONE command per call (the same id and words whoever sends it
        and however often). True: the provider accepted it; False: the call is already over
        (nothing was spoken); None: unknown (a timeout, a 5xx — it may have run)."""
        ...

    async def hang_up(self, call_id: str, *, command_id: str | None = None, stamp: Stamp | None = None) -> bool:
        """End the call in any state; True if done (or the call was already over)."""
        ...
