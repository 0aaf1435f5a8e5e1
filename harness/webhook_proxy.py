"""An HTTP reverse proxy that does what an Ingress does to provider webhooks: it serves them under
a path prefix, strips the prefix, and spreads requests over the replicas (round robin, the next
replica when one does not accept the connection: a dead pod leaves the Service's endpoints).

    python -m harness.webhook_proxy --port P --prefix /edge --upstream http://127.0.0.1:8001,...

The upstreams can be changed while it runs: `PUT /_proxy/upstreams` with a JSON list of URLs.
Requests are forwarded with their body, query and headers (Host rewritten), so the replicas see
a different URL than the provider signed: signatures must be checked against PUBLIC_URL.

The front sees every webhook, so it can count them (`python -m bench provider`): `POST
/_proxy/stats` with `{"record": true}` starts recording afresh (`false` stops), `GET
/_proxy/stats` returns, per `webhook_label` (the route, and the kind of event for a route that
takes several), how many were answered and when the last was, and with `?full=1` each one's time
to the upstream's answer and the statuses and upstreams. Off by default: nothing is recorded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

import httpx
from httpx_aiohttp import AiohttpTransport
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["ProxyStats", "create_proxy", "main", "webhook_label"]

log = logging.getLogger("webhook-proxy")

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}
_CALL_STATUS = re.compile(rb"(?:^|&)CallStatus=([^&]{1,40})")


def webhook_label(path: str, body: bytes) -> str:
    """What a webhook is, for figures per route: its path under /telephony/ (`twilio/voice`), and
    for a route that takes several kinds the kind — Twilio's status callbacks by CallStatus
    (`twilio/status:ringing`), Telnyx's events by event_type (`telnyx/events:call.answered`)."""
    route = path.split("/telephony/", 1)[-1].strip("/")
    if route == "twilio/status":
        found = _CALL_STATUS.search(body)
        return f"{route}:{unquote_plus(found.group(1).decode('latin-1'))}" if found else route
    if route == "telnyx/events":
        try:
            kind = json.loads(body)["data"]["event_type"]
        except (ValueError, KeyError, TypeError):
            return route
        return f"{route}:{kind}" if isinstance(kind, str) and len(kind) <= 60 else route
    return route


@dataclass
class ProxyStats:
    """Webhooks answered while recording, per `webhook_label`."""

    recording: bool = False
    counts: Counter[str] = field(default_factory=Counter)
    last_at: dict[str, float] = field(default_factory=dict)  # epoch seconds the last answer came back
    first_at: dict[str, float] = field(default_factory=dict)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)  # to the upstream's answer
    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    upstreams: Counter[str] = field(default_factory=Counter)

    def record(self, label: str, started: float, status: int | str, upstream: str) -> None:
        now = time.time()
        self.counts[label] += 1
        self.first_at.setdefault(label, now)
        self.last_at[label] = now
        self.latencies_ms.setdefault(label, []).append(round((time.perf_counter() - started) * 1000, 3))
        self.statuses.setdefault(label, Counter())[str(status)] += 1
        self.upstreams[upstream] += 1

    def as_json(self, full: bool) -> dict[str, object]:
        out: dict[str, object] = {"recording": self.recording, "total": sum(self.counts.values()),
                                  "counts": dict(self.counts), "last_at": self.last_at}
        if full:
            out.update(first_at=self.first_at, latencies_ms=self.latencies_ms,
                       statuses={label: dict(c) for label, c in self.statuses.items()},
                       upstreams=dict(self.upstreams))
        return out


def create_proxy(prefix: str, upstreams: list[str], *, timeout: float = 20.0,
                 max_connections: int = 2000) -> Starlette:
    """`max_connections`: upstream connections at once. An ingress opens one per request it holds;
    httpx's default of 100 made every webhook wait behind the requests a frozen or slow replica held
    for `timeout`, which an ingress does not (and its own pool slows as concurrency rises: the
    aiohttp transport, as the service's adapters use)."""
    prefix = "/" + prefix.strip("/")
    state = {"upstreams": list(upstreams), "turn": itertools.count()}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=200, keepalive_expiry=4.0)
    http = httpx.AsyncClient(timeout=timeout, transport=AiohttpTransport(limits=limits))
    stats = ProxyStats()

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(prefix + "/"):
            return JSONResponse({"error": f"not under {prefix}"}, status_code=404)
        stripped = path[len(prefix):]
        query = request.url.query
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        ups = state["upstreams"]
        if not ups:
            return JSONResponse({"error": "no upstream"}, status_code=503)
        start = next(state["turn"])
        started = time.perf_counter()
        for offset in range(len(ups)):
            base = ups[(start + offset) % len(ups)]
            url = base.rstrip("/") + stripped + (f"?{query}" if query else "")
            try:
                upstream = await http.request(request.method, url, content=body, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                continue  # that pod is gone (aiohttp reports a refused connect as a timeout): the next one
            except httpx.HTTPError as error:
                log.info("upstream %s failed mid-request: %s", base, type(error).__name__)
                if stats.recording:
                    stats.record(webhook_label(stripped, body), started, "failed", base)
                return JSONResponse({"error": "upstream failed"}, status_code=502)
            if stats.recording:
                stats.record(webhook_label(stripped, body), started, upstream.status_code, base)
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-encoding"}}
            return Response(upstream.content, status_code=upstream.status_code, headers=out)
        return JSONResponse({"error": "no upstream accepted the connection"}, status_code=502)

    async def set_upstreams(request: Request) -> JSONResponse:
        if request.method == "PUT":
            state["upstreams"] = [str(u) for u in json.loads(await request.body())]
        return JSONResponse(state["upstreams"])

    async def stats_route(request: Request) -> JSONResponse:
        nonlocal stats
        if request.method == "POST":
            stats = ProxyStats(recording=bool(json.loads(await request.body() or b"{}").get("record")))
        return JSONResponse(stats.as_json(full=request.query_params.get("full") == "1"))

    return Starlette(routes=[
        Route("/_proxy/upstreams", set_upstreams, methods=["GET", "PUT"]),
        Route("/_proxy/stats", stats_route, methods=["GET", "POST"]),
        Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ])


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--upstream", default="", help="comma-separated base URLs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s webhook-proxy: %(message)s")
    app = create_proxy(args.prefix, [u for u in args.upstream.split(",") if u])
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
