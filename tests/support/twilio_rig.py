"""An in-process Twilio rig for tests: the Twilio-shaped fake, the webhook routes on a real
database, and a proxy transport that strips a path prefix (PUBLIC_URL carries it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from fastapi import FastAPI

from reminders_fakes.twilio import FakeTwilio
from service.db import Appointment, CallAttempt, Database, Reminder
from service.db.models import new_id
from service.providers.twilio.rest import TwilioProvider
from service.providers.twilio.signature import TwilioSignature
from service.providers.twilio.webhooks import router as twilio_router
from service.reminders import MessageTemplates, NoAnswerPolicy
from service.telephony.provider import CallSpec

SID = "AC" + "2" * 32
TOKEN = "rig-auth-token"
PUBLIC = "https://reminders.example.test/edge"
API = "https://api.twilio.test"
FROM = "+15550000000"


class StripPrefix(httpx.AsyncBaseTransport):
    """What an ingress does: serve PUBLIC_URL's path prefix by stripping it before the app."""

    def __init__(self, inner: httpx.AsyncBaseTransport, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode()
        assert path.startswith(self.prefix), path
        request.url = request.url.copy_with(raw_path=path[len(self.prefix):].encode() or b"/")
        return await self.inner.handle_async_request(request)


@dataclass
class Rig:
    db: Database
    fake: FakeTwilio
    provider: TwilioProvider
    app: FastAPI
    signature: TwilioSignature

    def client(self) -> httpx.AsyncClient:
        """Straight to the service app (no proxy): requests arrive as after the ingress."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url="http://replica")

    async def aclose(self) -> None:
        await self.fake.aclose()
        await self.provider.aclose()

    async def seed(self, phone: str = "+14155552671", *, attempts: int = 1, status: str = "sent") -> tuple[str, list[str]]:
        """One appointment, one reminder, `attempts` call attempts in state creating. Returns ids."""
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

    async def place(self, reminder_id: str, attempt_id: str, phone: str = "+14155552671") -> str:
        """Create the call at the fake, as the dispatcher would, and record its sid on the attempt."""
        result = await self.provider.create_call(
            CallSpec(to=phone, from_=FROM, reminder_id=reminder_id, appointment_id="-", attempt_id=attempt_id)
        )
        assert result.call_id, result
        from sqlalchemy import update

        async with self.db.session() as session:
            await session.execute(update(CallAttempt).where(CallAttempt.id == attempt_id, CallAttempt.provider_call_id.is_(None))
                                  .values(provider_call_id=result.call_id, state="created"))
            await session.commit()
        return result.call_id


def make_rig(db: Database, *, calls_per_second: float = 0.0, ring_ms: float = 50.0,
             no_answer: NoAnswerPolicy | None = None, templates: MessageTemplates | None = None) -> Rig:
    """`no_answer`: the retry policy of the status route (None: no retries); `templates`: for
    reminders seeded without wording."""
    app = FastAPI()
    app.include_router(twilio_router)
    signature = TwilioSignature(TOKEN, PUBLIC)
    fake = FakeTwilio(account_sid=SID, auth_token=TOKEN, calls_per_second=calls_per_second, ring_ms=ring_ms,
                      webhook_transport=StripPrefix(httpx.ASGITransport(app), "/edge"))
    provider = TwilioProvider(api_url=API, account_sid=SID, auth_token=TOKEN, public_url=PUBLIC,
                              transport=httpx.ASGITransport(fake.app), machine_detection=True)
    app.state.db, app.state.twilio_signature, app.state.provider = db, signature, provider
    app.state.no_answer_policy, app.state.templates = no_answer, templates
    return Rig(db=db, fake=fake, provider=provider, app=app, signature=signature)
