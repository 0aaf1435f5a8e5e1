"""Fail closed with a real provider: no API_TOKEN or no ALLOWED_COUNTRIES stops the replica with one
line naming the variable (`reminders serve` and a bare `uvicorn service.app:app` alike) unless the
operator says the open door is meant (ALLOW_OPEN_API=true, ALLOWED_COUNTRIES=*)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from harness.ports import free_port
from service.components import check
from service.config import Settings
from service.errors import SettingError
from tests.support.providers import PHONE, provider_settings

ROOT = Path(__file__).resolve().parent.parent
SETTING_NAMES = {name.upper() for name in Settings.model_fields} | {"ETCD_ENDPOINT"}
PROVIDERS = ("twilio", "telnyx")
TWILIO = {"TELEPHONY_PROVIDER": "twilio", "PUBLIC_URL": "https://reminders.example.com",
          "TWILIO_ACCOUNT_SID": "AC" + "9" * 32, "TWILIO_AUTH_TOKEN": "twilio-secret"}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_real_provider_refuses_an_open_api(provider: str) -> None:
    with pytest.raises(SettingError) as refused:
        provider_settings(provider, allow_open_api="false")
    assert refused.value.variable == "API_TOKEN"
    assert provider_settings(provider, allow_open_api="false", api_token="booking:s3cret").api_token is not None


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("countries", [None, "", " , "])
def test_a_real_provider_refuses_calling_every_country_by_default(provider: str, countries: str | None) -> None:
    overrides = {} if countries is None else {"allowed_countries": countries}
    with pytest.raises(SettingError) as refused:
        provider_settings(provider, **{"allowed_countries": None, **overrides})
    assert refused.value.variable == "ALLOWED_COUNTRIES"


@pytest.mark.parametrize(("countries", "allowlist"), [("*", None), ("us, ca", {"US", "CA"})])
def test_countries_chosen_on_purpose_serve(countries: str, allowlist: set[str] | None) -> None:
    settings = provider_settings("twilio", allowed_countries=countries)
    assert settings.country_allowlist == allowlist
    assert settings.planning_config().numbers.allowed_countries == allowlist


def test_a_star_among_codes_is_refused() -> None:
    with pytest.raises(ValueError, match="allowed_countries"):
        Settings(allowed_countries="US,*")


def test_the_generic_provider_keeps_its_open_defaults() -> None:
    settings = Settings()
    check(settings)
    assert settings.api_token is None and settings.country_allowlist is None


# --- real processes ------------------------------------------------------------------------------


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    return {**clean, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/r.db", **TWILIO, **values}


COMMANDS = {
    "reminders serve": [sys.executable, "-m", "service.cli", "serve", "--port", "0"],
    "uvicorn service.app:app": [sys.executable, "-m", "uvicorn", "service.app:app", "--port", "0"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("values", "variable"), [
    ({"ALLOWED_COUNTRIES": "US"}, "API_TOKEN"),
    ({"API_TOKEN": "ops:s3cret"}, "ALLOWED_COUNTRIES"),
    ({"API_TOKEN": "ops:s3cret", "ALLOWED_COUNTRIES": ""}, "ALLOWED_COUNTRIES"),
])
def test_a_replica_without_them_exits_with_one_line(command: str, values: dict[str, str], variable: str,
                                                    tmp_path: Path) -> None:
    result = subprocess.run(COMMANDS[command], env=_env(tmp_path, **values), cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and f"invalid setting {variable}:" in lines[0], result.stderr
    assert "s3cret" not in result.stderr


def test_a_replica_with_both_serves_and_asks_for_the_token(tmp_path: Path, etcd_endpoint: str) -> None:
    port = free_port()
    env = _env(tmp_path, API_TOKEN="booking:s3cret", ALLOWED_COUNTRIES="US,CA", ETCD_ENDPOINTS=etcd_endpoint,
               ELECTION_PREFIX=f"/fail-closed/{port}", POD_NAME="fail-closed")
    log = (tmp_path / "replica.log").open("w")
    replica = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            while True:
                assert replica.poll() is None, (tmp_path / "replica.log").read_text()
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the replica did not serve in 30 s"
                time.sleep(0.1)
            starts_at = (datetime.now(UTC) + timedelta(days=30)).isoformat()
            german = {"customer_name": "Ada", "phone": "+4930901820", "starts_at": starts_at}
            american = {**german, "phone": PHONE}
            token = {"Authorization": "Bearer s3cret"}
            assert client.post("/appointments", json=american).status_code == 401
            refused = client.post("/appointments", json=german, headers=token)
            assert refused.status_code == 422 and "ALLOWED_COUNTRIES" in refused.text, refused.text
            assert client.post("/appointments", json=american, headers=token).status_code == 201
    finally:
        replica.terminate()
        replica.wait(20)
        log.close()
