"""Each component's configuration, built in one place from Settings (used by app.py and cli.py).

A value the Settings accept alone but a component refuses in combination (e.g. TLS files with
http:// endpoints) raises `SettingError`, which names the environment variable.
"""

from __future__ import annotations

from service.config import Settings, plain_remote
from service.dispatch.dispatcher import DispatchConfig
from service.dispatch.events import EventsConfig
from service.election import ConfigError, ElectionConfig
from service.errors import SettingError
from service.providers import package
from service.telephony.provider import Provider

__all__ = ["SettingError", "check", "dispatch_config", "election_config", "events_config", "pool_size", "provider"]


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
        no_answer=settings.no_answer_policy(),
        templates=settings.templates,
        caps=settings.call_caps(),
        call_after_confirmation=settings.call_after_confirmation,
        retention=settings.personal_data_retention,
        events=events_config(settings),
    )


def events_config(settings: Settings) -> EventsConfig:
    """EVENTS_*: delivery needs its secret, and https:// unless the receiver is on this machine
    (or ALLOW_INSECURE_TRANSPORT): the events carry appointments' answers."""
    url, secret = settings.events_url, settings.events_secret
    if url is not None and secret is None:
        raise SettingError("EVENTS_SECRET", "required when EVENTS_URL is set (whsec_…, the receiver verifies with it)")
    if url is not None and plain_remote(url) and not settings.allow_insecure_transport:
        raise SettingError("EVENTS_URL", "must be https:// unless it is loopback (or ALLOW_INSECURE_TRANSPORT=true, "
                                         "never in production)")
    return EventsConfig(url=url, secret=secret.get_secret_value() if secret else None,
                        timeout=settings.events_timeout, max_age=settings.events_max_age,
                        retention=settings.events_retention)


def pool_size(settings: Settings) -> int:
    """DB_POOL_SIZE, or enough connections for the dispatcher's batches and the API."""
    return settings.db_pool_size or min(50, max(5, settings.dispatch_concurrency // 2))


def provider(settings: Settings) -> Provider:
    """The REST adapter of the provider TELEPHONY_PROVIDER names (`check` has passed)."""
    return package(settings.telephony_provider).build(settings)


def check(settings: Settings) -> None:
    """Check every component's configuration once: SettingError names the first bad variable."""
    package(settings.telephony_provider).check(settings)
    election_config(settings)
    dispatch_config(settings)
    if settings.no_answer_retries >= settings.dispatch_max_attempts:
        # each call of a reminder is an attempt: the last no-answer retry would find none left
        raise SettingError("NO_ANSWER_RETRIES", f"must be below DISPATCH_MAX_ATTEMPTS "
                                                f"({settings.dispatch_max_attempts}): each retry is one more attempt")
