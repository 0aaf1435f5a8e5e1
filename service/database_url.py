"""What a PostgreSQL DATABASE_URL asks of its connection: the hosts it reaches, the TLS it asks for,
and the connect arguments asyncpg gets for it (the engine and the migrations' env.py alike).

SQLAlchemy's asyncpg dialect hands every query parameter to `asyncpg.connect` as a keyword: asyncpg's
own `ssl=verify-full` works as it is, but libpq's `sslmode` and `sslrootcert` would be unknown
keywords (a TypeError at the first connection). Both spellings are accepted here, so the same URL
(without `+asyncpg`) works in psql too; `sslrootcert` becomes an SSL context that trusts that CA.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

__all__ = ["MODES", "SYSTEM", "VERIFIED", "VERIFY_FULL", "PostgresTransport", "connect_options", "postgres_transport"]

VERIFY_FULL = "verify-full"
# Modes that check the server's certificate against a CA (verify-ca skips the host name).
VERIFIED = frozenset({"verify-ca", VERIFY_FULL})
MODES = ("disable", "allow", "prefer", "require", "verify-ca", VERIFY_FULL)
_LIBPQ_ONLY = ("sslmode", "sslrootcert")
SYSTEM = "system"


@dataclass(frozen=True)
class PostgresTransport:
    """`hosts`: names, addresses or socket directories the URL connects to (the driver's defaults
    when it names none: PGHOST, else the local socket); `mode`: the TLS mode asked for (None: the
    driver's default, `prefer`, which falls back to plain text); `root_cert`: sslrootcert's path."""

    hosts: tuple[str, ...]
    mode: str | None
    root_cert: str | None

    def ca_missing(self) -> str | None:
        """Why a verifying mode would find no CA to check the server against, or None."""
        if self.mode not in VERIFIED:
            return None
        if self.root_cert == SYSTEM:
            return None
        if self.root_cert is not None:
            return None if Path(self.root_cert).is_file() else f"sslrootcert {self.root_cert}: file not found"
        # asyncpg's own places when the URL names none
        env = os.environ.get("PGSSLROOTCERT")
        if env:
            return None if Path(env).is_file() else f"PGSSLROOTCERT {env}: file not found"
        if (Path.home() / ".postgresql" / "root.crt").is_file():
            return None
        return (f"ssl={self.mode} needs the CA that signed the server's certificate: sslrootcert=<path> in "
                "DATABASE_URL (or PGSSLROOTCERT, or ~/.postgresql/root.crt)")


def _one(query: dict[str, Any], name: str) -> str | None:
    value = query.get(name)
    if isinstance(value, tuple):
        raise ValueError(f"{name} is given more than once")
    return value


def _host_of(entry: str) -> str:
    """The host of a `host=` query entry: a socket directory, name:port, or [v6]:port."""
    if entry.startswith("/"):
        return entry
    if entry.startswith("["):
        return entry[1:entry.index("]")]
    return entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry


def _hosts(url: URL) -> tuple[str, ...]:
    if url.host:
        return (url.host,)
    named = url.query.get("host")
    if named:
        return tuple(_host_of(entry) for entry in (named if isinstance(named, tuple) else (named,)))
    default = os.environ.get("PGHOST")
    return tuple(default.split(",")) if default else ()


def postgres_transport(url: str | URL) -> PostgresTransport:
    """The hosts and TLS a PostgreSQL URL asks for. ValueError for a mode no driver knows, `ssl`
    and `sslmode` that disagree, or `sslrootcert` without a verifying mode."""
    url = make_url(url)
    query = dict(url.query)
    asyncpg_mode, libpq_mode = _one(query, "ssl"), _one(query, "sslmode")
    if asyncpg_mode and libpq_mode and asyncpg_mode != libpq_mode:
        raise ValueError(f"ssl={asyncpg_mode} and sslmode={libpq_mode} disagree: give one")
    mode = asyncpg_mode or libpq_mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"ssl={mode} is not one of {', '.join(MODES)}")
    root_cert = _one(query, "sslrootcert")
    if root_cert is not None and mode not in VERIFIED:
        raise ValueError(f"sslrootcert needs ssl={VERIFY_FULL} (the CA is only used to verify the server)")
    if root_cert == SYSTEM and mode != VERIFY_FULL:
        raise ValueError(f"sslrootcert={SYSTEM} needs ssl={VERIFY_FULL}, as in libpq")
    return PostgresTransport(_hosts(url), mode, root_cert)


def connect_options(url: str | URL) -> tuple[URL, dict[str, Any]]:
    """The URL without the TLS parameters, and the connect arguments that carry them to asyncpg:
    `ssl` as a mode asyncpg knows, or an SSL context trusting sslrootcert's CA (`system`: the system's). A SQLite URL
    comes back unchanged with none."""
    url = make_url(url)
    if not url.drivername.startswith("postgresql"):
        return url, {}
    transport = postgres_transport(url)
    url = url.difference_update_query(["ssl", *_LIBPQ_ONLY])
    if transport.mode is None:
        return url, {}
    if transport.root_cert is None:
        return url, {"ssl": transport.mode}
    # libpq's `system`: the operating system's trust store (a managed database with a public CA)
    context = ssl.create_default_context(cafile=None if transport.root_cert == SYSTEM else transport.root_cert)
    context.check_hostname = transport.mode == VERIFY_FULL
    return url, {"ssl": context}
