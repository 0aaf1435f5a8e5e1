"""An in-process Telnyx rig for tests: the Telnyx-shaped fake, the events route on a real database,
and a proxy transport that strips a path prefix (PUBLIC_URL carries it)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from reminders_fakes.telnyx import TEST_PUBLIC_KEY, FakeTelnyx
from service.db import Database
from service.providers.telnyx.rest import TelnyxProvider
from service.providers.telnyx.signature import TelnyxSignature
from service.providers.telnyx.webhooks import router as telnyx_router
from service.reminders import MessageTemplates, NoAnswerPolicy
from tests.support.twilio_rig import FROM, StripPrefix

KEY = "rig-telnyx-key"
CONNECTION = "1494404757140276705"
PUBLIC = "https://reminders.example.test/edge"
API = "https://api.telnyx.test"

__all__ = ["API", "CONNECTION", "FROM", "KEY", "PUBLIC", "TelnyxRig", "make_telnyx_rig"]


@dataclass
class TelnyxRig:
    db: Database
    fake: FakeTelnyx
    provider: TelnyxProvider
    app: FastAPI

    def client(self) -> httpx.AsyncClient:
        """Straight to the service app (no proxy): requests arrive as after the ingress."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url="http://replica")

    async def aclose(self) -> None:
        await self.fake.aclose()
        await self.provider.aclose()


def make_telnyx_rig(db: Database, *, calls_per_second: float = 0.0, ring_ms: float = 30.0,
                    speak_ms: float = 30.0, machine_detection: bool = False, no_answer: NoAnswerPolicy | None = None,
                    templates: MessageTemplates | None = None) -> TelnyxRig:
    """`machine_detection`: Dials ask for it (the greeting waits for its event); `no_answer`: the
    retry policy of the events route (None: no retries); `templates`: for reminders without wording."""
    app = FastAPI()
    app.include_router(telnyx_router)
    fake = FakeTelnyx(api_key=KEY, connection_id=CONNECTION, calls_per_second=calls_per_second, ring_ms=ring_ms,
                      speak_ms=speak_ms, webhook_transport=StripPrefix(httpx.ASGITransport(app), "/edge"))
    provider = TelnyxProvider(api_url=API, api_key=KEY, connection_id=CONNECTION, public_url=PUBLIC,
                              transport=httpx.ASGITransport(fake.app), machine_detection=machine_detection)
    app.state.db, app.state.telnyx_signature, app.state.provider = db, TelnyxSignature(TEST_PUBLIC_KEY), provider
    app.state.no_answer_policy, app.state.templates = no_answer, templates
    return TelnyxRig(db=db, fake=fake, provider=provider, app=app)
