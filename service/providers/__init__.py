"""One package per telephony provider: its REST adapter (knows no database), its signature check,
its webhook routes (apply events through the ledger) and the check of its settings.

Adding a provider is a package here and one line in `PROVIDERS`; TELEPHONY_PROVIDER names one.
"""

from __future__ import annotations

from service.errors import SettingError
from service.providers import generic, telnyx, twilio
from service.providers.base import ProviderPackage

__all__ = ["PROVIDERS", "ProviderPackage", "package"]

PROVIDERS: dict[str, ProviderPackage] = {p.name: p for p in (generic.PACKAGE, twilio.PACKAGE, telnyx.PACKAGE)}


def package(name: str) -> ProviderPackage:
    """The provider TELEPHONY_PROVIDER names; SettingError for an unknown one."""
    try:
        return PROVIDERS[name]
    except KeyError:
        raise SettingError("TELEPHONY_PROVIDER", f"must be one of {', '.join(PROVIDERS)}") from None
