"""Telnyx Call Control: the REST adapter (`rest`: Dial, speech commands, active calls), the event
signature (`signature`), the event envelope (`events`) and the events route (`webhooks`)."""

from __future__ import annotations

import re

from fastapi import FastAPI

from service.config import Settings
from service.errors import SettingError
from service.providers.base import ProviderPackage, check_public_url, no_secret_over_plain_http, require_settings
from service.providers.telnyx.rest import TelnyxProvider
from service.providers.telnyx.signature import TelnyxSignature, decode_public_key
from service.providers.telnyx.webhooks import router

__all__ = ["PACKAGE", "TelnyxProvider", "TelnyxSignature", "signature"]

# It becomes a path segment of the active-calls URL.
_CONNECTION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check(settings: Settings) -> None:
    require_settings("telnyx", {"PUBLIC_URL": settings.public_url, "TELNYX_API_KEY": settings.telnyx_api_key,
                                "TELNYX_CONNECTION_ID": settings.telnyx_connection_id,
                                "TELNYX_PUBLIC_KEY": settings.telnyx_public_key})
    assert settings.telnyx_connection_id is not None and settings.telnyx_public_key is not None
    if not _CONNECTION_ID.fullmatch(settings.telnyx_connection_id):
        raise SettingError("TELNYX_CONNECTION_ID",
                           "must be the Call Control connection (application) id, e.g. 1494404757140276705")
    try:
        # a key that cannot verify anything would refuse every event: refused at start instead
        decode_public_key(settings.telnyx_public_key)
    except ValueError as error:
        raise SettingError("TELNYX_PUBLIC_KEY", f"must be the base64 Ed25519 public key of the Telnyx portal "
                                                f"(32 bytes, 44 characters): {error}") from None
    no_secret_over_plain_http(settings, "TELNYX_API_URL", settings.telnyx_api_url, "TELNYX_API_KEY")
    check_public_url(settings)


def build(settings: Settings) -> TelnyxProvider:
    assert settings.public_url and settings.telnyx_api_key and settings.telnyx_connection_id
    return TelnyxProvider(
        api_url=settings.telnyx_api_url,
        api_key=settings.telnyx_api_key.get_secret_value(),
        connection_id=settings.telnyx_connection_id,
        public_url=settings.public_url,
        timeout=settings.telephony_timeout,
        max_connections=min(settings.dispatch_concurrency, 100),
        # a machine gets the short voicemail (`call.machine.detection.ended` decides what is said)
        machine_detection=True,
        language=settings.default_language,
    )


def signature(settings: Settings) -> TelnyxSignature:
    """The event signature check: Ed25519 with TELNYX_PUBLIC_KEY over "{timestamp}|{body}"."""
    assert settings.telnyx_public_key
    return TelnyxSignature(settings.telnyx_public_key)


def install(app: FastAPI, settings: Settings) -> None:
    """Telnyx's events, on every replica; signed (Ed25519), so not behind API_TOKEN."""
    app.state.telnyx_signature = signature(settings)
    app.state.no_answer_policy = settings.no_answer_policy()
    app.state.templates = settings.templates
    app.include_router(router)


PACKAGE = ProviderPackage("telnyx", check=check, build=build, install=install)
