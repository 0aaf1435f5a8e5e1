"""Component configs from Settings: one place, and errors that carry the variable's name."""

from __future__ import annotations

import pytest

from service.components import dispatch_config, election_config
from service.config import Settings
from service.errors import SettingError


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"etcd_ca_cert": "/nonexistent.pem", "etcd_endpoints": "https://127.0.0.1:2379"}, "ETCD_CA_CERT"),
        ({"etcd_ca_cert": "/etc/hostname"}, "ETCD_CA_CERT"),  # TLS files need https:// endpoints
        ({"etcd_username": "alice"}, "ETCD_PASSWORD"),  # the missing half is named
    ],
)
def test_election_errors_name_the_variable(settings: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingError) as caught:
        election_config(Settings(**settings))
    assert caught.value.variable == variable
    assert caught.value.message and variable not in caught.value.message


def test_configs_follow_the_settings() -> None:
    settings = Settings(pod_name="replica-a", lease_ttl=7, call_window="00:00-24:00", dispatch_concurrency=9)
    election = election_config(settings)
    dispatch = dispatch_config(settings)
    assert (election.name, election.lease_ttl) == ("replica-a", 7)
    assert (dispatch.instance, dispatch.concurrency, str(dispatch.call_window)) == ("replica-a", 9, "00:00-24:00")
    assert settings.planning_config().call_window == dispatch.call_window
