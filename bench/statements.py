"""Database statements per route, counted inside a replica, for `python -m bench provider`.

The bench starts its replicas with BENCH_STATEMENTS=1 and bench/replica_hooks first on PYTHONPATH:
that folder's `sitecustomize` calls `install()` before the service is imported (nothing else sets
the variable; the service itself has no such code). `install()`:

- wraps `FastAPI.__call__` so that each HTTP request carries its label in a context variable — the
  path with ids as `{id}` (`/appointments/{id}`), a webhook's `harness.webhook_proxy.webhook_label`
  once its body has been read (`twilio/status:ringing`, `telnyx/events:call.answered`): the same
  labels the webhook front counts by;
- counts, per label, every statement SQLAlchemy sends (`before_cursor_execute`: an executemany is
  one) and every transaction it begins (`Engine` `begin`; single statements in autocommit begin
  none) — work done outside a request (the leader's dispatch, the sweeps, the events relay, the
  backlog gauges) is labelled `background:<its task's name, ids and numbers as N>`;
- exports the counts on the replica's metrics port (the default registry) as
  `reminders_bench_statements_total`, `reminders_bench_transactions_total` and
  `reminders_bench_requests_total`, each with a `route` label.

A request's context is copied into the tasks it starts (its background tasks too), and SQLAlchemy
runs its greenlets in the caller's context, so their statements count for the request.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
from typing import Any

__all__ = ["ENV", "install", "route_label"]

ENV = "BENCH_STATEMENTS"
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_ID = re.compile(rf"/(?:{_UUID}|\d+)(?=/|$)")
_TASK_IDS = re.compile(rf"{_UUID}|\d+")


class _Request:
    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        self.label = label


_CURRENT: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("bench_request", default=None)


def route_label(path: str) -> str:
    """A request's label before its body is read: the path, ids as `{id}`."""
    return _ID.sub("/{id}", path)


def _background() -> str:
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return "background"
    return f"background:{_TASK_IDS.sub('N', task.get_name())}" if task is not None else "background"


def install() -> None:
    from fastapi import FastAPI
    from prometheus_client import Counter
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from harness.webhook_proxy import webhook_label

    statements = Counter("reminders_bench_statements", "Statements sent, by route (bench only)", ["route"])
    transactions = Counter("reminders_bench_transactions", "Transactions begun, by route (bench only)", ["route"])
    requests = Counter("reminders_bench_requests", "HTTP requests answered, by route (bench only)", ["route"])

    def label() -> str:
        current = _CURRENT.get()
        return current.label if current is not None else _background()

    def on_statement(*_args: Any, **_kwargs: Any) -> None:
        statements.labels(label()).inc()

    def on_begin(*_args: Any, **_kwargs: Any) -> None:
        transactions.labels(label()).inc()

    event.listen(Engine, "before_cursor_execute", on_statement)
    event.listen(Engine, "begin", on_begin)
    original = FastAPI.__call__

    async def call(self: FastAPI, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await original(self, scope, receive, send)
        path = scope["path"]
        current = _Request(route_label(path))
        token = _CURRENT.set(current)
        if path.startswith("/telephony/"):
            chunks: list[bytes] = []
            inner = receive

            async def receive() -> Any:
                message = await inner()
                if message["type"] == "http.request":
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body"):
                        current.label = webhook_label(path, b"".join(chunks))
                return message

        try:
            await original(self, scope, receive, send)
        finally:
            _CURRENT.reset(token)
            requests.labels(current.label).inc()

    FastAPI.__call__ = call  # type: ignore[method-assign]
