"""A throwaway PostgreSQL cluster from the machine's binaries (`pg_config --bindir`).

As root, initdb refuses to run, so the cluster is created and run as the `postgres` user in a
directory of its own (every parent needs o+x, hence `tempfile.mkdtemp` and not pytest's tmp).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from .ports import free_port, wait_for_port


def find_bindir() -> Path | None:
    """Directory holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """initdb + pg_ctl into a temp dir; fsync off; trust auth for user `postgres`."""

    def __init__(self, *, port: int | None = None, settings: dict[str, str] | None = None) -> None:
        """`settings`: more `-c name=value` server settings (e.g. ssl=on with its files in `base`)."""
        bindir = find_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries not found (pg_config --bindir)")
        self.bindir = bindir
        self.port = port or free_port()
        self.base = tempfile.mkdtemp(prefix="pg-")
        os.chmod(self.base, 0o755)
        self.data_dir = os.path.join(self.base, "data")
        self.log_path = os.path.join(self.base, "postgres.log")
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            entry = pwd.getpwnam("postgres")
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self._initialised = False
        self.settings = dict(settings or {})

    @property
    def group_id(self) -> int:
        """The group the server runs as (files it must read but not own: a key owned by root)."""
        return pwd.getpwnam(self._user).pw_gid if self._user else os.getgid()

    @property
    def url(self) -> str:
        """SQLAlchemy async URL of the `postgres` database."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def own(self, path: str | Path, mode: int) -> None:
        """Give a file the server will read (a key, a certificate) to the user it runs as."""
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(path, mode)

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            user=self._user,
            # the user's own group, not root's: the server reads files given to that group
            group=self.group_id if self._user else None,
            extra_groups=[] if self._user else None,
            check=False,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}")

    def start(self) -> PostgresServer:
        if not self._initialised:
            self._run("initdb", "-D", self.data_dir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
            self._initialised = True
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        ) + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        try:
            self._run("pg_ctl", "-D", self.data_dir, "-o", options, "-l", self.log_path, "-w", "start")
        except RuntimeError as error:
            log = Path(self.log_path).read_text(errors="replace")[-2000:] if os.path.exists(self.log_path) else ""
            raise RuntimeError(f"{error}\n{log}") from None
        wait_for_port(self.port)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; mode `immediate` is a crash."""
        if os.path.exists(os.path.join(self.data_dir, "postmaster.pid")):
            self._run("pg_ctl", "-D", self.data_dir, "-m", mode, "-w", "stop")

    def sql(self, statement: str) -> None:
        """One statement as the superuser over the Unix socket (whatever pg_hba.conf asks of TCP)."""
        self._run("psql", "-h", self.base, "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                  "-v", "ON_ERROR_STOP=1", "-c", statement)

    def create_database(self, name: str) -> str:
        """Create database `name`; return its SQLAlchemy async URL."""
        self._run("psql" if (self.bindir / "psql").exists() else "createdb", *self._create_args(name))
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def _create_args(self, name: str) -> list[str]:
        if (self.bindir / "psql").exists():
            return ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                    "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{name}"']
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name]

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
