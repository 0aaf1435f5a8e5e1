"""The `reminders` command: serve, migrate, check, events-resume, fake-provider."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys

from pydantic import ValidationError

from service.config import Settings, setting_error_line

__all__ = ["main"]

log = logging.getLogger("service.cli")


def _settings() -> Settings:
    """Settings from the environment, or exit 2 with one line naming the variable."""
    try:
        return Settings()
    except ValidationError as error:
        print(f"reminders: {setting_error_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    settings = _settings()
    import uvicorn

    from service.api.metrics import MetricsServer
    from service.app import create_app
    from service.components import check
    from service.db import Database, SchemaOutOfDate
    from service.errors import SettingError
    from service.logs import configure_logging

    try:
        check(settings)
    except SettingError as error:
        print(f"reminders: invalid setting {error.variable}: {error.message}", file=sys.stderr)
        return 2
    if settings.metrics_port and settings.metrics_port == args.port:
        print(f"reminders: invalid setting METRICS_PORT: {settings.metrics_port} is the API's port (--port); "
              "the metrics need a port of their own, or 0 to turn them off", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level, settings.pod_name)
    if not settings.is_sqlite:

        async def check() -> None:
            db = Database(settings.database_url, pool_size=1)
            try:
                await asyncio.wait_for(db.check_schema(), 30)
            finally:
                await db.dispose()

        try:
            asyncio.run(check())
        except SchemaOutOfDate as error:
            print(f"reminders: {error}", file=sys.stderr)
            return 1
        except (OSError, TimeoutError) as error:
            print(f"reminders: database not reachable: {type(error).__name__}: {error}", file=sys.stderr)
            return 1

    # The metrics port binds where the API does, taken now: a port in use stops with one line.
    metrics = MetricsServer(args.host, settings.metrics_port) if settings.metrics_port else None
    try:
        if metrics is not None:
            metrics.bind()
    except OSError as error:
        print(f"reminders: {error.strerror}", file=sys.stderr)
        return 1
    app = create_app(settings, host=args.host, metrics=metrics)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            # Resign at the signal, not after uvicorn has drained HTTP (invariant 4).
            # The handler runs on the main thread while uvicorn's loop runs there; uvicorn builds
            # that loop with a loop_factory, so it is the *running* loop, never the policy's
            # "current" one (get_event_loop() raised here, or returned a stray, never-run loop).
            begin = getattr(app.state, "begin_shutdown", None)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if begin is not None and loop is not None:
                loop.call_soon_threadsafe(begin)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_config=None, access_log=False, timeout_graceful_shutdown=5
    )
    _freeze_startup_objects()
    Server(config).run()
    return 0


def _freeze_startup_objects() -> None:
    """Put what startup made (modules, the app, its schemas) out of the garbage collector's reach.

    A full collection otherwise walks all of it, 80–90 ms with the event loop stopped — the API's
    p99 under load, and a gap in the lease keepalives. After the freeze it walks what requests
    made: under 10 ms (docs/decisions/0162)."""
    gc.collect()
    gc.freeze()


def _migrate(_args: argparse.Namespace) -> int:
    from service.db import Database
    from service.logs import configure_logging

    settings = _settings()
    configure_logging(settings.log_format, settings.log_level)

    async def upgrade() -> None:
        db = Database(settings.database_url, pool_size=1)
        try:
            await db.upgrade()
            await db.check_schema()
        finally:
            await db.dispose()

    try:
        asyncio.run(upgrade())
    except (OSError, TimeoutError) as error:
        print(f"reminders: database not reachable: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    log.info("database schema is at head")
    return 0


def _events_resume(_args: argparse.Namespace) -> int:
    from service.db import Database
    from service.ledger import outbox

    settings = _settings()

    async def resume() -> bool:
        db = Database(settings.database_url, pool_size=1)
        try:
            return await outbox.resume(db)
        finally:
            await db.dispose()

    try:
        stopped = asyncio.run(resume())
    except (OSError, TimeoutError) as error:
        print(f"reminders: database not reachable: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print("events: delivery resumes (EVENTS_URL had answered 410)" if stopped else
          "events: delivery was not stopped; nothing to do")
    return 0


def _check(args: argparse.Namespace) -> int:
    from service.check import main as check

    return check(as_json=args.json, skip=frozenset(args.skip))


# The fake providers are a distribution of their own (fakes/ in the repository, `reminders-fakes`):
# never in the service's wheel or production image. Only this command loads them, when it runs.
FAKES_MISSING = (
    "reminders fake-provider: the fake providers are not installed here; "
    "from a checkout of the repository: pip install ./fakes"
)


def _fake_provider(args: argparse.Namespace) -> int:
    from service.logs import configure_logging

    try:
        from reminders_fakes import run_fake_provider
    except ModuleNotFoundError as error:
        if error.name != "reminders_fakes":
            raise  # installed, but broken: the traceback says what is missing
        print(FAKES_MISSING, file=sys.stderr)
        return 2
    if not 0 <= args.fail_rate <= 1:
        print("reminders: --fail-rate must be between 0 and 1", file=sys.stderr)
        return 2
    configure_logging("text", "info")
    run_fake_provider(args.host, args.port, latency_ms=args.latency_ms, fail_rate=args.fail_rate)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reminders", description="Appointment reminder service.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="one replica: API, election and dispatcher")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8080)
    serve.set_defaults(run=_serve)
    migrate = commands.add_parser("migrate", help="alembic upgrade head for DATABASE_URL")
    migrate.set_defaults(run=_migrate)
    check = commands.add_parser(
        "check", help="before going live: settings, database, etcd, the provider's credentials and signature "
                      "settings, PUBLIC_URL's reachability; one line each, exit 0 when all pass")
    check.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    check.add_argument("--skip", action="append", default=[], metavar="CHECK",
                       choices=["database", "etcd", "provider", "signature", "public_url"],
                       help="leave a check out (repeatable): database, etcd, provider, signature, public_url")
    check.set_defaults(run=_check)
    resume = commands.add_parser(
        "events-resume", help="deliver events to EVENTS_URL again after it answered 410 Gone (the leader "
                              "picks it up within a second)")
    resume.set_defaults(run=_events_resume)
    fake = commands.add_parser(
        "fake-provider",
        help="the fake telephony provider API (requires TELEPHONY_TOKEN as bearer token when set); "
        "needs the fakes installed (pip install ./fakes)",
    )
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8090)
    fake.add_argument("--latency-ms", type=float, default=0.0)
    fake.add_argument("--fail-rate", type=float, default=0.0)
    fake.set_defaults(run=_fake_provider)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
