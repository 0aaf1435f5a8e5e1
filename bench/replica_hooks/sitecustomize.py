"""Loaded at start by every Python process with this folder on PYTHONPATH: the replicas that
`python -m bench provider` starts. With BENCH_STATEMENTS=1 it installs bench/statements.py's
counters (database statements per route) before the service is imported."""

import os

if os.environ.get("BENCH_STATEMENTS") == "1":
    from bench.statements import install

    install()
