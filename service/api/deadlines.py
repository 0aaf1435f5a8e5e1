"""Deadlines on requests, by path prefix: on the reading of the body (408) and on the answer (503).

Both are measured from the request's start: the moment the server hands the app a request whose
headers have arrived. A client that trickles its body, or sends none after its headers, holds a
connection and a task no longer than the body deadline; a database that accepts connections and
never answers holds a request no longer than the answer deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["REQUEST_DEADLINE", "Deadline", "DeadlineMiddleware"]

log = logging.getLogger(__name__)

# Seconds an API request (/appointments, /do-not-call) may take before it is answered: a database
# that accepts connections and never answers must not hold clients longer than this.
REQUEST_DEADLINE = 10.0


@dataclass(frozen=True)
class Deadline:
    """Requests under `prefixes`: the whole body must have arrived within `body` seconds of the
    request's start (else 408 and the connection closed), and the answer must have begun within
    `answer` seconds (else 503: the database did not answer in time). None: no such bound."""

    prefixes: tuple[str, ...]
    body: float | None = None
    answer: float | None = None

    def covers(self, path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.prefixes)


class _BodyTooSlow(Exception):
    """Raised from `receive` when the body deadline passes; not a TimeoutError or OSError, which
    the app's handlers would answer as a database failure."""


class DeadlineMiddleware:
    """Applies the first `Deadline` whose prefixes cover the request's path (pure ASGI: the body
    streams through untouched)."""

    def __init__(self, app: ASGIApp, *, deadlines: tuple[Deadline, ...]) -> None:
        self.app = app
        self.deadlines = deadlines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rule = None
        if scope["type"] == "http":
            rule = next((d for d in self.deadlines if d.covers(scope.get("path", ""))), None)
        if rule is None:
            await self.app(scope, receive, send)
            return
        body_by = None if rule.body is None else asyncio.get_running_loop().time() + rule.body
        body_done, body_late, started = not _has_body(scope), False, False

        async def bounded() -> Message:
            nonlocal body_done, body_late
            if body_done or body_by is None:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(body_by):
                        message = await receive()
                except TimeoutError:
                    body_late = True
                    raise _BodyTooSlow from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            async with asyncio.timeout(rule.answer):
                await self.app(scope, bounded, tracked)
        except _BodyTooSlow:
            if started:
                raise
            await _body_too_slow(scope, send, rule.body)
            return
        except TimeoutError:
            if started or rule.answer is None:
                raise
            if not body_done:  # the answer deadline passed while the body was still coming
                await _body_too_slow(scope, send, rule.answer)
                return
            log.warning("%s %s: no answer within %.0f s", scope["method"], scope.get("path", ""), rule.answer)
            await _reply(send, 503, "database unavailable: timed out, try again", retry_after=True)
            return
        if body_late and not started:
            # the app swallowed the timeout (as a body it could not read, say) without answering
            await _body_too_slow(scope, send, rule.body)


def _has_body(scope: Scope) -> bool:
    """Whether the request announced a body (a length other than 0, or chunks)."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


async def _body_too_slow(scope: Scope, send: Send, seconds: float | None) -> None:
    log.info("%s %s: body not received within %g s: 408", scope["method"], scope.get("path", ""), seconds)
    await _reply(send, 408, f"request body not received within {seconds:g} s", close=True)


async def _reply(send: Send, status: int, detail: str, *, close: bool = False, retry_after: bool = False) -> None:
    payload = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:  # the rest of the body may still be coming: the connection cannot serve another request
        headers.append((b"connection", b"close"))
    if retry_after:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
