"""Request body limits: a size cap (413) and a nesting-depth cap (422), before any parsing."""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimitMiddleware"]

MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32
_LENGTH = re.compile(rb"[0-9]{1,18}")


def _too_deep(body: bytes, limit: int) -> bool:
    """True when brackets nest deeper than `limit` (strings skipped): json.loads would recurse."""
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413 and JSON nested deeper than `max_depth` with 422."""

    def __init__(self, app: ASGIApp, *, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        # ASCII digits only: b"\xb2" reads as `²`, which passes isdigit() and fails int()
        if _LENGTH.fullmatch(declared) and int(declared) > self.max_bytes:
            await _reply(send, 413, f"request body larger than {self.max_bytes} bytes")
            return
        # Read the whole (bounded) body once, then replay it to the app.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _reply(send, 413, f"request body larger than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if _too_deep(body, self.max_depth):
            await _reply(send, 422, f"JSON nested deeper than {self.max_depth} levels", loc=["body"])
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reply(send: Send, status: int, message: str, loc: list[str] | None = None) -> None:
    detail: object = [{"loc": loc, "msg": message, "type": "value_error"}] if loc else message
    payload = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
