"""Which numbers a reminder may call: types a person answers, in the allowed countries."""

from __future__ import annotations

from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneNumberType

__all__ = ["NumberPolicy", "number_refusal"]

# A person answers these; premium-rate, shared-cost, toll-free, pager, UAN... are refused: a
# reminder read aloud to them costs money or reaches no one.
_PERSONAL = frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE, PhoneNumberType.FIXED_LINE_OR_MOBILE})


@dataclass(frozen=True)
class NumberPolicy:
    """What the settings allow beyond personal numbers: VoIP (`ALLOW_VOIP`), and the countries
    (`ALLOWED_COUNTRIES`, ISO 3166 alpha-2; None = all)."""

    allow_voip: bool = False
    allowed_countries: frozenset[str] | None = None


def number_refusal(phone: str, policy: NumberPolicy) -> str | None:
    """Why `phone` (valid E.164) may not be called under `policy`, or None when it may."""
    parsed = phonenumbers.parse(phone, None)
    allowed = _PERSONAL | ({PhoneNumberType.VOIP} if policy.allow_voip else frozenset())
    kind = phonenumbers.number_type(parsed)
    if kind not in allowed:
        names = sorted(PhoneNumberType.to_string(k) for k in allowed)
        return f"number type {PhoneNumberType.to_string(kind)} is not called (allowed: {', '.join(names)})"
    if policy.allowed_countries is not None:
        region = phonenumbers.region_code_for_number(parsed)
        if region not in policy.allowed_countries:
            return f"country {region} is not in ALLOWED_COUNTRIES"
    return None
