"""Each component's configuration, built in one place from Settings (used by app.py and cli.py).

A value the Settings accept alone but a component refuses in combination (e.g. TLS files with
http:// endpoints) raises `SettingError`, which names the environment variable.
"""

from __future__ import annotations

from service.config import Settings
from service.dispatch.dispatcher import DispatchConfig
from service.election import ConfigError, ElectionConfig
from service.telephony import HttpTelephonyClient
from service.telephony.generic import GenericProvider
from service.telephony.provider import Provider
from service.telephony.telnyx import TelnyxProvider, TelnyxSignature
from service.telephony.twilio import TwilioProvider, TwilioSignature

__all__ = [
    "SettingError",
    "check",
    "dispatch_config",
    "election_config",
    "pool_size",
    "provider",
    "telephony_client",
    "telnyx_signature",
    "twilio_signature",
]


class SettingError(ValueError):
    """A bad setting: `variable` is the environment variable, `message` what is wrong with it."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable, self.message = variable, message


# ElectionConfig field -> the environment variable it comes from (margin and request_timeout are
# derived: what bounds them is the lease's TTL)
_ELECTION_VARIABLES = {
    "endpoints": "ETCD_ENDPOINTS", "name": "POD_NAME", "prefix": "ELECTION_PREFIX", "lease_ttl": "LEASE_TTL",
    "margin": "LEASE_TTL", "request_timeout": "LEASE_TTL", "max_term": "LEADER_MAX_TERM",
    "username": "ETCD_USERNAME", "password": "ETCD_PASSWORD", "ca_cert": "ETCD_CA_CERT", "cert": "ETCD_CERT",
    "key": "ETCD_KEY",
}


def election_config(settings: Settings) -> ElectionConfig:
    try:
        return ElectionConfig(
            endpoints=settings.etcd_endpoints,
            prefix=settings.election_prefix,
            name=settings.pod_name,
            lease_ttl=settings.lease_ttl,
            max_term=settings.leader_max_term,
            username=settings.etcd_username,
            password=settings.etcd_password.get_secret_value() if settings.etcd_password else None,
            ca_cert=settings.etcd_ca_cert,
            cert=settings.etcd_cert,
            key=settings.etcd_key,
        )
    except ConfigError as error:
        raise SettingError(_ELECTION_VARIABLES.get(error.field, error.field.upper()), error.message) from None


def dispatch_config(settings: Settings) -> DispatchConfig:
    return DispatchConfig(
        instance=settings.pod_name,
        caller_id=settings.telephony_from,
        call_window=settings.call_window,
        misfire_grace=settings.misfire_grace,
        concurrency=settings.dispatch_concurrency,
        calls_per_second=settings.calls_per_second,
        max_attempts=settings.dispatch_max_attempts,
        retry_base_delay=settings.retry_base_delay,
        reconcile_grace=settings.effective_reconcile_grace,
    )


def pool_size(settings: Settings) -> int:
    """DB_POOL_SIZE, or enough connections for the dispatcher's batches and the API."""
    return settings.db_pool_size or min(50, max(5, settings.dispatch_concurrency // 2))


def telephony_client(settings: Settings) -> HttpTelephonyClient:
    return HttpTelephonyClient(
        settings.telephony_url,
        token=settings.telephony_token.get_secret_value() if settings.telephony_token else None,
        timeout=settings.telephony_timeout,
        max_connections=settings.dispatch_concurrency,
    )


def provider(settings: Settings) -> Provider:
    """The adapter TELEPHONY_PROVIDER names (Settings has checked that its settings are there)."""
    if settings.telephony_provider == "twilio":
        assert settings.public_url and settings.twilio_account_sid and settings.twilio_auth_token
        return TwilioProvider(
            api_url=settings.twilio_api_url,
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token.get_secret_value(),
            public_url=settings.public_url,
            timeout=settings.telephony_timeout,
            max_connections=min(settings.dispatch_concurrency, 100),
            # a machine gets the short voicemail, not the keypad question (AnsweredBy on the voice request)
            machine_detection=True,
        )
    if settings.telephony_provider == "telnyx":
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
    return GenericProvider(telephony_client(settings))


def twilio_signature(settings: Settings) -> TwilioSignature:
    """The webhook signature check: the auth token over PUBLIC_URL + path + query."""
    assert settings.twilio_auth_token and settings.public_url
    return TwilioSignature(settings.twilio_auth_token.get_secret_value(), settings.public_url)


def telnyx_signature(settings: Settings) -> TelnyxSignature:
    """The event signature check: Ed25519 with TELNYX_PUBLIC_KEY over "{timestamp}|{body}"."""
    assert settings.telnyx_public_key
    return TelnyxSignature(settings.telnyx_public_key)


def check(settings: Settings) -> None:
    """Build every component's configuration once: SettingError names the first bad variable."""
    election_config(settings)
    dispatch_config(settings)
