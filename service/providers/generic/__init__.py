"""The generic provider: the JSON API that dedupes creates by `Idempotency-Key`
(docs/DESIGN.md, "The generic provider"). No webhooks: the message travels with the create."""

from __future__ import annotations

from service.config import Settings
from service.providers.base import ProviderPackage, no_secret_over_plain_http
from service.providers.generic.adapter import GenericProvider
from service.providers.generic.client import HttpTelephonyClient

__all__ = ["PACKAGE", "GenericProvider", "HttpTelephonyClient", "client"]


def check(settings: Settings) -> None:
    if settings.telephony_token is not None:
        no_secret_over_plain_http(settings, "TELEPHONY_URL", settings.telephony_url, "TELEPHONY_TOKEN")


def client(settings: Settings) -> HttpTelephonyClient:
    """The HTTP client of TELEPHONY_URL."""
    return HttpTelephonyClient(
        settings.telephony_url,
        token=settings.telephony_token.get_secret_value() if settings.telephony_token else None,
        timeout=settings.telephony_timeout,
        max_connections=settings.dispatch_concurrency,
    )


def build(settings: Settings) -> GenericProvider:
    return GenericProvider(client(settings))


PACKAGE = ProviderPackage("generic", check=check, build=build)
