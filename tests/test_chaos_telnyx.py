"""Chaos in Telnyx mode, short form: the faults that hit Dials in flight, over real processes
(harness/chaos_telnyx.py). Measures: every reminder's message heard exactly once, no miss, extra
calls silent and bounded by the attempts nobody settled. `python -m harness.chaos_telnyx` runs all
scenarios, larger."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import pytest

from harness.chaos import ChaosConfig
from harness.chaos_telnyx import TelnyxClusterPool
from harness.chaos_twilio import LEASE_TTL

pytestmark = [pytest.mark.slow]

IN_CI = os.environ.get("CI", "").lower() == "true"
CONFIG = replace(ChaosConfig(), reminders=150, lease_ttl=LEASE_TTL)


@pytest.fixture(scope="module")
def pool() -> Iterator[TelnyxClusterPool]:
    pool = TelnyxClusterPool(CONFIG)
    try:
        pool.get()
    except (FileNotFoundError, RuntimeError, TimeoutError) as error:
        pool.discard()
        if IN_CI:
            pytest.fail(f"chaos cluster unavailable: {error}", pytrace=False)
        pytest.skip(f"chaos cluster unavailable: {error}")
    yield pool
    pool.close()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("scenario", ["leader-sigkill", "leader-sigstop", "provider-outage"])
def test_every_message_heard_exactly_once_under(pool: TelnyxClusterPool, scenario: str) -> None:
    result = pool.run(scenario)
    print(f"\n{result.line()}")
    assert result.ok, "\n".join(["", *result.violations, "", result.evidence])
    assert result.reminders == CONFIG.reminders and result.duplicates == 0 and result.misses == 0
