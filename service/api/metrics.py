"""GET /metrics in the Prometheus text format, on a port of its own (METRICS_PORT), never the API's.

The API's port is the one the providers' webhooks must reach from outside; the metrics are for
Prometheus alone (docs/decisions/0243). `MetricsServer` serves them with uvicorn in the replica's
own event loop: a scrape answers only while that loop runs, as the API does, so a replica whose
loop is stuck goes stale in Prometheus instead of repeating its last `reminders_is_leader`.
"""

from __future__ import annotations

import logging
import socket

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Receive, Scope, Send

__all__ = ["METRICS_PATH", "MetricsServer", "metrics_app"]

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"


async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The metrics port's whole ASGI app: GET/HEAD /metrics, 404 for any other path."""
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    if scope["path"] != METRICS_PATH:
        status, body = 404, b"not found: this port serves /metrics only\n"
    elif scope["method"] not in ("GET", "HEAD"):
        status, body = 405, b"method not allowed\n"
        headers.append((b"allow", b"GET, HEAD"))
    else:
        status, body = 200, generate_latest()
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


class MetricsServer:
    """`metrics_app` on host:port in the running event loop (uvicorn's HTTP protocol, no lifespan,
    no signal handlers: the API's server owns those). `bind()` takes the port or raises OSError
    naming METRICS_PORT (`reminders serve` calls it before anything starts, to stop with one line);
    `start()` binds if that was not done and serves; `stop()` closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None

    @property
    def bound_port(self) -> int | None:
        """The port it listens on (METRICS_PORT, or the one the system chose for 0 in tests)."""
        return self._socket.getsockname()[1] if self._socket is not None else None

    def bind(self) -> None:
        if self._socket is not None:
            return
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as error:
            raise self._refused(error) from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted replica rebinds at once
            sock.bind(address)
            sock.listen(128)
        except OSError as error:
            sock.close()
            raise self._refused(error) from None
        sock.setblocking(False)
        self._socket = sock

    def _refused(self, error: OSError) -> OSError:
        return OSError(error.errno, f"METRICS_PORT {self.port}: cannot listen on {self.host}:{self.port} "
                                    f"({error.strerror or error}); give each replica on one host its own port, "
                                    "or 0 to turn the metrics port off")

    async def start(self) -> None:
        self.bind()
        sock = self._socket
        assert sock is not None
        config = uvicorn.Config(metrics_app, lifespan="off", log_config=None, access_log=False,
                                proxy_headers=False, server_header=False, date_header=False,
                                timeout_graceful_shutdown=1)
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        # startup/shutdown, not serve(): serve() would take over the process's signal handlers.
        await server.startup(sockets=[sock])
        self._server = server
        log.info("metrics on http://%s:%d%s", self.host, self.bound_port, METRICS_PATH)

    async def stop(self) -> None:
        server, sock = self._server, self._socket
        self._server = self._socket = None
        if server is not None and sock is not None:
            await server.shutdown(sockets=[sock])
        elif sock is not None:
            sock.close()  # bound, never started
