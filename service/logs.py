"""Logging: text or one JSON object per line; phone numbers are masked in every record; the actor
of a request (the name of its API token) for the lines that record a change."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from service.privacy import scrub

__all__ = ["MaskPhoneNumbers", "acting", "actor", "configure_logging"]

# Who is making the current request's changes: its API token's name (unset: the API is open, or
# the change is the service's own).
_ACTOR: ContextVar[str | None] = ContextVar("actor", default=None)


@contextmanager
def acting(name: str) -> Iterator[None]:
    """Changes made inside are `name`'s."""
    token = _ACTOR.set(name)
    try:
        yield
    finally:
        _ACTOR.reset(token)


def actor() -> str:
    """Who makes the current change: an API token's name, else `anonymous` (no API_TOKEN)."""
    return _ACTOR.get() or "anonymous"

_TRACEBACKS = logging.Formatter()


class MaskPhoneNumbers(logging.Filter):
    """Rewrites each record's message, traceback and stack with phone numbers masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = scrub(message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            # formatters print exc_text when it is set: the scrubbed text replaces the raw one
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: str = "text", level: str = "info", instance: str | None = None) -> None:
    """Root logger to stderr in `log_format`; uvicorn's loggers go through the same handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(MaskPhoneNumbers())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"[{instance}] " if instance else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
