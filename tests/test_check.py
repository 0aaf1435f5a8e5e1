"""`reminders check` (service/check.py, service/providers/*/preflight.py).

* in process: each provider's lines against the fakes' apps (httpx.ASGITransport) and hand-made
  answers — the account and application reads, the signature settings, PUBLIC_URL's probe;
* as the command (`python -m service.cli check`, the environment as `serve` reads it) against a
  real etcd, a real PostgreSQL, the Twilio- and Telnyx-shaped fakes as processes and a replica of
  each provider: correct settings pass with one line per check (exit 0); a wrong auth token, a
  malformed public key, an unreachable PUBLIC_URL, a PUBLIC_URL whose route answers 404 and a
  database not migrated fail, the failed line naming the setting; no secret is ever printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from starlette.applications import Starlette

from harness.ports import free_port, wait_for_port
from harness.postgres import PostgresServer
from reminders_fakes.telnyx import TEST_PUBLIC_KEY, FakeTelnyx
from reminders_fakes.twilio import FakeTwilio
from service.config import Settings
from service.db import Database
from service.providers import telnyx as telnyx_package
from service.providers import twilio as twilio_package
from service.providers.preflight import CheckLine, public_url_line
from service.providers.telnyx import preflight as telnyx_preflight
from service.providers.twilio import preflight as twilio_preflight
from tests.support.replica import serve_replica
from tests.test_election_secure import tls_etcd  # noqa: F401 - the TLS etcd with user auth, as a fixture

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
SID = "AC" + "7" * 32
TOKEN = "0123456789abcdef0123456789abcdef"  # Twilio's shape: 32 hexadecimal characters
OTHER_TOKEN = "fedcba9876543210fedcba9876543210"
API_KEY = "KEYcheck-telnyx-api-key"
CONNECTION = "1494404757140276705"
SETTING_NAMES = {name.upper() for name in Settings.model_fields} | {"ETCD_ENDPOINT"}
SECRETS = (TOKEN, OTHER_TOKEN, API_KEY, "not-a-twilio-token", "reminders-check-token")


# a real provider refuses to start without API_TOKEN and ALLOWED_COUNTRIES unless told to run open
OPEN_ON_PURPOSE = {"allow_open_api": True, "allowed_countries": "*"}


def _settings(**values: Any) -> Settings:
    return Settings(**values)


def _twilio(api_url: str = "http://twilio.test", token: str = TOKEN, **values: Any) -> Settings:
    return _settings(**{"telephony_provider": "twilio", "twilio_account_sid": SID,
                        "twilio_auth_token": SecretStr(token), "twilio_api_url": api_url,
                        "public_url": "https://reminders.example.com", **OPEN_ON_PURPOSE, **values})


def _telnyx(**values: Any) -> Settings:
    return _settings(**{"telephony_provider": "telnyx", "telnyx_api_key": SecretStr(API_KEY),
                        "telnyx_connection_id": CONNECTION, "telnyx_public_key": TEST_PUBLIC_KEY,
                        "telnyx_api_url": "http://telnyx.test", "public_url": "https://reminders.example.com",
                        **OPEN_ON_PURPOSE, **values})


def _answer(status: int, body: dict[str, Any]) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(status, json=body))


# --- in process: the provider's lines ---------------------------------------------------------------


async def test_twilio_account_read_against_the_fake() -> None:
    fake = FakeTwilio(account_sid=SID, auth_token=TOKEN)
    transport = httpx.ASGITransport(fake.app)
    good = await twilio_preflight.account_line(_twilio(), transport)
    assert good.ok and SID in good.detail and "status active" in good.detail, good
    wrong = await twilio_preflight.account_line(_twilio(token=OTHER_TOKEN), transport)
    assert (wrong.ok, wrong.setting) == (False, "TWILIO_AUTH_TOKEN") and "401" in wrong.detail, wrong
    assert not fake.calls, "the check created nothing"
    # The fake answers another account's sid as Twilio does, with the account's own credentials.
    async with httpx.AsyncClient(transport=transport, auth=(SID, TOKEN)) as client:
        assert (await client.get(f"http://twilio.test/2010-04-01/Accounts/AC{'1' * 32}.json")).status_code == 404


@pytest.mark.parametrize(("status", "body", "setting", "words"), [
    (200, {"status": "suspended", "type": "Full"}, "TWILIO_ACCOUNT_SID", "suspended"),
    (404, {"code": 20404}, "TWILIO_ACCOUNT_SID", "no account"),
    (503, {}, "TWILIO_API_URL", "HTTP 503"),
])
async def test_twilio_account_answers_name_the_setting(status: int, body: dict[str, Any], setting: str,
                                                       words: str) -> None:
    line = await twilio_preflight.account_line(_twilio(), _answer(status, body))
    assert (line.ok, line.setting) == (False, setting) and words in line.detail, line


async def test_a_trial_account_passes_and_says_so() -> None:
    line = await twilio_preflight.account_line(_twilio(), _answer(200, {"status": "active", "type": "Trial"}))
    assert line.ok and "verified numbers only" in line.detail, line


@pytest.mark.parametrize(("token", "api_url", "ok"), [
    (TOKEN, "https://api.twilio.com", True),
    (TOKEN.upper(), "https://api.twilio.com", True),
    ("0123456789abcdef", "https://api.twilio.com", False),
    (TOKEN + "\n", "https://api.twilio.com", False),
    ("g" * 32, "https://api.twilio.com", False),
    ("PT" + "x" * 48, "https://example.signalwire.com/api/laml", True),
])
def test_twilio_auth_token_shape(token: str, api_url: str, ok: bool) -> None:
    line = twilio_preflight.signature_line(_twilio(api_url=api_url, token=token))
    assert line.ok is ok and (ok or line.setting == "TWILIO_AUTH_TOKEN"), line
    assert token.strip() not in line.text()


async def test_telnyx_application_read_against_the_fake() -> None:
    fake = FakeTelnyx(api_key=API_KEY, connection_id=CONNECTION)
    transport = httpx.ASGITransport(fake.app)
    good = await telnyx_preflight.application_line(_telnyx(), transport)
    assert good.ok and CONNECTION in good.detail and "outbound voice profile set" in good.detail, good
    wrong_key = await telnyx_preflight.application_line(_telnyx(telnyx_api_key=SecretStr("KEYwrong")), transport)
    assert (wrong_key.ok, wrong_key.setting) == (False, "TELNYX_API_KEY"), wrong_key
    wrong_id = await telnyx_preflight.application_line(_telnyx(telnyx_connection_id="42"), transport)
    assert (wrong_id.ok, wrong_id.setting) == (False, "TELNYX_CONNECTION_ID") and "404" in wrong_id.detail, wrong_id
    assert not fake.calls, "the check created nothing"


@pytest.mark.parametrize(("application", "words"), [
    ({"active": False, "outbound": {"outbound_voice_profile_id": "1"}}, "not active"),
    ({"active": True, "outbound": {"outbound_voice_profile_id": None}}, "no outbound voice profile"),
    ({"active": True, "outbound": {"outbound_voice_profile_id": "1"}, "webhook_api_version": "1"}, "API v1"),
])
async def test_a_telnyx_application_that_cannot_call_fails(application: dict[str, Any], words: str) -> None:
    line = await telnyx_preflight.application_line(_telnyx(), _answer(200, {"data": application}))
    assert (line.ok, line.setting) == (False, "TELNYX_CONNECTION_ID") and words in line.detail, line


@pytest.mark.parametrize(("key", "ok"), [
    (TEST_PUBLIC_KEY, True),
    (TEST_PUBLIC_KEY + "\n", True),  # the service strips surrounding whitespace too
    (TEST_PUBLIC_KEY[:20] + "\n" + TEST_PUBLIC_KEY[20:], False),  # wrapped by a newline inside
    (TEST_PUBLIC_KEY[:-4], False),
])
def test_telnyx_public_key_decodes_to_32_bytes(key: str, ok: bool) -> None:
    line = telnyx_preflight.signature_line(_telnyx(telnyx_public_key=key))
    assert line.ok is ok and (ok or line.setting == "TELNYX_PUBLIC_KEY"), line


def _replica_app(settings: Settings) -> FastAPI:
    """The provider's webhook routes as a replica serves them (the package installs them)."""
    app = FastAPI()
    {"twilio": twilio_package, "telnyx": telnyx_package}[settings.telephony_provider].install(app, settings)
    return app


@pytest.mark.parametrize("settings", [_twilio(), _telnyx()], ids=["twilio", "telnyx"])
async def test_public_url_reaches_the_webhook_route_and_is_refused_for_its_signature(settings: Settings) -> None:
    path = {"twilio": "/telephony/twilio/status", "telnyx": "/telephony/telnyx/events"}[settings.telephony_provider]
    line = await public_url_line(settings, path, httpx.ASGITransport(_replica_app(settings)), 5)
    assert line.ok and "403" in line.detail, line
    elsewhere = await public_url_line(settings, path, httpx.ASGITransport(Starlette()), 5)
    assert (elsewhere.ok, elsewhere.setting) == (False, "PUBLIC_URL") and "404" in elsewhere.detail, elsewhere
    waf = await public_url_line(settings, path, _answer(403, {"message": "Forbidden"}), 5)
    assert (waf.ok, waf.setting) == (False, "PUBLIC_URL") and "not this service's" in waf.detail, waf


async def test_public_url_must_be_https_unless_loopback() -> None:
    plain = _twilio(public_url="http://reminders.example.com")
    line = await public_url_line(plain, "/telephony/twilio/status", _answer(403, {"detail": "invalid signature"}), 5)
    assert (line.ok, line.setting) == (False, "PUBLIC_URL") and "not https" in line.detail, line
    local = _twilio(public_url="http://127.0.0.1:9")
    assert (await public_url_line(local, "/x", _answer(403, {"detail": "invalid signature"}), 5)).ok


async def test_an_unreachable_public_url_names_it() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    line = await public_url_line(_telnyx(), "/telephony/telnyx/events", httpx.MockTransport(refuse), 5)
    assert (line.ok, line.setting) == (False, "PUBLIC_URL") and "did not arrive" in line.detail, line


async def test_skipped_checks_send_nothing() -> None:
    def nothing(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"sent {request.url}")

    lines = await twilio_preflight.run(_twilio(), httpx.MockTransport(nothing),
                                       skip=frozenset({"provider", "public_url"}))
    assert [(line.name, line.skipped) for line in lines] == [("provider", True), ("signature", False),
                                                              ("public_url", True)]
    assert lines[0].text() == "skip provider: not checked (--skip provider)"


def test_a_line_names_the_setting_and_the_json_has_the_documented_shape() -> None:
    from service.providers.preflight import dumps

    lines = [CheckLine("database", True, "fine"), CheckLine("public_url", False, "404", "PUBLIC_URL")]
    assert [line.text() for line in lines] == ["ok   database: fine", "FAIL PUBLIC_URL: 404"]
    assert json.loads(dumps(lines)) == {"ok": False, "checks": [
        {"name": "database", "ok": True, "setting": None, "detail": "fine"},
        {"name": "public_url", "ok": False, "setting": "PUBLIC_URL", "detail": "404"},
    ]}


def test_the_command_offers_every_check_to_skip() -> None:
    import argparse

    from service.check import CHECKS
    from service.cli import _parser

    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    skip = next(a for a in commands.choices["check"]._actions if a.dest == "skip")
    assert tuple(skip.choices) == CHECKS


# --- the command, against real services ----------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """This process's environment without any setting (none may leak into the command)."""
    return {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}


def _check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "service.cli", "check", *args], env={**_clean_env(), **env},
                            cwd=ROOT, capture_output=True, text=True, timeout=90)
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr, "a secret was printed"
    return result


def _lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """name or failed setting → the line, in order (the first word says ok / FAIL)."""
    out = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition(" ")
        out[rest.strip().split(":")[0]] = status
    return out


class Rig:
    """A migrated database, an empty one, etcd, both fakes and a replica of each provider."""

    def __init__(self, etcd: str, database: str, empty_database: str) -> None:
        self.etcd, self.database, self.empty_database = etcd, database, empty_database
        self.twilio_api = self.telnyx_api = self.twilio_public = self.telnyx_public = ""

    def common(self) -> dict[str, str]:
        return {"DATABASE_URL": self.database, "ETCD_ENDPOINTS": self.etcd, "ELECTION_PREFIX": "/check/leader",
                "TELEPHONY_TIMEOUT": "5", "CALLS_PER_SECOND": "1", "API_TOKEN": "reminders-check-token",
                "ALLOWED_COUNTRIES": "US,DE"}

    def twilio(self, **overrides: str) -> dict[str, str]:
        return {**self.common(), "TELEPHONY_PROVIDER": "twilio", "TWILIO_API_URL": self.twilio_api,
                "TWILIO_ACCOUNT_SID": SID, "TWILIO_AUTH_TOKEN": TOKEN, "PUBLIC_URL": self.twilio_public, **overrides}

    def telnyx(self, **overrides: str) -> dict[str, str]:
        return {**self.common(), "TELEPHONY_PROVIDER": "telnyx", "TELNYX_API_URL": self.telnyx_api,
                "TELNYX_API_KEY": API_KEY, "TELNYX_CONNECTION_ID": CONNECTION, "TELNYX_PUBLIC_KEY": TEST_PUBLIC_KEY,
                "PUBLIC_URL": self.telnyx_public, **overrides}


def _fake(stack: ExitStack, module: str, *args: str) -> str:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args], env=_clean_env(),
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(process.wait, 10)
    stack.callback(process.terminate)
    wait_for_port(port, timeout=30)
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def rig(etcd_server: Any, postgres_server: PostgresServer) -> Iterator[Rig]:
    database = postgres_server.create_database(f"check_{os.getpid()}")
    empty = postgres_server.create_database(f"check_empty_{os.getpid()}")

    async def migrate() -> None:
        db = Database(database)
        try:
            await db.upgrade()
        finally:
            await db.dispose()

    asyncio.run(migrate())
    rig = Rig(etcd_server.endpoint, database, empty)
    with ExitStack() as stack:
        rig.twilio_api = _fake(stack, "reminders_fakes.twilio", "--account-sid", SID, "--auth-token", TOKEN)
        rig.telnyx_api = _fake(stack, "reminders_fakes.telnyx", "--api-key", API_KEY, "--connection-id", CONNECTION)
        for provider in ("twilio", "telnyx"):
            # Its own PUBLIC_URL only bases signatures: an unsigned request is refused whatever it is.
            # One election for both (one database, one fence): one of them leads, with nothing due.
            env = getattr(rig, provider)(PUBLIC_URL="http://127.0.0.1:1")
            directory = Path(tempfile.mkdtemp(prefix=f"check-{provider}-"))
            stack.callback(shutil.rmtree, directory, ignore_errors=True)
            setattr(rig, f"{provider}_public", stack.enter_context(serve_replica(env, directory)))
        yield rig


@pytest.mark.slow
def test_twilio_correct_settings_pass_one_line_per_check(rig: Rig) -> None:
    result = _check(rig.twilio())
    assert result.returncode == 0, result.stdout + result.stderr
    assert _lines(result) == {name: "ok" for name in
                              ("settings", "database", "etcd", "provider", "signature", "public_url")}, result.stdout


@pytest.mark.slow
def test_telnyx_correct_settings_pass_one_line_per_check_json_too(rig: Rig) -> None:
    result = _check(rig.telnyx(), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is True
    assert [c["name"] for c in document["checks"]] == ["settings", "database", "etcd", "provider", "signature",
                                                       "public_url"]
    assert all(c["ok"] and c["setting"] is None and c["detail"] for c in document["checks"]), document


@pytest.mark.slow
@pytest.mark.parametrize(("token", "failed"), [
    (OTHER_TOKEN, {"TWILIO_AUTH_TOKEN"}),  # the right shape, not the account's: Twilio says 401
    ("not-a-twilio-token", {"TWILIO_AUTH_TOKEN"}),  # 401, and the shape is wrong too
])
def test_a_wrong_twilio_auth_token_names_it(rig: Rig, token: str, failed: set[str]) -> None:
    result = _check(rig.twilio(TWILIO_AUTH_TOKEN=token))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = _lines(result)
    assert {name for name, status in lines.items() if status == "FAIL"} == failed, result.stdout
    assert len(result.stdout.splitlines()) == 6


@pytest.mark.slow
def test_a_malformed_telnyx_public_key_is_refused_with_one_line(rig: Rig) -> None:
    result = _check(rig.telnyx(TELNYX_PUBLIC_KEY=TEST_PUBLIC_KEY[:30]))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.startswith("FAIL TELNYX_PUBLIC_KEY: ") and len(result.stdout.splitlines()) == 1, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "setting"), [
    ({"TELNYX_API_KEY": "KEYnot-the-account"}, "TELNYX_API_KEY"),
    ({"TELNYX_CONNECTION_ID": "1111111111111111111"}, "TELNYX_CONNECTION_ID"),
])
def test_wrong_telnyx_credentials_name_the_setting(rig: Rig, overrides: dict[str, str], setting: str) -> None:
    result = _check(rig.telnyx(**overrides))
    assert result.returncode == 1, result.stdout + result.stderr
    assert [name for name, status in _lines(result).items() if status == "FAIL"] == [setting], result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("where", ["unreachable", "route answers 404"])
def test_a_public_url_that_does_not_reach_a_replica_names_it(rig: Rig, where: str) -> None:
    # 404: the fake provider answers there, not a replica; unreachable: nothing listens.
    url = rig.telnyx_api if where == "route answers 404" else f"http://127.0.0.1:{free_port()}"
    result = _check(rig.twilio(PUBLIC_URL=url))
    assert result.returncode == 1, result.stdout + result.stderr
    assert [name for name, status in _lines(result).items() if status == "FAIL"] == ["PUBLIC_URL"], result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("FAIL"))
    assert ("404" in line) if where == "route answers 404" else ("did not arrive" in line), line


@pytest.mark.slow
def test_a_database_not_migrated_and_an_etcd_not_answering_name_theirs(rig: Rig) -> None:
    result = _check(rig.twilio(DATABASE_URL=rig.empty_database, ETCD_ENDPOINTS=f"http://127.0.0.1:{free_port()}"))
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert [line.split(":")[0] for line in failed] == ["FAIL DATABASE_URL", "FAIL ETCD_ENDPOINTS"], result.stdout
    assert "reminders migrate" in failed[0], failed[0]


@pytest.mark.slow
@pytest.mark.requires("openssl", "etcd", "etcdctl")
@pytest.mark.parametrize(("overrides", "setting"), [
    ({}, None),
    ({"etcd_password": SecretStr("not-the-password")}, "ETCD_PASSWORD"),
    ({"ca": "client.pem"}, "ETCD_CA_CERT"),  # a certificate that did not sign etcd's
])
async def test_etcd_answers_with_the_configured_credentials(tls_etcd: dict[str, str],  # noqa: F811 - the fixture
                                                            overrides: dict[str, Any], setting: str | None) -> None:
    """etcd over TLS with user auth (tests/test_election_secure.py's): the right credentials pass,
    a wrong password or CA names its setting, and the password is never in the line."""
    from service.check import etcd_line

    ca = tls_etcd[overrides.pop("ca", "ca.pem")]
    settings = _settings(**{"etcd_endpoints": tls_etcd["endpoint"], "etcd_ca_cert": ca, "etcd_username": "root",
                            "etcd_cert": tls_etcd["client.pem"], "etcd_key": tls_etcd["client.key"],
                            "etcd_password": SecretStr("rootpw"), **overrides})
    line = await etcd_line(settings)
    assert line.ok is (setting is None) and line.setting == setting, line
    assert "rootpw" not in line.text() and "not-the-password" not in line.text()
    if setting is None:
        assert "as user root" in line.detail, line
