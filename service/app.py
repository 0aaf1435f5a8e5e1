"""The ASGI application: API for every replica; election and dispatch in the background.

`create_app(settings)` builds it (tests); `app` is the module-level instance for
`uvicorn service.app:app`, configured from the environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Mount

from service.api import appointments, do_not_call, events, health
from service.api.auth import BearerAuthMiddleware, api_tokens, document_bearer_auth
from service.api.deadlines import REQUEST_DEADLINE, Deadline, DeadlineMiddleware
from service.api.limits import BodyLimitMiddleware
from service.api.metrics import MetricsServer
from service.api.readiness import ReadinessProbe
from service.api.unavailable import DATABASE_ERRORS, unavailable_reason
from service.backlog import watch_backlog
from service.components import check, dispatch_config, election_config, pool_size, provider
from service.config import Settings
from service.db import Database
from service.dispatch.dispatcher import Dispatcher
from service.election import Elector
from service.ledger import consent
from service.metrics import ETCD_AUTH_FAILURES, IS_LEADER, KEEPALIVE_FAILURES, KEEPALIVE_RTT, LEADER_TRANSITIONS
from service.providers import package
from service.telephony.webhook import WEBHOOK_PREFIX

__all__ = ["app", "create_app"]

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

log = logging.getLogger(__name__)


async def _prepare_schema(db: Database) -> None:
    """SQLite (embedded): migrate to head. PostgreSQL: refuse an out-of-date schema."""
    if db.is_sqlite:
        try:
            await db.upgrade()
        except OperationalError:
            # Another replica sharing the file migrated at the same moment: its result is ours.
            await db.check_schema()
    else:
        await db.check_schema()


def create_app(settings: Settings, *, host: str = "127.0.0.1", metrics: MetricsServer | None = None) -> FastAPI:
    """The service for `settings`: API, and while it runs, election, dispatch and the metrics port
    (`metrics`, else METRICS_PORT bound on `host`: the API's address). SettingError names a setting
    a component refuses (`uvicorn service.app:app` stops as `reminders serve` does)."""
    check(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.database_url, pool_size=pool_size(settings))
        await _prepare_schema(db)
        await consent.phone_hasher(db)  # its key read once, before the first request needs it
        calls = provider(settings)
        dispatcher = Dispatcher(db, calls, dispatch_config(settings))

        async def started(term) -> None:
            IS_LEADER.set(1)
            LEADER_TRANSITIONS.inc()
            await dispatcher.lead(term)

        async def stopped(term) -> None:
            IS_LEADER.set(0)
            LEADER_TRANSITIONS.inc()

        elector = Elector(
            election_config(settings),
            on_started_leading=started,
            on_stopped_leading=stopped,
            drain_timeout=settings.drain_timeout,
            on_keepalive=KEEPALIVE_RTT.observe,
            on_keepalive_failure=KEEPALIVE_FAILURES.inc,
            on_auth_failure=ETCD_AUTH_FAILURES.inc,
        )
        app.state.db, app.state.elector, app.state.provider = db, elector, calls
        app.state.readiness = ReadinessProbe(db, elector)
        shutdown_started: asyncio.Task[None] | None = None

        def begin_shutdown() -> asyncio.Task[None]:
            """Stop leading and resign now, without waiting for HTTP to drain (idempotent)."""
            nonlocal shutdown_started
            if shutdown_started is None:
                shutdown_started = asyncio.ensure_future(elector.shutdown())
            return shutdown_started

        app.state.begin_shutdown = begin_shutdown
        running = asyncio.create_task(elector.run(), name="elector")
        # gauges for the alerts
        backlog = asyncio.create_task(watch_backlog(db, events_url=settings.events_url), name="backlog")
        log.info("replica %s started (database %s)", settings.pod_name, "SQLite" if db.is_sqlite else "PostgreSQL")
        try:
            yield
        finally:
            await begin_shutdown()
            running.cancel()
            backlog.cancel()
            await asyncio.gather(running, backlog, return_exceptions=True)
            await calls.aclose()
            await db.dispose()
            log.info("replica %s stopped", settings.pod_name)

    app = FastAPI(
        title="Reminders",
        version="0.1.0",
        summary="Appointments with reminder calls placed exactly once by the elected leader.",
        lifespan=_with_metrics_port(lifespan, metrics or _metrics_server(host, settings.metrics_port)),
        # The service's metrics are Prometheus' (METRICS_PORT); FastAPI's native OpenTelemetry would
        # look up the global providers on every request to find it has none (docs/decisions/0162).
        telemetry={"tracing": False, "metrics": False, "logs": False},
        **_docs_urls(settings),
    )
    app.add_middleware(BodyLimitMiddleware)
    _harden(app, settings)
    app.state.settings = settings
    app.state.db = None
    app.state.elector = None
    app.state.readiness = None
    # the provider's webhook routes (signed, so not behind API_TOKEN), on every replica; first, so that
    # a webhook is not matched against the whole API (docs/decisions/0262)
    package(settings.telephony_provider).install(app, settings)
    for router in _API_ROUTERS:
        app.include_router(router)
    _install_error_handlers(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Database trouble is a 503, bad input a 422 without echoing it, a 405 lists every method."""

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeoutError)
    @app.exception_handler(TimeoutError)
    async def database_unavailable(_request: Request, error: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", type(error).__name__)
        return JSONResponse({"detail": "database unavailable, try again"}, status_code=503)

    for error_type in DATABASE_ERRORS:
        app.add_exception_handler(error_type, _database_unreachable)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        # The field-level detail, without echoing inputs (they may hold phone numbers).
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 405:
            # Starlette names only the first route that matched the path; list every method.
            # FastAPI keeps an included router as one entry of app.router.routes: its routes are read here
            routes = [*app.router.routes, *(route for router in _API_ROUTERS for route in router.routes)]
            # matched from the app's root (a mount's handler sees its own root_path)
            root = request.scope.get("app_root_path", request.scope.get("root_path", ""))
            allowed = _allowed_methods(routes, {**request.scope, "method": "", "root_path": root})
            error.headers = {**(error.headers or {}), "Allow": ", ".join(sorted(allowed))}
        return await http_exception_handler(request, error)


_API_ROUTERS = (appointments.router, do_not_call.router, events.router, health.router)


def _allowed_methods(routes: Sequence[BaseRoute], scope: dict[str, Any]) -> set[str]:
    """The methods of every route that matches the scope's path, inside mounts too (the webhooks')."""
    allowed: set[str] = set()
    for route in routes:
        match, child_scope = route.matches(scope)
        if match == Match.NONE:
            continue
        if getattr(route, "methods", None):
            allowed |= route.methods  # type: ignore[attr-defined]
        elif isinstance(route, Mount):
            allowed |= _allowed_methods(route.routes, {**scope, **child_scope})
    return allowed


_GUARDED = ("/appointments", "/do-not-call", "/events")


def _metrics_server(host: str, port: int) -> MetricsServer | None:
    """The metrics port's server (METRICS_PORT 0: none)."""
    return MetricsServer(host, port) if port else None


def _with_metrics_port(lifespan: Lifespan, server: MetricsServer | None) -> Lifespan:
    """`lifespan` inside the metrics port's life: up before the database and the election start
    (a starting replica is scraped too), closed after they stopped."""

    @asynccontextmanager
    async def with_metrics(app: FastAPI) -> AsyncIterator[None]:
        if server is not None:
            await server.start()
        app.state.metrics_server = server
        try:
            async with lifespan(app):
                yield
        finally:
            if server is not None:
                await server.stop()

    return with_metrics


def _docs_urls(settings: Settings) -> dict[str, str | None]:
    """API_DOCS=false: no /docs, /redoc or /openapi.json."""
    if settings.api_docs:
        return {}
    return {"docs_url": None, "redoc_url": None, "openapi_url": None}


async def _database_unreachable(_request: Request, error: Exception) -> JSONResponse:
    """503 for a database that cannot be reached (refused, unknown host, wrong password, timeout)."""
    reason = unavailable_reason(error)
    log.warning("database unavailable: %s (%s)", reason, type(error).__name__)
    return JSONResponse({"detail": f"database unavailable: {reason}, try again"}, status_code=503,
                        headers={"Retry-After": "1"})


def _harden(app: FastAPI, settings: Settings) -> None:
    """Issue 12's outer layers: auth before the body, a bound on every API request and on every
    webhook's body, a truthful OpenAPI."""
    tokens = api_tokens(settings.api_token)
    # the API answers within its deadline; a webhook's body arrives within WEBHOOK_BODY_TIMEOUT (its
    # handler then has the database budgets of its provider's routes)
    app.add_middleware(DeadlineMiddleware, deadlines=(
        Deadline(_GUARDED, answer=REQUEST_DEADLINE), Deadline((WEBHOOK_PREFIX,), body=settings.webhook_body_timeout)))
    app.add_middleware(BearerAuthMiddleware, tokens=tokens, prefixes=_GUARDED)  # outermost: runs first
    if not tokens:
        log.warning("API_TOKEN is unset: the appointments API is open to anyone who can reach this replica")
    original = app.openapi

    def openapi() -> dict:
        # What is enforced, no more (schemathesis' ST401/ST201/ST203 check an open replica's document).
        if app.openapi_schema is None:
            app.openapi_schema = document_bearer_auth(original(), enforced=bool(tokens), prefixes=_GUARDED)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def __getattr__(name: str) -> object:
    # `uvicorn service.app:app`: built on first access, so importing this module reads no settings.
    if name == "app":
        import sys

        from pydantic import ValidationError

        from service.config import setting_error_line
        from service.errors import SettingError
        from service.logs import configure_logging

        try:
            settings = Settings()
            configure_logging(settings.log_format, settings.log_level, settings.pod_name)
            # uvicorn's --host is not visible from here: its environment form, else its default
            globals()["app"] = create_app(settings, host=os.environ.get("UVICORN_HOST", "127.0.0.1"))
        except (ValidationError, SettingError) as error:
            # the one line `reminders serve` prints, not uvicorn's traceback
            line = setting_error_line(error) if isinstance(error, ValidationError) else (
                f"invalid setting {error.variable}: {error.message}")
            print(f"reminders: {line}", file=sys.stderr)
            raise SystemExit(2) from None
        return globals()["app"]
    raise AttributeError(name)
