"""Twilio's Programmable Voice (and SignalWire's compatibility API: its project id as
TWILIO_ACCOUNT_SID, its API token as TWILIO_AUTH_TOKEN, TWILIO_API_URL
`https://<space>.signalwire.com/api/laml`, its signing key as SIGNALWIRE_SIGNING_KEY): the REST
adapter (`rest`), the webhook signature (`signature`), the TwiML (`twiml`) and the webhook routes
(`webhooks`)."""

from __future__ import annotations

import re

from fastapi import FastAPI

from service.config import Settings
from service.errors import SettingError
from service.providers.base import (
    ProviderPackage,
    check_public_url,
    closed_door,
    no_secret_over_plain_http,
    require_settings,
)
from service.providers.common import SignatureRefusals
from service.providers.twilio.rest import TwilioProvider
from service.providers.twilio.signature import TwilioSignature
from service.providers.twilio.webhooks import router

__all__ = ["PACKAGE", "TwilioProvider", "TwilioSignature", "signature"]

# It becomes a path segment of the REST URL (SignalWire's project ids carry dashes).
_ACCOUNT_SID = re.compile(r"[A-Za-z0-9-]{2,64}")


def check(settings: Settings) -> None:
    require_settings("twilio", {"PUBLIC_URL": settings.public_url, "TWILIO_ACCOUNT_SID": settings.twilio_account_sid,
                                "TWILIO_AUTH_TOKEN": settings.twilio_auth_token})
    assert settings.twilio_account_sid is not None
    if not _ACCOUNT_SID.fullmatch(settings.twilio_account_sid):
        raise SettingError("TWILIO_ACCOUNT_SID", "must be the account SID (e.g. AC… , letters and digits)")
    no_secret_over_plain_http(settings, "TWILIO_API_URL", settings.twilio_api_url, "TWILIO_AUTH_TOKEN")
    check_public_url(settings)
    closed_door(settings)


def build(settings: Settings) -> TwilioProvider:
    assert settings.public_url and settings.twilio_account_sid and settings.twilio_auth_token
    return TwilioProvider(
        api_url=settings.twilio_api_url,
        account_sid=settings.twilio_account_sid,
        auth_token=settings.twilio_auth_token.get_secret_value(),
        public_url=settings.public_url,
        timeout=settings.telephony_timeout,
        max_connections=min(settings.dispatch_concurrency, 100),
        # a machine gets the short voicemail after its beep, not the keypad question
        machine_detection=True,
        # Twilio's webhook connection overrides; SignalWire documents none
        connection_overrides=settings.signalwire_signing_key is None,
    )


def signature(settings: Settings) -> TwilioSignature:
    """The webhook signature check over PUBLIC_URL + path + query: with the auth token, or with
    SignalWire's project signing key when SIGNALWIRE_SIGNING_KEY is set."""
    assert settings.twilio_auth_token and settings.public_url
    key = settings.signalwire_signing_key or settings.twilio_auth_token
    return TwilioSignature(key.get_secret_value(), settings.public_url)


def install(app: FastAPI, settings: Settings) -> None:
    """Twilio's webhooks, on every replica; signed, so not behind API_TOKEN."""
    app.state.twilio_signature = signature(settings)
    app.state.signature_refusals = SignatureRefusals()
    app.state.no_answer_policy = settings.no_answer_policy()
    app.state.templates = settings.templates
    router.install(app)


PACKAGE = ProviderPackage("twilio", check=check, build=build, install=install)
