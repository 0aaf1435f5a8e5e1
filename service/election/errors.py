"""The election's exception family.

Everything this package raises on purpose is an `ElectionError`. Communication failures with
etcd (timeouts, unavailability, refused requests) arrive as `EtcdError`, whatever layer they
came from (aetcd's `ClientError` family, raw `grpc.aio.AioRpcError` from the stubs, or an
`asyncio` timeout), so callers need exactly one `except ElectionError` to survive etcd trouble.
"""

from __future__ import annotations

import asyncio

import aetcd
import grpc


class ElectionError(Exception):
    """Base of every error raised by `service.election`."""


class EtcdError(ElectionError):
    """etcd did not answer in time, was unreachable, or refused the request.

    `code` is the gRPC status code when there was one (``None`` for local timeouts).
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class CompactedError(EtcdError):
    """A watch started from a revision etcd has already compacted away; re-read and retry."""

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(f"revision compacted below {compacted_revision}")
        self.compacted_revision = compacted_revision


class SessionLost(ElectionError):
    """The lease behind a session can no longer be trusted (local deadline passed, expired on
    the server, or the session was closed) while an operation depended on it."""


class NotLeader(ElectionError):
    """The candidate's own key is gone or was replaced (its create revision differs): it does
    not hold the election, so a guarded resign/proclaim did nothing."""


def translate(error: BaseException) -> ElectionError:
    """Map an error from aetcd, gRPC or asyncio to this package's family (others unchanged)."""
    if isinstance(error, ElectionError):
        return error
    if isinstance(error, aetcd.RevisionCompactedError):
        return CompactedError(error.compacted_revision)
    if isinstance(error, grpc.aio.AioRpcError):
        return EtcdError(f"{error.code().name}: {error.details()}", error.code())
    if isinstance(error, aetcd.ClientError):
        cause = error.__cause__
        code = cause.code() if isinstance(cause, grpc.aio.AioRpcError) else None
        return EtcdError(f"{type(error).__name__}: {error}", code)
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return EtcdError("etcd request timed out")
    return ElectionError(f"{type(error).__name__}: {error}")


#: What a call to etcd may raise that `translate` turns into an `EtcdError`.
ETCD_FAILURES: tuple[type[BaseException], ...] = (
    aetcd.ClientError,
    grpc.aio.AioRpcError,
    asyncio.TimeoutError,
    TimeoutError,
    EtcdError,
)
