"""The dispatcher against both real providers' fakes (Twilio, Telnyx; in process, webhooks through a
prefix-stripping proxy) on SQLite and PostgreSQL: each reminder heard once, attempts in doubt
reconciled, a 429 retried, a failure mid-call looked at again; the API's outcome fields; and the
app's wiring of TELEPHONY_PROVIDER in each mode. Telnyx's own (its Dial rate, the speech sweep):
tests/test_telnyx_webhooks.py."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from service.app import create_app
from service.components import check
from service.components import provider as provider_for
from service.config import Settings
from service.db import CallAttempt, Database, Reminder
from service.dispatch.dispatcher import Dispatcher
from service.providers.generic.adapter import GenericProvider
from service.providers.telnyx.rest import TelnyxProvider
from service.providers.twilio.rest import TwilioProvider
from tests.support.providers import PROVIDERS, Rig, provider_settings, rig_on
from tests.support.waiting import eventually
from tests.test_dispatch import FakeTerm, config, lead_until, seed

pytestmark = pytest.mark.anyio


@pytest.fixture(params=PROVIDERS)
async def rig(request: pytest.FixtureRequest, db: Database) -> AsyncIterator[Rig]:
    async with rig_on(db, request.param, ring_ms=20) as rig:
        yield rig


async def rows(db: Database) -> list:
    async with db.session() as session:
        return list(await session.execute(select(Reminder.__table__)))


async def attempts(db: Database) -> list:
    async with db.session() as session:
        return list(await session.execute(select(CallAttempt.__table__)))


async def test_each_reminder_is_heard_once_and_sent_answered(db: Database, rig: Rig) -> None:
    ids = await seed(db, 12)  # all to one number: several reminders may share it

    async def all_answered() -> bool:
        found = await rows(db)
        return all(r.status == "sent" and r.outcome == "answered" for r in found)

    await lead_until(Dispatcher(db, rig.provider, config(reconcile_grace=timedelta(seconds=5))), FakeTerm(2),
                     all_answered)
    await eventually(rig.over())
    heard = Counter(rig.reminder_of(call) for call in rig.calls() if call.heard)
    assert heard == Counter({reminder_id: 1 for reminder_id in ids})
    assert len(rig.fake.calls) == 12
    assert {r.bound_call_id for r in await rows(db)} == {r.provider_call_id for r in await rows(db)}
    assert {a.state for a in await attempts(db)} == {"created"}
    assert {a.fencing_token for a in await attempts(db)} == {2}


async def test_in_doubt_creates_are_reconciled_not_repeated(db: Database, rig: Rig) -> None:
    rig.fake.controls.fail_after_create_rate = 1.0  # every create makes a call and answers 500
    ids = await seed(db, 4)

    async def all_answered() -> bool:
        return all(r.status == "sent" and r.outcome == "answered" for r in await rows(db))

    await lead_until(Dispatcher(db, rig.provider, config(reconcile_grace=timedelta(seconds=1))), FakeTerm(1),
                     all_answered)
    await eventually(rig.over())
    heard = Counter(rig.reminder_of(call) for call in rig.calls() if call.heard)
    assert heard == Counter({reminder_id: 1 for reminder_id in ids})
    assert len(rig.fake.calls) == 4  # one create each: the calls' own webhooks settled the doubt
    assert {a.state for a in await attempts(db)} == {"in_doubt"}
    assert all(a.provider_call_id for a in await attempts(db))


async def test_429_is_not_a_creation_and_is_retried(db: Database, rig: Rig) -> None:
    rig.fake.controls.reject_rate = 1.0
    await seed(db, 1)
    term = FakeTerm(1)
    task = asyncio.create_task(Dispatcher(db, rig.provider, config(max_attempts=10)).lead(term))
    try:
        async def refused_once() -> bool:
            return any(a.state == "not_created" for a in await attempts(db))

        await eventually(refused_once)
        assert rig.fake.calls == {}
        rig.fake.controls.reject_rate = 0.0

        async def sent() -> bool:
            return (await rows(db))[0].status == "sent"

        await eventually(sent)
    finally:
        term.ended.set()
        await asyncio.wait_for(task, 10)
    assert len(rig.fake.calls) == 1
    (row,) = await rows(db)
    assert row.attempts >= 2 and row.last_error is None


class BreaksOnce:
    """A real provider's adapter, whose first create raises what no adapter should (a bug, a lost
    database connection mid-way): the reminder must not wait for the stale-claim sweep."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.dedupes_creation, self.broken = inner, inner.name, False, False

    async def create_call(self, spec, *, may_send=None):
        if not self.broken:
            self.broken = True
            raise RuntimeError("broken mid-way")
        return await self.inner.create_call(spec, may_send=may_send)

    async def live_calls(self, to: str):
        return await self.inner.live_calls(to)

    async def cancel(self, call_id: str) -> bool:
        return await self.inner.cancel(call_id)

    async def aclose(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # the rest (Telnyx: its speech commands) as the adapter has it
        return getattr(self.inner, name)


async def test_a_failure_mid_call_is_looked_at_again_not_left_dispatching(db: Database, rig: Rig) -> None:
    await seed(db, 1)

    async def answered() -> bool:
        (row,) = await rows(db)
        return row.status == "sent" and row.outcome == "answered"

    provider = BreaksOnce(rig.provider)
    # stale_claim_after is two minutes: only the dispatcher's own recovery can finish within the deadline
    await lead_until(Dispatcher(db, provider, config(reconcile_grace=timedelta(seconds=1))), FakeTerm(1), answered)
    assert provider.broken and len(rig.fake.calls) == 1
    # the broken attempt: no event and no live call after the grace, so judged never made
    assert sorted(a.state for a in await attempts(db)) == ["created", "not_created"]


async def test_the_api_shows_outcome_and_answered_at(database_url: str, etcd_endpoint: str) -> None:
    from sqlalchemy import update

    from tests.support.appclient import make_settings, running_app

    async with running_app(make_settings(database_url, etcd_endpoint)) as api:
        starts = datetime.now(UTC) + timedelta(days=30)
        body = {"customer_name": "Ann", "phone": "+14155552671", "starts_at": starts.isoformat(),
                "remind_at": [(starts - timedelta(hours=1)).isoformat()]}
        created = (await api.post("/appointments", json=body)).json()
        (reminder,) = created["reminders"]
        assert (reminder["outcome"], reminder["answered_at"]) == (None, None)
        async with api.app.state.db.session() as session:
            await session.execute(update(Reminder).where(Reminder.id == reminder["id"]).values(
                outcome="answered", answered_at=datetime(2030, 1, 1, 9, 0, 5, tzinfo=UTC)))
            await session.commit()
        (reminder,) = (await api.get(f"/appointments/{created['id']}")).json()["reminders"]
        assert reminder["outcome"] == "answered" and reminder["answered_at"].startswith("2030-01-01T09:00:05")
        schema = api.app.openapi()["components"]["schemas"]  # the document, served or not (API_DOCS)
        assert "answered" in str(schema["ReminderOut"]["properties"]["outcome"])


PROVIDER_CLASSES = {"twilio": TwilioProvider, "telnyx": TelnyxProvider}
# a webhook request of each mode, unsigned
WEBHOOKS: dict[str, tuple[str, dict[str, Any]]] = {
    "twilio": ("/telephony/twilio/voice?r=a&a=b", {"data": {"CallSid": "CA1"}}),
    "telnyx": ("/telephony/telnyx/events", {"content": b"{}"}),
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_provider_follows_the_setting(provider: str) -> None:
    assert isinstance(provider_for(Settings()), GenericProvider)
    assert isinstance(provider_for(provider_settings(provider)), PROVIDER_CLASSES[provider])


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_app_serves_signed_webhooks_only_in_its_mode(provider: str) -> None:
    path, request = WEBHOOKS[provider]
    generic, mode = create_app(Settings()), create_app(provider_settings(provider))
    for app, expected in ((generic, 404), (mode, 403)):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://replica") as client:
            assert (await client.post(path, **request)).status_code == expected
            if app is mode:  # not part of the API's document (served or not: API_DOCS)
                assert path.partition("?")[0] not in json.dumps(app.openapi())


MISSING = {"twilio": "PUBLIC_URL, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN",
           "telnyx": "PUBLIC_URL, TELNYX_API_KEY, TELNYX_CONNECTION_ID, TELNYX_PUBLIC_KEY"}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_real_provider_mode_needs_its_settings(provider: str) -> None:
    with pytest.raises(ValueError, match=MISSING[provider]):
        check(Settings(telephony_provider=provider))
    with pytest.raises(ValueError, match="public_url"):
        provider_settings(provider, public_url="https://x.test/?a=1")
    grace = provider_settings(provider, calls_per_second="1", dispatch_concurrency="50").effective_reconcile_grace
    assert grace == timedelta(seconds=100)
    assert provider_settings(provider, reconcile_grace="90s").effective_reconcile_grace == timedelta(seconds=90)
    assert Settings().telephony_provider == "generic"


@pytest.mark.parametrize(
    ("provider", "overrides", "variable"),
    [("twilio", {"twilio_api_url": "http://twilio.internal"}, "TWILIO_API_URL"),
     ("twilio", {"public_url": "http://reminders.example.com/edge"}, "PUBLIC_URL"),
     ("telnyx", {"telnyx_api_url": "http://telnyx.internal"}, "TELNYX_API_URL"),
     ("telnyx", {"public_url": "http://reminders.example.com/edge"}, "PUBLIC_URL")],
)
def test_no_secret_or_personal_data_over_plain_remote_http(provider: str, overrides: dict[str, str],
                                                           variable: str) -> None:
    with pytest.raises(ValueError, match=variable):
        provider_settings(provider, **overrides)
    assert provider_settings(provider, **overrides, allow_insecure_transport="true")
    loopback = {name: value.replace("twilio.internal", "127.0.0.1").replace("telnyx.internal", "127.0.0.1")
                .replace("reminders.example.com", "localhost") for name, value in overrides.items()}
    assert provider_settings(provider, **loopback)
