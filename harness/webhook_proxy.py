"""An HTTP reverse proxy that does what an Ingress does to provider webhooks: it serves them under
a path prefix, strips the prefix, and spreads requests over the replicas (round robin, the next
replica when one does not accept the connection: a dead pod leaves the Service's endpoints).

    python -m harness.webhook_proxy --port P --prefix /edge --upstream http://127.0.0.1:8001,...

The upstreams can be changed while it runs: `PUT /_proxy/upstreams` with a JSON list of URLs.
Requests are forwarded with their body, query and headers (Host rewritten), so the replicas see
a different URL than the provider signed: signatures must be checked against PUBLIC_URL.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging

import httpx
from httpx_aiohttp import AiohttpTransport
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["create_proxy", "main"]

log = logging.getLogger("webhook-proxy")

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


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
        for offset in range(len(ups)):
            base = ups[(start + offset) % len(ups)]
            url = base.rstrip("/") + stripped + (f"?{query}" if query else "")
            try:
                upstream = await http.request(request.method, url, content=body, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                continue  # that pod is gone (aiohttp reports a refused connect as a timeout): the next one
            except httpx.HTTPError as error:
                log.info("upstream %s failed mid-request: %s", base, type(error).__name__)
                return JSONResponse({"error": "upstream failed"}, status_code=502)
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-encoding"}}
            return Response(upstream.content, status_code=upstream.status_code, headers=out)
        return JSONResponse({"error": "no upstream accepted the connection"}, status_code=502)

    async def set_upstreams(request: Request) -> JSONResponse:
        if request.method == "PUT":
            state["upstreams"] = [str(u) for u in json.loads(await request.body())]
        return JSONResponse(state["upstreams"])

    return Starlette(routes=[
        Route("/_proxy/upstreams", set_upstreams, methods=["GET", "PUT"]),
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
