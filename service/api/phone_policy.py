"""Which numbers the service may call: types a person answers, in the allowed countries."""

from __future__ import annotations

import phonenumbers
from phonenumbers import PhoneNumberType

from service.config import Settings

__all__ = ["phone_refusal"]

# A person answers these; premium-rate, shared-cost, toll-free, pager, UAN... are refused: a
# reminder read aloud to them costs money or reaches no one.
_PERSONAL = frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE, PhoneNumberType.FIXED_LINE_OR_MOBILE})


def phone_refusal(phone: str, settings: Settings) -> str | None:
    """Why `phone` (valid E.164) may not be called under `settings`, or None when it may."""
    parsed = phonenumbers.parse(phone, None)
    allowed = _PERSONAL | ({PhoneNumberType.VOIP} if settings.allow_voip else frozenset())
    kind = phonenumbers.number_type(parsed)
    if kind not in allowed:
        names = sorted(PhoneNumberType.to_string(k) for k in allowed)
        return f"number type {PhoneNumberType.to_string(kind)} is not called (allowed: {', '.join(names)})"
    if settings.allowed_countries is not None:
        region = phonenumbers.region_code_for_number(parsed)
        if region not in settings.allowed_countries:
            return f"country {region} is not in ALLOWED_COUNTRIES"
    return None
