"""DATABASE_URL and TLS: a PostgreSQL beyond loopback must be asked for verified TLS (`ssl=verify-full`)
unless ALLOW_INSECURE_TRANSPORT=true; the CA comes from `sslrootcert` in the URL (libpq's spelling
`sslmode=verify-full` too), PGSSLROOTCERT or ~/.postgresql/root.crt. Checked against a real
PostgreSQL with ssl=on and a certificate of a CA made here: the service's engine and the
migrations (`reminders migrate`, and env.py's own engine) connect verified; a server signed by
another CA, or named otherwise than its certificate says, is refused."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic import command
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from harness.postgres import PostgresServer
from service.config import Settings, setting_error_line
from service.database_url import connect_options
from service.db import Database
from service.db.engine import alembic_config
from tests.support.requirements import unavailable

SERVER_NAME = "db.reminders.test"  # the certificate's DNS name; 127.0.0.1 is in it too, `localhost` is not


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey],
                 *, ca: bool, sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer[0]))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = (builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(issuer[1], hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass
class TlsPostgres:
    server: PostgresServer
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not

    def url(self, query: str, host: str = "127.0.0.1", database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@{host}:{self.server.port}/{database}?{query}"


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[TlsPostgres]:
    """A PostgreSQL with ssl=on: its certificate names SERVER_NAME and 127.0.0.1, signed by a CA made here."""
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("reminders-test-ca", ca_key, ("reminders-test-ca", ca_key), ca=True)
    other = _certificate("another-ca", other_key, ("another-ca", other_key), ca=True)
    sans = [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    served = _certificate(SERVER_NAME, server_key, ("reminders-test-ca", ca_key), ca=False, sans=sans)
    try:
        server = PostgresServer(settings={"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"})
    except (OSError, RuntimeError) as error:
        unavailable("PostgreSQL", error)
    try:
        base = Path(server.base)
        files = {"ca.crt": _pem(ca), "other-ca.crt": _pem(other), "server.crt": _pem(served),
                 "server.key": server_key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption())}
        for name, data in files.items():
            (base / name).write_bytes(data)
            server.own(base / name, 0o600 if name.endswith(".key") else 0o644)
        # relative ssl_*_file paths are read from the data directory: point them at base
        server.settings = {**server.settings, "ssl_cert_file": str(base / "server.crt"),
                           "ssl_key_file": str(base / "server.key")}
        server.start()
    except (OSError, RuntimeError, TimeoutError) as error:
        server.close()
        unavailable("PostgreSQL", error)
    yield TlsPostgres(server, base / "ca.crt", base / "other-ca.crt")
    server.close()


async def _tls_in_use(url: str) -> bool:
    """Connect as the service does and ask the server whether this session is encrypted."""
    from sqlalchemy import text

    db = Database(url, pool_size=1)
    try:
        async with db.engine.connect() as connection:
            return (await connection.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))).scalar()
    finally:
        await db.dispose()


# --- the rule: settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "postgresql+asyncpg://reminders:pw@db.example.com:5432/reminders",
    "postgresql+asyncpg://reminders:pw@10.0.0.7/reminders?ssl=require",
    "postgresql+asyncpg://reminders:pw@10.0.0.7/reminders?sslmode=prefer",
    # verify-ca checks the CA but not the name: any certificate of that CA would do
    "postgresql+asyncpg://reminders:pw@db.example.com/reminders?ssl=verify-ca&sslrootcert={ca}",
    "postgresql+asyncpg://reminders:pw@/reminders?host=127.0.0.1:5432&host=db.example.com:5432",
])
def test_a_remote_database_in_plain_text_is_refused_with_one_line(url: str, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("stand-in")
    with pytest.raises(ValidationError) as refused:
        Settings(database_url=url.format(ca=ca))
    line = setting_error_line(refused.value)
    assert line.startswith("invalid setting DATABASE_URL: PostgreSQL on a non-loopback host") and "\n" not in line
    assert "ssl=verify-full" in line and "ALLOW_INSECURE_TRANSPORT" in line
    assert "pw" not in line, "the password is never repeated"
    assert Settings(database_url=url.format(ca=ca), allow_insecure_transport=True)


@pytest.mark.parametrize("url", [
    "postgresql+asyncpg://reminders:pw@db.example.com/reminders?ssl=verify-full&sslrootcert={ca}",
    "postgresql+asyncpg://reminders:pw@db.example.com/reminders?sslmode=verify-full&sslrootcert={ca}",
    "postgresql+asyncpg://reminders:pw@db.example.com/reminders?ssl=verify-full&sslrootcert=system",
    "postgresql+asyncpg://reminders:pw@127.0.0.1:5432/reminders",
    "postgresql+asyncpg://reminders:pw@localhost/reminders",
    "postgresql+asyncpg://reminders:pw@[::1]/reminders",
    "postgresql+asyncpg://reminders@/reminders?host=/var/run/postgresql",
    "sqlite+aiosqlite:///./reminders.db",
])
def test_verified_tls_loopback_sockets_and_sqlite_are_accepted(url: str, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("stand-in")
    assert Settings(database_url=url.format(ca=ca))


@pytest.mark.parametrize(("query", "words"), [
    ("ssl=verify-full&sslrootcert=/no/such/ca.crt", "sslrootcert /no/such/ca.crt: file not found"),
    ("ssl=verify-full", "needs the CA that signed the server's certificate"),
    ("ssl=verify_full", "is not one of"),
    ("ssl=require&sslmode=verify-full", "disagree"),
    ("ssl=require&sslrootcert=/etc/hosts", "sslrootcert needs ssl=verify-full"),
])
def test_tls_parameters_that_cannot_work_are_refused(query: str, words: str, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt
    with pytest.raises(ValidationError) as refused:
        Settings(database_url=f"postgresql+asyncpg://reminders@db.example.com/reminders?{query}")
    line = setting_error_line(refused.value)
    assert line.startswith("invalid setting DATABASE_URL: ") and words in line, line


def test_reminders_migrate_refuses_a_plain_text_remote_database_before_connecting() -> None:
    """As an operator sees it: one line naming DATABASE_URL, exit 2, no connection attempt (the
    host does not exist: trying it would say so)."""
    env = {**os.environ, "DATABASE_URL": "postgresql+asyncpg://reminders:pw@db.reminders.invalid/reminders"}
    env.pop("ALLOW_INSECURE_TRANSPORT", None)
    result = subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and "invalid setting DATABASE_URL:" in result.stderr


def test_the_tls_parameters_reach_asyncpg_as_connect_arguments(tmp_path: Path) -> None:
    """libpq's names would be unknown keywords to asyncpg.connect: they leave the URL."""
    url, args = connect_options("postgresql+asyncpg://u:pw@h/db?sslmode=verify-full&sslrootcert=/etc/ssl/certs/"
                                "ca-certificates.crt&prepared_statement_cache_size=0")
    assert dict(url.query) == {"prepared_statement_cache_size": "0"} and url.password == "pw"
    assert args["ssl"].check_hostname and args["ssl"].verify_mode.name == "CERT_REQUIRED"
    url, args = connect_options("postgresql+asyncpg://u@h/db?ssl=verify-full")
    assert args == {"ssl": "verify-full"} and not url.query
    assert connect_options("postgresql+asyncpg://u@127.0.0.1/db")[1] == {}
    assert connect_options("sqlite+aiosqlite:///x.db")[1] == {}


# --- against a real PostgreSQL with TLS ------------------------------------------------------------------


@pytest.mark.parametrize("query", ["ssl=verify-full&sslrootcert={ca}", "sslmode=verify-full&sslrootcert={ca}",
                                   "ssl=verify-full"])
def test_verify_full_connects_with_the_ca_it_is_given(tls_postgres: TlsPostgres, query: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # the last: the CA from PGSSLROOTCERT, asyncpg's own variable
    monkeypatch.setenv("PGSSLROOTCERT", str(tls_postgres.ca))
    url = tls_postgres.url(query.format(ca=tls_postgres.ca))
    assert Settings(database_url=url)
    assert asyncio.run(_tls_in_use(url)) is True


def test_a_server_the_ca_did_not_sign_or_another_name_is_refused(tls_postgres: TlsPostgres,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    with pytest.raises(OSError, match="certificate verify failed"):
        asyncio.run(_tls_in_use(tls_postgres.url(f"ssl=verify-full&sslrootcert={tls_postgres.other_ca}")))
    # `localhost` is not a name the certificate carries: verify-full refuses, verify-ca would not
    with pytest.raises(OSError, match="Hostname mismatch|doesn't match"):
        asyncio.run(_tls_in_use(tls_postgres.url(f"ssl=verify-full&sslrootcert={tls_postgres.ca}", host="localhost")))
    assert asyncio.run(_tls_in_use(tls_postgres.url(f"ssl=verify-ca&sslrootcert={tls_postgres.ca}",
                                                    host="localhost"))) is True


def test_migrations_run_over_verified_tls(tls_postgres: TlsPostgres) -> None:
    """`reminders migrate` (the service's engine hands Alembic its connection) and Alembic's own
    env.py engine (`alembic upgrade` from a shell) both take the URL's TLS parameters."""
    server = tls_postgres.server
    query = f"sslmode=verify-full&sslrootcert={tls_postgres.ca}"
    by_cli = tls_postgres.url(query, database=server.create_database("migrated_by_cli").rsplit("/", 1)[1])
    env = {**os.environ, "DATABASE_URL": by_cli}
    result = subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    by_alembic = tls_postgres.url(query, database=server.create_database("migrated_by_alembic").rsplit("/", 1)[1])
    command.upgrade(alembic_config(by_alembic), "head")

    async def at_head(url: str) -> None:
        db = Database(url, pool_size=1)
        try:
            await db.check_schema()
        finally:
            await db.dispose()

    for url in (by_cli, by_alembic):
        asyncio.run(at_head(url))
