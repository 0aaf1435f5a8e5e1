"""Chaos in Telnyx mode, short form: the faults that hit Dials in flight, over real processes
(harness/chaos_telnyx.py). Measures: every reminder's message heard exactly once, no miss, extra
calls silent and bounded by the attempts nobody settled. `python -m harness.chaos_telnyx` runs all
scenarios, larger."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import pytest

from harness.chaos import ChaosConfig, Result, keep_other_sections
from harness.chaos_telnyx import SECTION_HEADING, TelnyxClusterPool, write_section
from harness.chaos_twilio import LEASE_TTL
from harness.chaos_twilio import SECTION_HEADING as TWILIO_HEADING
from harness.chaos_twilio import write_section as write_twilio

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


def test_the_telnyx_section_is_replaced_in_place_beside_twilio(tmp_path) -> None:
    report = tmp_path / "RELIABILITY.md"
    report.write_text("# Reliability\n\n## Result\n\ngeneric table\n")
    runs = [Result(scenario="leader-sigkill", reminders=5, posts=5, calls=5)]
    write_section(report, "first telnyx run", CONFIG, 1, runs)
    write_twilio(report, "twilio run", CONFIG, 1, runs)
    write_section(report, "second telnyx run", CONFIG, 1, runs)
    text = report.read_text()
    assert text.count(SECTION_HEADING) == 1 and "second telnyx run" in text and "first telnyx run" not in text
    assert TWILIO_HEADING in text and "twilio run" in text and "generic table" in text
    rewritten = keep_other_sections("# Reliability\n\n## Result\n\nnew generic table\n", text)
    assert SECTION_HEADING in rewritten and TWILIO_HEADING in rewritten and "new generic table" in rewritten
