"""Bearer tokens for the API: several accepted at once (rotation), each with a name the logs record
for every change it makes (`API_TOKEN=booking:secret,ops:other`; a bare secret is named `token-<n>`),
checked in constant time, and checked before anything reads the request body."""

from __future__ import annotations

import hmac
import json
import re
from typing import Any, NamedTuple

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from service.logs import acting

__all__ = ["ApiToken", "BearerAuthMiddleware", "api_tokens", "document_bearer_auth", "token_accepted"]

# `name:secret`: a name of letters, digits, `.`, `_`, `-` before the first colon; anything else is a
# bare secret (which may itself hold a colon)
_NAMED = re.compile(r"([A-Za-z0-9._-]{1,64}):(.+)")


class ApiToken(NamedTuple):
    name: str
    secret: bytes

_SCHEME_NAME = "HTTPBearer"
_SCHEME = {"type": "http", "description": "Required when API_TOKEN is set.", "scheme": "bearer"}


def api_tokens(secret: SecretStr | None) -> tuple[ApiToken, ...]:
    """The accepted tokens of API_TOKEN (comma-separated `name:secret` or bare secrets); empty
    when auth is off."""
    if secret is None:
        return ()
    parts = [part.strip() for part in secret.get_secret_value().split(",") if part.strip()]
    tokens = []
    for number, part in enumerate(parts, 1):
        named = _NAMED.fullmatch(part)
        tokens.append(ApiToken(named[1], named[2].encode()) if named else ApiToken(f"token-{number}", part.encode()))
    return tuple(tokens)


def token_accepted(given: bytes, tokens: tuple[ApiToken, ...]) -> str | None:
    """The name of the token `given` is, or None. Every token is compared, each in constant time,
    so the answer's timing tells neither which token nor how much of one matched."""
    accepted = None
    for token in tokens:
        if hmac.compare_digest(given, token.secret) and accepted is None:
            accepted = token.name
    return accepted


def _bearer(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            return credentials.strip() if scheme.lower() == b"bearer" else b""
    return b""


class BearerAuthMiddleware:
    """401 for a request under one of `prefixes` without an accepted bearer token, before the body
    is read: an unauthenticated client cannot make the replica read (or wait for) a body. An
    accepted one is the request's actor (service.logs.actor)."""

    def __init__(self, app: ASGIApp, *, tokens: tuple[ApiToken, ...], prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.tokens = tokens
        self.prefixes = prefixes

    def _guarded(self, path: str) -> bool:
        return any(path == prefix or path.startswith(prefix + "/") for prefix in self.prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens or not self._guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        name = token_accepted(_bearer(scope), self.tokens)
        if name is not None:
            with acting(name):  # the changes this request makes are logged as this token's
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
