"""What a provider package gives the wiring (`ProviderPackage`), and the checks of settings that
every real provider shares. A provider is one package under `service.providers` plus one line in
`service.providers.PROVIDERS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI

from service.config import Settings, plain_remote
from service.errors import SettingError
from service.telephony.provider import Provider

__all__ = ["ProviderPackage", "check_public_url", "closed_door", "no_secret_over_plain_http", "require_settings"]


def _no_routes(_app: FastAPI, _settings: Settings) -> None:
    """A provider without webhooks (the generic one)."""


@dataclass(frozen=True)
class ProviderPackage:
    """One telephony provider: `check` refuses its bad settings (SettingError naming the variable),
    `build` makes its REST adapter, `install` adds its webhook routes and what they need to an app."""

    name: str
    check: Callable[[Settings], None]
    build: Callable[[Settings], Provider]
    install: Callable[[FastAPI, Settings], None] = _no_routes


def require_settings(provider: str, values: dict[str, object]) -> None:
    """SettingError naming the first of `values` (variable → value) that is unset."""
    missing = [variable for variable, value in values.items() if not value]
    if missing:
        raise SettingError(missing[0], f"TELEPHONY_PROVIDER={provider} requires {', '.join(missing)}")


def no_secret_over_plain_http(settings: Settings, url_variable: str, url: str, secret_variable: str) -> None:
    """A secret sent in clear text can be read by anything on the path; loopback never leaves the
    machine. ALLOW_INSECURE_TRANSPORT is for demos on a private network."""
    if not settings.allow_insecure_transport and plain_remote(url):
        raise SettingError(url_variable, f"{secret_variable} would be sent over plain http:// to a non-loopback "
                                         "host; use https:// (or ALLOW_INSECURE_TRANSPORT=true, never in production)")


def check_public_url(settings: Settings) -> None:
    """The provider posts call events and fetches the message (names, times) from PUBLIC_URL."""
    assert settings.public_url is not None
    if not settings.allow_insecure_transport and plain_remote(settings.public_url):
        raise SettingError("PUBLIC_URL", "the provider would post call events and fetch the message (names, times) "
                                         "over plain http:// from a non-loopback host; use https:// (or "
                                         "ALLOW_INSECURE_TRANSPORT=true, never in production)")


def closed_door(settings: Settings) -> None:
    """A real provider calls real people from the business's number at the business's expense:
    nobody may book a call without a token, nor to a country nobody chose, unless the operator
    said so (ALLOW_OPEN_API=true; ALLOWED_COUNTRIES=*)."""
    provider = settings.telephony_provider
    if settings.api_token is None and not settings.allow_open_api:
        raise SettingError("API_TOKEN", f"TELEPHONY_PROVIDER={provider} requires API_TOKEN: without it anyone who "
                                        "reaches the API books calls from your number (ALLOW_OPEN_API=true to run "
                                        "open on purpose)")
    if settings.allowed_countries is None:
        raise SettingError("ALLOWED_COUNTRIES", f"TELEPHONY_PROVIDER={provider} requires ALLOWED_COUNTRIES: the "
                                                "countries it may call, e.g. US,CA (* for every country)")
