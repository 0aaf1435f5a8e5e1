"""The database's unavailability as HTTP: 503 with a short reason, never a 500 or a hang."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["DATABASE_ERRORS", "REQUEST_DEADLINE", "RequestDeadlineMiddleware", "unavailable_reason"]

log = logging.getLogger(__name__)

# Seconds a request under the guarded prefixes may take before it is answered 503: a database
# that accepts connections and never answers must not hold clients longer than this.
REQUEST_DEADLINE = 10.0


def _driver_errors() -> tuple[type[BaseException], ...]:
    try:
        import asyncpg
    except ImportError:  # SQLite-only install
        return ()
    # Raised unwrapped by SQLAlchemy when connecting: InvalidPasswordError, TooManyConnectionsError…
    return (asyncpg.PostgresError, asyncpg.InterfaceError)


# What reaching the database can raise besides SQLAlchemy's own errors (those are mapped in app.py).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (OSError, *_driver_errors())


def unavailable_reason(error: BaseException) -> str:
    """A short, secret-free reason for a 503."""
    chain = [error, *(e for e in (error.__cause__, error.__context__) if e is not None)]
    for item in chain:
        name = type(item).__name__
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        if isinstance(item, socket.gaierror):
            return "database host not found"
        if isinstance(item, TimeoutError) or "Timeout" in name:
            return "timed out"
        if name in ("InvalidPasswordError", "InvalidAuthorizationSpecificationError"):
            return "authentication failed"
        if name == "TooManyConnectionsError":
            return "too many connections"
    return "not reachable"


class RequestDeadlineMiddleware:
    """503 for a request under `prefixes` not answered within `deadline` seconds."""

    def __init__(self, app: ASGIApp, *, prefixes: tuple[str, ...], deadline: float = REQUEST_DEADLINE) -> None:
        self.app = app
        self.prefixes = prefixes
        self.deadline = deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not any(path == p or path.startswith(p + "/") for p in self.prefixes):
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            async with asyncio.timeout(self.deadline):
                await self.app(scope, receive, tracked)
        except TimeoutError:
            if started:
                raise
            log.warning("%s %s: no answer within %.0f s", scope["method"], path, self.deadline)
            payload = json.dumps({"detail": "database unavailable: timed out, try again"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"retry-after", b"1")],
                }
            )
            await send({"type": "http.response.body", "body": payload})
