"""Chaos in the real-provider modes, short form: the faults that hit creates in flight, over real
processes (harness/chaos_providers.py), one cluster per provider. Measures: every reminder's
message heard exactly once, no miss, extra calls silent and bounded by the attempts nobody settled.
`python -m harness.chaos_providers` runs all scenarios, larger."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from harness.chaos import ChaosConfig, Result, keep_other_sections
from harness.chaos_providers import LEASE_TTL, MODES, ProviderClusterPool, write_section
from tests.support.providers import PROVIDERS
from tests.support.requirements import unavailable

CONFIG = replace(ChaosConfig(), reminders=150, lease_ttl=LEASE_TTL)

# Twilio's leader-sigstop is left to `python -m harness.chaos_providers` (make chaos): under the
# whole suite's load the pause stretches to 9-14 s, and a voice request held by the frozen replica
# for longer than the provider waits (15 s) loses that call's message (a Twilio timeout, not a
# double message); in 4 runs on an idle machine it passed every time, in 2 of 4 under `make test`
# it missed 1-4 of 150. Telnyx's speech is a command the sweep repeats: it runs here.
RUNS = [("twilio", "leader-sigkill"), ("twilio", "provider-outage"),
        ("telnyx", "leader-sigkill"), ("telnyx", "leader-sigstop"), ("telnyx", "provider-outage")]


@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest) -> Iterator[ProviderClusterPool]:
    """One cluster per provider (indirect `pool` parameter), the runs of one provider together."""
    pool = ProviderClusterPool(CONFIG, MODES[request.param])
    try:
        pool.get()
    except (FileNotFoundError, RuntimeError, TimeoutError) as error:
        pool.discard()
        unavailable(f"{request.param} chaos cluster", error)
    yield pool
    pool.close()


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize(("pool", "scenario"), RUNS, indirect=["pool"])
def test_every_message_heard_exactly_once_under(pool: ProviderClusterPool, scenario: str) -> None:
    result = pool.run(scenario)
    print(f"\n[{pool.mode.provider}] {result.line()}")
    assert result.ok, "\n".join(["", *result.violations, "", result.evidence])
    assert result.reminders == CONFIG.reminders and result.duplicates == 0 and result.misses == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_mode_section_is_replaced_in_place_beside_the_others(provider: str, tmp_path: Path) -> None:
    mode, (other,) = MODES[provider], [m for name, m in MODES.items() if name != provider]
    report = tmp_path / "RELIABILITY.md"
    report.write_text("# Reliability\n\n## Result\n\ngeneric table\n\n## Bad values\n\nanother author's\n")
    runs = [Result(scenario="leader-sigkill", reminders=5, posts=5, calls=5)]
    write_section(report, mode, "first run", CONFIG, 1, runs)
    write_section(report, other, "the other mode's run", CONFIG, 1, runs)
    write_section(report, mode, "second run", CONFIG, 1, runs)
    text = report.read_text()
    assert text.count(mode.heading) == 1 and "second run" in text and "first run" not in text
    assert other.heading in text and "the other mode's run" in text
    assert "another author's" in text and "generic table" in text
    rewritten = keep_other_sections("# Reliability\n\n## Result\n\nnew generic table\n", text)
    assert mode.heading in rewritten and other.heading in rewritten and "second run" in rewritten
    assert "new generic table" in rewritten
