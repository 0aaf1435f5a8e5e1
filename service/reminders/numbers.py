"""Which numbers a reminder may call: valid E.164 numbers of types a person answers, in the
allowed countries."""

from __future__ import annotations

from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneNumberType

from service.reminders.errors import ReminderError

__all__ = ["NumberPolicy", "PhoneNumber", "number_refusal", "parse_phone"]

# A person answers these; premium-rate, shared-cost, toll-free, pager, UAN... are refused: a
# reminder read aloud to them costs money or reaches no one.
_PERSONAL = frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE, PhoneNumberType.FIXED_LINE_OR_MOBILE})


class PhoneNumber(str):
    """A number `parse_phone` found valid, as its E.164 text, carrying what the policy reads
    (`kind`, and the parsed number for its region), so that a request parses it once."""

    kind: PhoneNumberType
    parsed: phonenumbers.PhoneNumber


def parse_phone(text: str) -> PhoneNumber:
    """`text` as a valid number in E.164 form; ValueError saying why it is not one."""
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as error:
        raise ReminderError(f"not a phone number in E.164 form (+<country><number>): {error.args[0]}") from None
    formatted = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    # number_type is UNKNOWN exactly when is_valid_number is False (both match the national number
    # against the region's patterns): one lookup answers both questions.
    kind = phonenumbers.number_type(parsed)
    if not text.startswith("+") or formatted != text.replace(" ", "") or kind == PhoneNumberType.UNKNOWN:
        raise ReminderError("not a valid phone number in E.164 form (+<country><number>, digits only)")
    number = PhoneNumber(formatted)
    number.kind, number.parsed = kind, parsed
    return number


@dataclass(frozen=True)
class NumberPolicy:
    """What the settings allow beyond personal numbers: VoIP (`ALLOW_VOIP`), and the countries
    (`ALLOWED_COUNTRIES`, ISO 3166 alpha-2; None = all)."""

    allow_voip: bool = False
    allowed_countries: frozenset[str] | None = None


def number_refusal(phone: str, policy: NumberPolicy) -> str | None:
    """Why `phone` (valid E.164; a `PhoneNumber` is not parsed again) may not be called under
    `policy`, or None when it may."""
    number = phone if isinstance(phone, PhoneNumber) else parse_phone(phone)
    allowed = _PERSONAL | ({PhoneNumberType.VOIP} if policy.allow_voip else frozenset())
    if number.kind not in allowed:
        names = sorted(PhoneNumberType.to_string(k) for k in allowed)
        return f"number type {PhoneNumberType.to_string(number.kind)} is not called (allowed: {', '.join(names)})"
    if policy.allowed_countries is not None:
        region = phonenumbers.region_code_for_number(number.parsed)
        if region not in policy.allowed_countries:
            return f"country {region} is not in ALLOWED_COUNTRIES"
    return None
