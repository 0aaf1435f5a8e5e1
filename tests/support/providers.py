"""Twilio and Telnyx side by side, for the tests that check one behaviour in both real-provider
modes: such a test is parametrized by `provider` (one of `PROVIDERS`) and speaks through the
adapters here. What only one provider does (TwiML, signature formats, Telnyx's commands and
sweep) stays in that provider's own tests, which use the same rigs.

In process, `make_rig(db, provider)`: the provider's fake, its webhook routes on a real database
and a transport that strips PUBLIC_URL's path prefix before the app, as an ingress does. A rig
seeds reminders, places calls as the dispatcher would, sends call-state webhooks, and tells of the
fake's calls in the same words whatever the provider (`is_over`, `machine_answered`,
`hung_up_silently`, `languages`, …).

Over real processes, `CLUSTER_MODES[provider]`: a `harness.cluster.Cluster`'s options in that
mode, the fake's status for a create that made a call, and webhooks a forger could send through
the ingress.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import urlencode

import httpx
from fastapi import FastAPI
from sqlalchemy import update

from reminders_fakes.telnyx import TEST_PUBLIC_KEY, TEST_SIGNING_SEED, FakeTelnyx, sign
from reminders_fakes.twilio import FakeTwilio
from service.components import check
from service.config import Settings
from service.db import Appointment, CallAttempt, Database, Reminder
from service.db.models import new_id
from service.providers.telnyx.rest import TelnyxProvider
from service.providers.telnyx.signature import TelnyxSignature
from service.providers.telnyx.webhooks import router as telnyx_router
from service.providers.twilio.rest import TwilioProvider
from service.providers.twilio.signature import TwilioSignature
from service.providers.twilio.webhooks import router as twilio_router
from service.reminders import MessageTemplates, NoAnswerPolicy
from service.reminders.outcomes import FINAL_CALL_STATES
from service.telephony.provider import CallSpec, Stamp

__all__ = [
    "CLUSTER_MODES", "FROM", "PHONE", "PROVIDERS", "PUBLIC", "ClusterMode", "Rig", "StripPrefix", "TelnyxRig",
    "TwilioRig", "make_rig", "provider_settings", "rig_on",
]

PROVIDERS = ("twilio", "telnyx")
PUBLIC = "https://reminders.example.test/edge"
FROM = "+15550000000"
PHONE = "+14155552671"


class StripPrefix(httpx.AsyncBaseTransport):
    """What an ingress does: serve PUBLIC_URL's path prefix by stripping it before the app."""

    def __init__(self, inner: httpx.AsyncBaseTransport, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode()
        assert path.startswith(self.prefix), path
        request.url = request.url.copy_with(raw_path=path[len(self.prefix):].encode() or b"/")
        return await self.inner.handle_async_request(request)


class Rig:
    """One provider's fake and webhook routes on `db`, in process. Subclasses say how that
    provider's calls read and how its webhooks are sent."""

    name: ClassVar[str]

    def __init__(self, db: Database, fake: Any, provider: Any, app: FastAPI) -> None:
        self.db, self.fake, self.provider, self.app = db, fake, provider, app
        self.epoch = datetime.now(UTC)  # order 0 of `post_state`'s events

    def client(self) -> httpx.AsyncClient:
        """Straight to the service app (no proxy): requests arrive as after the ingress."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url="http://replica")

    async def aclose(self) -> None:
        await self.fake.aclose()
        await self.provider.aclose()

    async def seed(self, phone: str = PHONE, *, attempts: int = 1, status: str = "sent") -> tuple[str, list[str]]:
        """One appointment, one reminder (no stored wording: the webhooks render it), `attempts`
        call attempts in state creating. Returns (reminder id, attempt ids)."""
        now = datetime.now(UTC)
        reminder_id, attempt_ids = new_id(), [new_id() for _ in range(attempts)]
        async with self.db.session() as session:
            appointment = Appointment(id=new_id(), customer_name="Ann Example", phone=phone,
                                      starts_at=now + timedelta(hours=2), timezone="UTC", status="scheduled")
            appointment.reminders = [Reminder(id=reminder_id, due_at=now, next_attempt_at=now, status=status,
                                              attempts=0, idempotency_key=f"reminder-{reminder_id}")]
            session.add(appointment)
            await session.flush()
            for attempt_id in attempt_ids:
                session.add(CallAttempt(id=attempt_id, reminder_id=reminder_id, fencing_token=1, state="creating"))
            await session.commit()
        return reminder_id, attempt_ids

    async def place(self, reminder_id: str, attempt_id: str, phone: str = PHONE, *, record: bool = True) -> str:
        """Create the call at the fake, as the dispatcher would; with `record`, also write its id
        on the attempt (`created`), as the dispatcher does once the create answers. Returns the id."""
        result = await self.provider.create_call(
            CallSpec(to=phone, from_=FROM, reminder_id=reminder_id, appointment_id="-", attempt_id=attempt_id)
        )
        assert result.call_id, result
        if record:
            async with self.db.session() as session:
                await session.execute(update(CallAttempt)
                                      .where(CallAttempt.id == attempt_id, CallAttempt.provider_call_id.is_(None))
                                      .values(provider_call_id=result.call_id, state="created"))
                await session.commit()
        return result.call_id

    # -- the fake's calls, in the same words for both providers ----------------------------------

    def call(self, call_id: str) -> Any:
        return self.fake.calls[call_id]

    def calls(self) -> list[Any]:
        """Every call, in the order they were created."""
        return sorted(self.fake.calls.values(), key=self.created_at)

    def calls_to(self, phone: str) -> list[Any]:
        return [call for call in self.calls() if call.to == phone]

    def over(self, *call_ids: str) -> Callable[[], Awaitable[bool]]:
        """A check: the calls named (every call, when none is) are over."""

        async def check_over() -> bool:
            calls = [self.call(c) for c in call_ids] if call_ids else self.calls()
            return all(self.is_over(call) for call in calls)

        return check_over

    def phone_over(self, phone: str, count: int = 1) -> Callable[[], Awaitable[bool]]:
        """A check: at least `count` calls to `phone`, all over."""

        async def check_over() -> bool:
            found = self.calls_to(phone)
            return len(found) >= count and all(self.is_over(call) for call in found)

        return check_over

    @staticmethod
    def call_id(call: Any) -> str:
        raise NotImplementedError

    @staticmethod
    def created_at(call: Any) -> datetime:
        raise NotImplementedError

    def is_over(self, call: Any) -> bool:
        """Ended, and (where the fake sends them in order) every event of it delivered."""
        raise NotImplementedError

    def reminder_of(self, call: Any) -> str | None:
        """The reminder id in the call's stamp."""
        raise NotImplementedError

    @staticmethod
    def retry_not_before(call: Any) -> datetime:
        """The earliest a no-answer retry may be created after `call`, less the retry delay."""
        raise NotImplementedError

    @staticmethod
    def machine_answered(call: Any) -> bool:
        """The provider told the service a machine answered."""
        raise NotImplementedError

    @staticmethod
    def asked_for_digits(call: Any) -> bool:
        """The service asked the callee for a key on this call."""
        raise NotImplementedError

    @staticmethod
    def hung_up_silently(call: Any) -> bool:
        """Nothing was said on the call, and the service ended it (or it never got that far)."""
        raise NotImplementedError

    @staticmethod
    def languages(call: Any) -> set[str]:
        """The languages the service asked the provider to speak in on this call."""
        raise NotImplementedError

    def ring(self, from_: str, *, attestation: str | None = "A", digits: str | list[str] | None = None) -> Any:
        """A person at `from_` calls the service's number (a call-back), with the STIR/SHAKEN
        `attestation` (A, B, C, failed, none), pressing `digits` when asked. The fake's call."""
        raise NotImplementedError

    @staticmethod
    def heard(call: Any) -> list[str]:
        """Everything spoken into the call, in order."""
        return list(call.heard)

    async def post_state(self, client: httpx.AsyncClient, reminder_id: str, attempt_id: str, call_id: str,
                         status: str, order: int) -> int:
        """Send the signed webhook by which the provider tells that the call is in `status` (the
        domain's call states: initiated, in-progress, busy, no-answer, completed), ordered as
        `order` (Twilio's SequenceNumber; Telnyx: `order` seconds after `epoch`). Returns the order
        the service stores (`last_sequence`)."""
        raise NotImplementedError


class TwilioRig(Rig):
    name = "twilio"
    SID = "AC" + "2" * 32
    TOKEN = "rig-auth-token"
    API = "https://api.twilio.test"

    def __init__(self, db: Database, fake: FakeTwilio, provider: TwilioProvider, app: FastAPI,
                 signature: TwilioSignature) -> None:
        super().__init__(db, fake, provider, app)
        self.signature = signature

    @classmethod
    def build(cls, db: Database, *, calls_per_second: float = 0.0, ring_ms: float = 50.0,
              machine_detection: bool = True, no_answer: NoAnswerPolicy | None = None,
              templates: MessageTemplates | None = None) -> TwilioRig:
        app = FastAPI()
        twilio_router.install(app)
        signature = TwilioSignature(cls.TOKEN, PUBLIC)
        fake = FakeTwilio(account_sid=cls.SID, auth_token=cls.TOKEN, calls_per_second=calls_per_second,
                          ring_ms=ring_ms, webhook_transport=StripPrefix(httpx.ASGITransport(app), "/edge"))
        provider = TwilioProvider(api_url=cls.API, account_sid=cls.SID, auth_token=cls.TOKEN, public_url=PUBLIC,
                                  transport=httpx.ASGITransport(fake.app), machine_detection=machine_detection)
        app.state.db, app.state.twilio_signature, app.state.provider = db, signature, provider
        app.state.no_answer_policy, app.state.templates = no_answer, templates
        return cls(db, fake, provider, app, signature)

    def signed_post(self, route: str, query: dict[str, str], form: dict[str, str]) -> tuple[str, dict, dict]:
        """(path, form, headers) of a webhook to /telephony/twilio/`route`, signed as Twilio signs
        it: for PUBLIC_URL + path + query."""
        path = f"/telephony/twilio/{route}" + (f"?{urlencode(query)}" if query else "")
        return path, form, {"X-Twilio-Signature": self.signature.sign(PUBLIC + path, form)}

    @staticmethod
    def call_id(call: Any) -> str:
        return call.sid

    def ring(self, from_: str, *, attestation: str | None = "A", digits: str | list[str] | None = None) -> Any:
        return self.fake.ring_service(from_=from_, to=FROM, url=f"{PUBLIC}/telephony/twilio/incoming",
                                      attestation=attestation, digits=digits)

    @staticmethod
    def created_at(call: Any) -> datetime:
        return call.date_created

    def is_over(self, call: Any) -> bool:
        return call.status in FINAL_CALL_STATES

    def reminder_of(self, call: Any) -> str | None:
        return call.inspect(self.SID)["stamp"].get("r")

    @staticmethod
    def retry_not_before(call: Any) -> datetime:
        return call.end_time - timedelta(milliseconds=50)  # the retry time is reckoned on a seconds-truncated clock

    @staticmethod
    def machine_answered(call: Any) -> bool:
        return str(call.answered_by).startswith("machine")  # machine_end_*: after its greeting

    @staticmethod
    def asked_for_digits(call: Any) -> bool:
        return any("<Gather" in twiml for twiml in call.twiml)

    @staticmethod
    def hung_up_silently(call: Any) -> bool:
        return call.heard == [] and (not call.twiml or call.twiml[-1].endswith("<Response><Hangup /></Response>"))

    @staticmethod
    def languages(call: Any) -> set[str]:
        return {language for twiml in call.twiml for language in re.findall(r'<Say language="([^"]+)">', twiml)}

    async def post_state(self, client: httpx.AsyncClient, reminder_id: str, attempt_id: str, call_id: str,
                         status: str, order: int) -> int:
        path, form, headers = self.signed_post("status", {"r": reminder_id, "a": attempt_id},
                                               {"CallSid": call_id, "CallStatus": status, "SequenceNumber": str(order)})
        assert (await client.post(path, data=form, headers=headers)).status_code == 204
        return order


class TelnyxRig(Rig):
    name = "telnyx"
    KEY = "rig-telnyx-key"
    CONNECTION = "1494404757140276705"
    API = "https://api.telnyx.test"
    # the domain's call states as Telnyx tells them: an event, and for a hangup its cause
    EVENTS: ClassVar[dict[str, tuple[str, dict[str, str]]]] = {
        "initiated": ("call.initiated", {}), "in-progress": ("call.answered", {}),
        "busy": ("call.hangup", {"hangup_cause": "user_busy"}),
        "no-answer": ("call.hangup", {"hangup_cause": "timeout"}),
        "completed": ("call.hangup", {"hangup_cause": "normal_clearing"}),
    }

    @classmethod
    def build(cls, db: Database, *, calls_per_second: float = 0.0, ring_ms: float = 30.0, speak_ms: float = 30.0,
              machine_detection: bool = False, no_answer: NoAnswerPolicy | None = None,
              templates: MessageTemplates | None = None) -> TelnyxRig:
        """`machine_detection`: Dials ask for it (the greeting then waits for its event)."""
        app = FastAPI()
        telnyx_router.install(app)
        fake = FakeTelnyx(api_key=cls.KEY, connection_id=cls.CONNECTION, calls_per_second=calls_per_second,
                          ring_ms=ring_ms, speak_ms=speak_ms,
                          webhook_transport=StripPrefix(httpx.ASGITransport(app), "/edge"))
        provider = TelnyxProvider(api_url=cls.API, api_key=cls.KEY, connection_id=cls.CONNECTION, public_url=PUBLIC,
                                  transport=httpx.ASGITransport(fake.app), machine_detection=machine_detection)
        app.state.db, app.state.telnyx_signature, app.state.provider = db, TelnyxSignature(TEST_PUBLIC_KEY), provider
        app.state.telnyx_connection_id = cls.CONNECTION  # the fake's events name it, as Telnyx's do
        app.state.no_answer_policy, app.state.templates = no_answer, templates
        return cls(db, fake, provider, app)

    @staticmethod
    def signed(body: bytes, seed: bytes = TEST_SIGNING_SEED, at: int | None = None) -> dict[str, str]:
        """Headers signing `body` as Telnyx does (the fake's key pair by default), at `at` (now)."""
        timestamp = str(int(time.time()) if at is None else at)
        return {"content-type": "application/json", "telnyx-timestamp": timestamp,
                "telnyx-signature-ed25519": sign(seed, timestamp, body)}

    @staticmethod
    def call_id(call: Any) -> str:
        return call.call_id

    def ring(self, from_: str, *, attestation: str | None = "A", digits: str | list[str] | None = None) -> Any:
        return self.fake.ring_service(from_=from_, to=FROM, url=f"{PUBLIC}/telephony/telnyx/events",
                                      attestation=attestation, digits=digits)

    @staticmethod
    def created_at(call: Any) -> datetime:
        return call.created

    def is_over(self, call: Any) -> bool:
        return not call.alive and call.outbox.empty()

    def reminder_of(self, call: Any) -> str | None:
        return call.inspect()["stamp"].get("r")

    @staticmethod
    def retry_not_before(call: Any) -> datetime:
        return call.created  # the fake keeps no end time: its creation comes before it

    @staticmethod
    def machine_answered(call: Any) -> bool:
        return "call.machine.detection.ended" in call.events

    @staticmethod
    def asked_for_digits(call: Any) -> bool:
        return "gather_using_speak" in call.commands

    @staticmethod
    def hung_up_silently(call: Any) -> bool:
        return call.heard == [] and "hangup" in call.commands and "speak" not in call.commands

    @staticmethod
    def languages(call: Any) -> set[str]:
        return set(call.languages)

    async def post_state(self, client: httpx.AsyncClient, reminder_id: str, attempt_id: str, call_id: str,
                         status: str, order: int) -> int:
        event_type, payload = self.EVENTS[status]
        occurred = self.epoch + timedelta(seconds=order)
        payload = {"call_control_id": call_id, "client_state": Stamp(reminder_id, attempt_id).encode(), **payload}
        body = json.dumps({"data": {"record_type": "event", "event_type": event_type, "id": f"{status}-{order}",
                                    "occurred_at": occurred.isoformat(), "payload": payload}}).encode()
        response = await client.post("/telephony/telnyx/events", content=body, headers=self.signed(body))
        assert response.status_code == 200
        return int(occurred.timestamp() * 1_000_000)


RIGS: dict[str, type[TwilioRig] | type[TelnyxRig]] = {"twilio": TwilioRig, "telnyx": TelnyxRig}


def make_rig(db: Database, provider: str = "twilio", **options: Any) -> Rig:
    """The in-process rig of `provider` on `db`. `options`: the fake's (`calls_per_second`,
    `ring_ms`; Telnyx: `speak_ms`), `machine_detection` (Twilio: on; Telnyx: off unless asked),
    `no_answer` (the webhooks' retry policy; None: no retries) and `templates` (for reminders
    seeded without wording)."""
    return RIGS[provider].build(db, **options)


@asynccontextmanager
async def rig_on(db: Database, provider: str = "twilio", **options: Any) -> AsyncIterator[Any]:
    """`make_rig(db, provider, **options)`, closed on the way out."""
    rig = make_rig(db, provider, **options)
    try:
        yield rig
    finally:
        await rig.aclose()


_SETTINGS = {
    "twilio": {"twilio_account_sid": "AC" + "9" * 32, "twilio_auth_token": "token"},
    "telnyx": {"telnyx_api_key": "KEY", "telnyx_connection_id": "1494404757140276705"},
}


def provider_settings(provider: str, **overrides: str) -> Settings:
    """Settings of `provider`'s mode with every setting it needs (Telnyx: an account's own public
    key, `account_public_key()`), checked as `reminders serve` and create_app check them."""
    values = {"telephony_provider": provider, "public_url": "https://reminders.example.test/edge",
              "allow_open_api": "true", "allowed_countries": "*", **_SETTINGS[provider]}
    if provider == "telnyx":
        values["telnyx_public_key"] = account_public_key()
    values.update(overrides)
    settings = Settings(**values)
    check(settings)
    return settings


def account_public_key() -> str:
    """A Telnyx account's own public key (the fake's is refused unless TELNYX_API_URL is loopback)."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    return base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


# -- over real processes --------------------------------------------------------------------------


def _forged_twilio(reminder_id: str, attempt_id: str) -> list[tuple[str, dict[str, Any]]]:
    query = urlencode({"r": reminder_id, "a": attempt_id})
    form = {"CallSid": "CA" + "0" * 32, "CallStatus": "in-progress", "SequenceNumber": "99"}
    forged = {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}  # "not a signature"
    return [(f"/telephony/twilio/{route}?{query}", {"data": form, "headers": forged})
            for route in ("voice", "status", "gather")]


def _forged_telnyx(reminder_id: str, attempt_id: str) -> list[tuple[str, dict[str, Any]]]:
    body = json.dumps({"data": {"event_type": "call.answered", "id": "forged", "occurred_at": "2026-11-30T12:00:00Z",
                                "payload": {"call_control_id": "v3:forged",
                                            "client_state": Stamp(reminder_id, attempt_id).encode()}}}).encode()
    now = int(time.time())
    # signed with another key; signed with the fake's key, but 10 minutes ago (a replay)
    return [("/telephony/telnyx/events", {"content": body, "headers": TelnyxRig.signed(body, seed, at)})
            for seed, at in ((bytes(32), now), (TEST_SIGNING_SEED, now - 600))]


@dataclass(frozen=True)
class ClusterMode:
    """A real provider's mode over real processes."""

    provider: str
    created: int  # the fake's status for a create that made a call
    forged: Callable[[str, str], list[tuple[str, dict[str, Any]]]]  # (reminder, attempt) -> (path, request)
    options: dict[str, Any] = field(default_factory=dict)  # Cluster(...) options of this mode

    def cluster_options(self, env: dict[str, str]) -> dict[str, Any]:
        """Options for `Cluster(...)`: this mode's, with `env` under its own."""
        return {**self.options, "telephony_provider": self.provider,
                "env": {**env, **self.options.get("env", {})}}


CLUSTER_MODES = {
    # calls queued by the fake's CPS
    "twilio": ClusterMode("twilio", 201, _forged_twilio, {"fake_calls_per_second": 5, "fake_ring_ms": 200}),
    # Dials over the fake's rate refused with 429 90103: retried
    "telnyx": ClusterMode("telnyx", 200, _forged_telnyx, {"fake_calls_per_second": 8, "fake_ring_ms": 200,
                                                          "env": {"DISPATCH_MAX_ATTEMPTS": "30"}}),
}
