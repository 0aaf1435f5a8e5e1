"""`reminders check`: before calls depend on them, the settings as `reminders serve` reads them,
then each dependency once, one line each (docs/DESIGN.md, "Commands"):

    settings    every setting, as `serve` checks them (a refusal: one line, exit 2)
    database    DATABASE_URL answers and its schema is at the migrations' head
    etcd        ETCD_ENDPOINTS answers a read under ELECTION_PREFIX/ with the configured TLS, user
                and password
    provider    the provider accepts the credentials (an authenticated read that creates nothing)
    signature   the webhook signature settings are well formed (real providers)
    public_url  a POST to PUBLIC_URL's webhook route arrives at a replica and is refused for its
                missing signature (real providers)

Exit 0 when every line is `ok`, 1 otherwise, 2 for a setting the settings themselves refuse. A
failed line names the environment variable to look at; no line carries a secret. Every check is
bounded in time; they run side by side.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aetcd import rpc
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from service.components import check as check_components
from service.components import election_config
from service.config import Settings, setting_error_line
from service.db import Database, SchemaOutOfDate
from service.election import ElectionError, connect
from service.election.client import call
from service.election.elector import is_auth_failure
from service.errors import SettingError
from service.providers.generic import preflight as generic_preflight
from service.providers.preflight import CheckLine, Preflight, dumps, failed, maybe, passed
from service.providers.telnyx import preflight as telnyx_preflight
from service.providers.twilio import preflight as twilio_preflight
from service.telephony.http import error_text

__all__ = ["CHECKS", "PREFLIGHTS", "main", "run_checks"]

# TELEPHONY_PROVIDER → its package's preflight (one line here per provider, as in PROVIDERS).
PREFLIGHTS: dict[str, Preflight] = {
    "generic": generic_preflight.run, "twilio": twilio_preflight.run, "telnyx": telnyx_preflight.run,
}
# The names `--skip` takes, in the order the lines are printed.
CHECKS = ("database", "etcd", "provider", "signature", "public_url")

DATABASE_TIMEOUT = 10.0
ETCD_TIMEOUT = 5.0


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text and text[0] else type(error).__name__


def _secrets(settings: Settings) -> list[str]:
    """Every secret value of the settings: never in a line, whatever an error message carries."""
    values = [settings.etcd_password, settings.telephony_token, settings.api_token, settings.twilio_auth_token,
              settings.telnyx_api_key]
    found = [v.get_secret_value() for v in values if v is not None]
    password = make_url(settings.database_url).password
    if password:
        found.append(str(password))
    return [s for s in found if len(s) >= 4]


def _redacted(line: CheckLine, secrets: list[str]) -> CheckLine:
    detail = line.detail
    for secret in secrets:
        detail = detail.replace(secret, "***")
    return line if detail == line.detail else CheckLine(line.name, line.ok, detail, line.setting, line.skipped)


async def database_line(settings: Settings, timeout: float = DATABASE_TIMEOUT) -> CheckLine:
    """The database answers and its schema is at head. A SQLite file is not created here: `serve`
    creates and migrates its own."""
    url = make_url(settings.database_url)
    shown = url.render_as_string(hide_password=True)
    file = url.database if settings.is_sqlite and url.database and url.database != ":memory:" else None
    if file is not None and not await asyncio.to_thread(Path(file).exists):
        return passed("database", f"{shown} does not exist yet: `reminders serve` creates and migrates a SQLite file")
    db = Database(settings.database_url, pool_size=1)
    try:
        async with asyncio.timeout(timeout):
            await db.check_schema()
    except SchemaOutOfDate as error:
        if settings.is_sqlite:
            return passed("database", f"{shown}: {error} (`reminders serve` migrates a SQLite file itself)")
        return failed("database", "DATABASE_URL", f"{shown}: {error}")
    except TimeoutError:
        return failed("database", "DATABASE_URL", f"{shown}: no answer within {timeout:g} s")
    except Exception as error:  # noqa: BLE001 - any failure to connect is the one line's answer
        return failed("database", "DATABASE_URL", f"{shown}: not reachable: {error_text(_first_line(error))}")
    finally:
        await db.dispose()
    return passed("database", f"{shown} answers; its schema is at the migrations' head")


def _prefix_end(prefix: bytes) -> bytes:
    """The range end of every key under `prefix` (etcd's prefix range: the last byte plus one)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


async def etcd_line(settings: Settings, timeout: float = ETCD_TIMEOUT) -> CheckLine:
    """One read under ELECTION_PREFIX/ (the election's keys, all the etcd user may read) with the
    TLS, user and password the election uses."""
    config = election_config(settings)
    where = ",".join(config.endpoints)
    user = f" as user {config.username}" if config.username else ""
    prefix = (config.prefix + "/").encode()
    request = rpc.RangeRequest(key=prefix, range_end=_prefix_end(prefix), count_only=True)
    client = connect(config)
    try:
        async with asyncio.timeout(timeout + 1):
            response = await call(client, "Range", "kvstub", request, timeout)
    except (ElectionError, TimeoutError) as error:
        text = error_text(str(error) or type(error).__name__)
        code = getattr(getattr(error, "code", None), "name", None)
        if code == "PERMISSION_DENIED":
            return failed("etcd", "ELECTION_PREFIX", f"{where}: the etcd user{user} may not read under "
                                                     f"{config.prefix}/ ({text}): the etcd-auth Job grants the role "
                                                     "on ELECTION_PREFIX/ only")
        if is_auth_failure(error):
            variable = "ETCD_PASSWORD" if config.password else "ETCD_USERNAME"
            return failed("etcd", variable, f"{where} refused the credentials{user} ({text})")
        if config.ca_cert and any(word in text for word in ("SSL", "ssl", "certificate", "handshake")):
            return failed("etcd", "ETCD_CA_CERT", f"{where}: TLS failed ({text})")
        return failed("etcd", "ETCD_ENDPOINTS", f"{where} did not answer{user}: {text}")
    finally:
        try:
            async with asyncio.timeout(2):
                await client.close()
        except Exception:  # noqa: BLE001 - closing a channel that never opened: nothing to report
            pass
    keys = int(getattr(response, "count", 0))
    return passed("etcd", f"{where} answered{user}: {keys} key(s) under {config.prefix}/ (the election's candidates)")


async def run_checks(settings: Settings, *, skip: frozenset[str] = frozenset()) -> list[CheckLine]:
    """Every line after the settings', in CHECKS order (`check_components` has passed)."""
    database, etcd, provider = await asyncio.gather(
        maybe("database", skip, database_line(settings)),
        maybe("etcd", skip, etcd_line(settings)),
        PREFLIGHTS[settings.telephony_provider](settings, skip=skip),
    )
    return [database, etcd, *provider]


def _settings_detail(settings: Settings) -> str:
    parts = [f"TELEPHONY_PROVIDER={settings.telephony_provider}"]
    if settings.telephony_provider == "generic":
        parts.append(f"TELEPHONY_URL={settings.telephony_url}")
    else:
        parts.append(f"PUBLIC_URL={settings.public_url}")
    rate = f"{settings.calls_per_second:g}" if settings.calls_per_second else "0 (no limit)"
    parts.append(f"CALLS_PER_SECOND={rate}")
    return ", ".join(parts) + ": accepted as `reminders serve` reads them"


def _read_settings() -> tuple[Settings | None, CheckLine]:
    try:
        settings = Settings()
    except ValidationError as error:
        line = setting_error_line(error).removeprefix("invalid setting ")
        variable, _, message = line.partition(": ")
        return None, failed("settings", variable, message or line)
    try:
        check_components(settings)
    except SettingError as error:
        return None, failed("settings", error.variable, error.message)
    return settings, passed("settings", _settings_detail(settings))


def _emit(lines: list[CheckLine], as_json: bool) -> None:
    if as_json:
        print(dumps(lines))
    else:
        for line in lines:
            print(line.text())
    sys.stdout.flush()


def main(*, as_json: bool = False, skip: frozenset[str] = frozenset()) -> int:
    """Run the checks, print the lines (or one JSON document); the exit status."""
    settings, first = _read_settings()
    if settings is None:
        _emit([first], as_json)
        return 2
    lines = [first, *asyncio.run(run_checks(settings, skip=skip))]
    secrets = _secrets(settings)
    lines = [_redacted(line, secrets) for line in lines]
    _emit(lines, as_json)
    return 0 if all(line.ok for line in lines) else 1
