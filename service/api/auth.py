"""Bearer tokens for the appointments API: several accepted at once (rotation), checked in
constant time, and checked before anything reads the request body."""

from __future__ import annotations

import hmac
import json
from typing import Any

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["BearerAuthMiddleware", "api_tokens", "document_bearer_auth", "token_accepted"]

_SCHEME_NAME = "HTTPBearer"
_SCHEME = {"type": "http", "description": "Required when API_TOKEN is set.", "scheme": "bearer"}


def api_tokens(secret: SecretStr | None) -> tuple[bytes, ...]:
    """The accepted tokens of API_TOKEN (comma-separated); empty when auth is off."""
    if secret is None:
        return ()
    return tuple(part.strip().encode() for part in secret.get_secret_value().split(",") if part.strip())


def token_accepted(given: bytes, tokens: tuple[bytes, ...]) -> bool:
    """True when `given` is one of `tokens`. Every token is compared, each in constant time, so the
    answer's timing tells neither which token nor how much of one matched."""
    accepted = False
    for token in tokens:
        accepted |= hmac.compare_digest(given, token)
    return accepted


def _bearer(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            return credentials.strip() if scheme.lower() == b"bearer" else b""
    return b""


class BearerAuthMiddleware:
    """401 for a request under one of `prefixes` without an accepted bearer token, before the body
    is read: an unauthenticated client cannot make the replica read (or wait for) a body."""

    def __init__(self, app: ASGIApp, *, tokens: tuple[bytes, ...], prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.tokens = tokens
        self.prefixes = prefixes

    def _guarded(self, path: str) -> bool:
        return any(path == prefix or path.startswith(prefix + "/") for prefix in self.prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens or not self._guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        if token_accepted(_bearer(scope), self.tokens):
            await self.app(scope, receive, send)
            return
        payload = json.dumps({"detail": "missing or invalid bearer token"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"www-authenticate", b"Bearer"),
                    # the body was not read: the connection cannot be reused for another request
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def document_bearer_auth(schema: dict[str, Any], *, enforced: bool, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """`schema` (an OpenAPI document) saying what the middleware enforces: a bearer requirement on
    every operation under `prefixes` when tokens are set; none, and no 401 answer, when not.

    Written into the document rather than declared as a route dependency, which FastAPI would solve
    on every request for a check the middleware has already made (docs/decisions/0162)."""
    for path, operations in schema.get("paths", {}).items():
        if not any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes):
            continue
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            if enforced:
                operation["security"] = [{_SCHEME_NAME: []}]
            else:
                operation.get("responses", {}).pop("401", None)
    if enforced:
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[_SCHEME_NAME] = dict(_SCHEME)
    return schema
