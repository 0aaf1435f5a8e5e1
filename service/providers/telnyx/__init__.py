"""Telnyx Call Control: the REST adapter (`rest`: Dial, speech commands, active calls), the event
signature (`signature`), the event envelope (`events`) and the events route (`webhooks`)."""

from __future__ import annotations

import re

from fastapi import FastAPI

from service.config import Settings, loopback
from service.errors import SettingError
from service.providers.base import (
    ProviderPackage,
    check_public_url,
    closed_door,
    no_secret_over_plain_http,
    require_settings,
)
from service.providers.common import SignatureRefusals
from service.providers.telnyx.rest import TelnyxProvider
from service.providers.telnyx.signature import TelnyxSignature, decode_public_key
from service.providers.telnyx.webhooks import router

__all__ = ["FAKE_TELNYX_PUBLIC_KEY", "PACKAGE", "TelnyxProvider", "TelnyxSignature", "signature"]

# It becomes a path segment of the active-calls URL.
_CONNECTION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# The public half of the Telnyx-shaped fake's fixed key pair (reminders_fakes.telnyx, in the
# repository with its private half): events signed with it prove nothing, so the service accepts
# it only while TELNYX_API_URL is loopback (the fake on the same machine). Not imported from the
# fakes, which the service never ships; tests/test_packaging.py checks that the two agree.
FAKE_TELNYX_PUBLIC_KEY = "TEOGIenjzbRe88YC4dt6pniu32iXCHUW9VJoIk1MO0s="


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
        key = decode_public_key(settings.telnyx_public_key)
    except ValueError as error:
        raise SettingError("TELNYX_PUBLIC_KEY", f"must be the base64 Ed25519 public key of the Telnyx portal "
                                                f"(32 bytes, 44 characters): {error}") from None
    # Not waived by ALLOW_INSECURE_TRANSPORT: with the fake's published private key anyone could
    # sign events for this deployment.
    if key == decode_public_key(FAKE_TELNYX_PUBLIC_KEY) and not loopback(settings.telnyx_api_url):
        raise SettingError("TELNYX_PUBLIC_KEY", "the fake Telnyx provider's test key, whose private half is published "
                                                "in the repository: accepted only with a loopback TELNYX_API_URL (the "
                                                f"fake on this machine), not {settings.telnyx_api_url}; use the "
                                                "account's public key (Portal → Keys & Credentials)")
    no_secret_over_plain_http(settings, "TELNYX_API_URL", settings.telnyx_api_url, "TELNYX_API_KEY")
    check_public_url(settings)
    closed_door(settings)


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
    app.state.telnyx_connection_id = settings.telnyx_connection_id  # events of any other are ignored
    app.state.signature_refusals = SignatureRefusals()
    app.state.no_answer_policy = settings.no_answer_policy()
    app.state.templates = settings.templates
    router.install(app)


PACKAGE = ProviderPackage("telnyx", check=check, build=build, install=install)
