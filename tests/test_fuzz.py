"""Schemathesis over the OpenAPI of a running replica: stateless and stateful, all checks.

One run per database backend against `reminders serve` as a real process. The seed is fixed
so that CI is repeatable; FUZZ_SEED picks another, FUZZ_EXAMPLES runs longer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.appclient import migrate
from tests.support.replica import serve_replica

pytestmark = pytest.mark.slow  # a replica process and a few hundred requests per backend

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "fuzz-token"


@pytest.fixture
def replica(database_url: str, etcd_endpoint: str, tmp_path: Path, anyio_backend):
    import anyio

    if not database_url.startswith("sqlite"):
        anyio.run(migrate, database_url)
    env = {"DATABASE_URL": database_url, "ETCD_ENDPOINTS": etcd_endpoint, "POD_NAME": "fuzz-replica",
           "API_TOKEN": TOKEN, "API_DOCS": "true"}  # the fuzzers read the document from the replica
    with serve_replica(env, tmp_path) as url:
        yield url


def test_schemathesis_all_checks(replica: str) -> None:
    seed = os.environ.get("FUZZ_SEED", "1")  # the hooks draw from the same seed
    command = [
        str(Path(sys.executable).parent / "st"), "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
        "run", f"{replica}/openapi.json",
        "--checks", "all",
        # DELETE cancels (docs/DESIGN.md): the appointment stays readable as `cancelled`, by design.
        "--exclude-checks", "use_after_free",
        "-H", f"Authorization: Bearer {TOKEN}",
        "--max-examples", os.environ.get("FUZZ_EXAMPLES", "40"),
        "--seed", seed,
        "--workers", "1",  # one order of requests for a seed
        "--no-color",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.support.fuzz_hooks", "PYTHONPATH": str(ROOT),
             "FUZZ_SEED": seed},
    )
    summary = result.stdout[-3000:]
    print(summary)
    assert result.returncode == 0, summary
    assert " passed" in summary and "failure" not in summary.split("Test cases:")[-1]
