"""What `reminders check` asks of a provider package, and the probes the packages share.

Each provider package has a `preflight` module whose `run(settings, transport=None)` returns its
`CheckLine`s: the credentials (an authenticated read that creates nothing), the signature settings
and, for providers with webhooks, PUBLIC_URL's reachability (`public_url_line`). Every request goes
through the REST adapters' transport (`pooled_transport`, answers read capped) under a deadline;
tests hand in another transport. A line never carries a secret: failures name the setting.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from service.config import Settings, loopback
from service.telephony.http import ANSWER_HEADERS, describe_failure, error_text, pooled_transport, send_capped

__all__ = [
    "CheckLine",
    "Preflight",
    "dumps",
    "failed",
    "get",
    "maybe",
    "json_body",
    "owned_transport",
    "passed",
    "public_url_line",
    "skipped",
    "unreachable",
]

# What the webhook routes answer a request without a valid signature (FastAPI's HTTPException).
REFUSAL = {"detail": "invalid signature"}


@dataclass(frozen=True)
class CheckLine:
    """One result of `reminders check`: `name` is what was checked, `setting` the environment
    variable a failure names (None when it passed), `detail` one line for the operator."""

    name: str
    ok: bool
    detail: str
    setting: str | None = None
    skipped: bool = False

    def text(self) -> str:
        if self.skipped:
            return f"skip {self.name}: {self.detail}"
        if self.ok:
            return f"ok   {self.name}: {self.detail}"
        return f"FAIL {self.setting or self.name}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "setting": self.setting, "detail": self.detail}


def passed(name: str, detail: str) -> CheckLine:
    return CheckLine(name, True, detail)


def failed(name: str, setting: str, detail: str) -> CheckLine:
    return CheckLine(name, False, detail, setting)


def skipped(name: str) -> CheckLine:
    return CheckLine(name, True, f"not checked (--skip {name})", skipped=True)


async def maybe(name: str, skip: frozenset[str], check: Coroutine[Any, Any, CheckLine]) -> CheckLine:
    """`check`'s line, or a skipped one (the coroutine closed unrun) when `skip` names it."""
    if name in skip:
        check.close()
        return skipped(name)
    return await check


class Preflight(Protocol):
    """A provider package's `preflight.run`: its lines, through `transport` when given (else one
    of its own); the names in `skip` are not checked."""

    def __call__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None, *,
                 skip: frozenset[str] = frozenset()) -> Awaitable[list[CheckLine]]: ...


@asynccontextmanager
async def owned_transport(transport: httpx.AsyncBaseTransport | None) -> AsyncIterator[httpx.AsyncBaseTransport]:
    """`transport`, or a pooled one of our own, closed on exit."""
    if transport is not None:
        yield transport
        return
    own = pooled_transport(4)
    try:
        yield own
    finally:
        await own.aclose()


async def get(transport: httpx.AsyncBaseTransport, url: str, headers: dict[str, str], timeout: float) -> httpx.Response:
    """One GET, its answer read capped, within `timeout` seconds (httpx.HTTPError, TimeoutError)."""
    request = httpx.Request("GET", url, headers={**ANSWER_HEADERS, "User-Agent": "reminders-check", **headers})
    async with asyncio.timeout(timeout):
        return await send_capped(transport, request)


def json_body(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or {} when it is none."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def unreachable(error: BaseException) -> str:
    """Why a request got no answer, in one short line."""
    if isinstance(error, TimeoutError):
        return "timeout: no answer in time"
    return describe_failure(error)


async def public_url_line(settings: Settings, path: str, transport: httpx.AsyncBaseTransport,
                          timeout: float) -> CheckLine:
    """PUBLIC_URL is https (unless loopback), and a POST to its webhook route without a signature
    arrives at a replica of this service and is refused for it: a 403 with the service's body,
    not a 404 (or anything else) from whatever answers there instead."""
    base = settings.public_url
    assert base is not None
    if not base.startswith("https://") and not loopback(base):
        return failed("public_url", "PUBLIC_URL", f"{base} is not https: the provider must reach the webhooks over "
                                                  "TLS (plain http only on loopback)")
    url = base + path
    request = httpx.Request("POST", url, content=b"", headers={
        **ANSWER_HEADERS, "User-Agent": "reminders-check", "Content-Type": "application/x-www-form-urlencoded",
    })
    try:
        async with asyncio.timeout(timeout):
            response = await send_capped(transport, request)
    except (httpx.HTTPError, TimeoutError) as error:
        return failed("public_url", "PUBLIC_URL", f"POST {url} did not arrive: {unreachable(error)}")
    status = response.status_code
    if status == 403 and json_body(response) == REFUSAL:
        return passed("public_url", f"POST {url} reached a replica, which refused it for its missing signature "
                                    "(403), as it refuses anything not signed by the provider")
    if status == 404:
        return failed("public_url", "PUBLIC_URL", f"POST {url} answered 404: the webhook route is not served there "
                                                  "(the Ingress must send /telephony/ to the reminders Service, "
                                                  "and PUBLIC_URL carry any path prefix the proxy strips)")
    seen = error_text(response.text[:80]) if response.text else "no body"
    if status == 403:
        return failed("public_url", "PUBLIC_URL", f"POST {url} answered 403, but not this service's refusal "
                                                  f"({seen}): something in front of the replicas refused it")
    return failed("public_url", "PUBLIC_URL", f"POST {url} answered HTTP {status} ({seen}), not the replicas' 403 "
                                              "for a request without a signature")


def dumps(lines: list[CheckLine]) -> str:
    """The JSON document of `reminders check --json`."""
    return json.dumps({"ok": all(line.ok for line in lines), "checks": [line.as_dict() for line in lines]})
