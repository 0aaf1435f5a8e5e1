"""The database's unavailability as HTTP: 503 with a short reason, never a 500 or a hang."""

from __future__ import annotations

import socket

__all__ = ["DATABASE_ERRORS", "unavailable_reason"]


def _driver_errors() -> tuple[type[BaseException], ...]:
    try:
        import asyncpg
    except ImportError:  # SQLite-only install
        return ()
    # Raised unwrapped by SQLAlchemy when connecting: InvalidPasswordError, TooManyConnectionsError…
    return (asyncpg.PostgresError, asyncpg.InterfaceError)


# What reaching the database can raise besides SQLAlchemy's own errors (those are mapped in app.py).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (OSError, *_driver_errors())


def unavailable_reason(error: BaseException) -> str:
    """A short, secret-free reason for a 503."""
    chain = [error, *(e for e in (error.__cause__, error.__context__) if e is not None)]
    for item in chain:
        name = type(item).__name__
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        if isinstance(item, socket.gaierror):
            return "database host not found"
        if isinstance(item, TimeoutError) or "Timeout" in name:
            return "timed out"
        if name in ("InvalidPasswordError", "InvalidAuthorizationSpecificationError"):
            return "authentication failed"
        if name == "TooManyConnectionsError":
            return "too many connections"
    return "not reachable"
