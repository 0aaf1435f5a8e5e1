"""A provider's webhook routes: Starlette routes under one Mount at WEBHOOK_PREFIX, installed
ahead of the API's routers (docs/decisions/0262).

FastAPI matches a request against its routes one by one: a webhook, listed after the whole API,
was matched against every API route first. Under the Mount an API request pays one prefix check,
a webhook a handful. The handlers take the `Request` (and a `BackgroundTasks`, run after the
response is sent) and parse their bodies themselves; they have no dependencies, no schema (they
are not in the OpenAPI document) and return a `Response`. The app's exception handlers and middlewares apply as to any
route: an `HTTPException` raised in a handler is answered as the API's are.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.background import BackgroundTasks
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router

from service.telephony.webhook import WEBHOOK_PREFIX

__all__ = ["WebhookRoutes"]

Handler = Callable[..., Awaitable[Response]]


class WebhookRoutes:
    """The POST routes of one provider's webhooks (paths under WEBHOOK_PREFIX)."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def post(self, path: str) -> Callable[[Handler], Handler]:
        """Register `handler(request[, background])` for POSTs to `path` (a full path)."""
        if not path.startswith(WEBHOOK_PREFIX + "/"):
            raise ValueError(f"a webhook's path is under {WEBHOOK_PREFIX}/: {path}")

        def register(handler: Handler) -> Handler:
            self.routes.append(Route(path.removeprefix(WEBHOOK_PREFIX), _endpoint(handler), methods=["POST"],
                                     name=handler.__name__))
            return handler

        return register

    def install(self, app: FastAPI) -> None:
        """Mount the routes on `app`; before the API's routers are included, so that they are
        matched first (an API request: one prefix check)."""
        app.mount(WEBHOOK_PREFIX, Router(routes=self.routes))


def _endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint for `handler`: its BackgroundTasks, if it takes them, run after the response."""
    if len(inspect.signature(handler).parameters) == 1:
        return handler

    async def endpoint(request: Request) -> Response:
        background = BackgroundTasks()
        response: Any = await handler(request, background)
        if background.tasks:
            response.background = background
        return response

    return endpoint
