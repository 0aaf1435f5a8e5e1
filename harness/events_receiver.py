"""A receiver of the service's events (EVENTS_URL) that verifies each delivery as the Standard
Webhooks specification says, with the `standardwebhooks` library, and can misbehave on request:
answer another status, hang, or be down.

    python -m harness.events_receiver --port 8099 --secret whsec_…   # prints each event it gets

Tests drive `Receiver` in their own event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["Delivery", "Receiver"]


@dataclass(frozen=True)
class Delivery:
    """One verified delivery, in the order it arrived."""

    id: str  # webhook-id
    event: dict[str, Any]  # the body, parsed
    status: int  # what the receiver answered


@dataclass
class Receiver:
    """An HTTP receiver on 127.0.0.1:`port`: `status` is what it answers, after `hang` seconds."""

    secret: str
    port: int
    status: int = 200
    hang: float = 0.0
    deliveries: list[Delivery] = field(default_factory=list)  # answered (after any hang)
    arrivals: list[str] = field(default_factory=list)  # webhook-ids as requests arrive, verified
    refused: int = 0  # requests whose signature did not verify (answered 401)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/reminders"

    async def start(self) -> None:
        """Listen (again, after `stop`: a receiver that was down and is back)."""
        app = web.Application()
        app.router.add_post("/hooks/reminders", self._receive)
        # a request still hanging when it stops is cut after half a second (a receiver that goes down)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Down: connections are refused until `start`."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def ids(self, status: int = 200) -> list[str]:
        """The ids delivered with `status`, in arrival order."""
        return [d.id for d in self.deliveries if d.status == status]

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.refused += 1
            return web.Response(status=401)
        self.arrivals.append(request.headers["webhook-id"])
        status = self.status
        if self.hang:
            await asyncio.sleep(self.hang)  # a slow receiver: the sender's timeout decides
        self.deliveries.append(Delivery(request.headers["webhook-id"], event, status))
        return web.Response(status=status)


async def _serve(port: int, secret: str) -> None:
    receiver = Receiver(secret, port)
    await receiver.start()
    print(f"receiving events on {receiver.url}", flush=True)
    seen = 0
    while True:
        await asyncio.sleep(0.5)
        for delivery in receiver.deliveries[seen:]:
            print(json.dumps(delivery.event), flush=True)
        seen = len(receiver.deliveries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--secret", required=True, help="EVENTS_SECRET, whsec_…")
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.secret))


if __name__ == "__main__":
    main()
