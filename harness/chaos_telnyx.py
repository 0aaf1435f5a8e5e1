"""The chaos scenarios in Telnyx mode: Twilio mode's faults and measures (harness/chaos_twilio.py)
against the Telnyx-shaped fake.

The measures are the same, checked by `verify_twilio` (the fakes share their inspection shape):
*messages heard per reminder* must be exactly 1, *extra calls* are counted, each silent and within
the attempts nobody settled; every reminder `sent` with outcome `answered`. What differs is the
provider: Dials over its rate are refused (429, code 90103) instead of queued, speech is a command
sent after `call.answered` (a replica killed between binding and speaking leaves the event
unacknowledged: Telnyx delivers it again), and an in-doubt Dial is reconciled through the
connection's active calls and their `client_state`.

`python -m harness.chaos_telnyx` runs the scenarios and writes its section of RELIABILITY.md
(after `python -m harness.chaos` and `python -m harness.chaos_twilio`, which write theirs);
`tests/test_chaos_telnyx.py` runs a short form.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .chaos import ChaosConfig, Result
from .chaos_twilio import (
    LEASE_TTL,
    RECONCILE_GRACE,
    TWILIO_SCENARIOS,
    TwilioClusterPool,
    provider_mode_main,
    replace_section,
    twilio_table,
)
from .cluster import Cluster

__all__ = ["TELNYX_SCENARIOS", "TelnyxClusterPool", "telnyx_chaos_cluster"]

ROOT = Path(__file__).resolve().parents[1]
# Telnyx's default Dial rate per connection; the replicas' CALLS_PER_SECOND matches it, as an
# operator would set it, so the fake's 429s come at the edges of a burst and in the outage.
TELNYX_DIALS_PER_SECOND = 30.0
# The same faults; "provider-outage" is 429 (nothing created), 500 after creating, then a hang.
TELNYX_SCENARIOS = TWILIO_SCENARIOS
SECTION_HEADING = "## Telnyx mode: every message heard exactly once"


def telnyx_chaos_cluster(config: ChaosConfig, **options: Any) -> Cluster:
    env = {**config.env(), "RECONCILE_GRACE": RECONCILE_GRACE, "CALLS_PER_SECOND": str(TELNYX_DIALS_PER_SECOND)}
    return Cluster(3, own_postgres=True, provider_latency_ms=config.latency_ms,
                   lease_ttl=max(config.lease_ttl, LEASE_TTL), env=env, telephony_provider="telnyx",
                   twilio_calls_per_second=TELNYX_DIALS_PER_SECOND, twilio_ring_ms=100, **options)


class TelnyxClusterPool(TwilioClusterPool):
    """The Twilio-mode pool over a Telnyx-mode cluster (same scenarios, same verification)."""

    def get(self) -> Cluster:
        if self.cluster is None:
            cluster = telnyx_chaos_cluster(self.config)
            try:
                cluster.start()
            except BaseException:
                cluster.close(graceful=False)
                raise
            self.cluster = cluster
        return self.cluster


def write_section(path: Path, command: str, config: ChaosConfig, rounds: int, results: list[Result]) -> None:
    """Replace (or append) the Telnyx-mode section of RELIABILITY.md (a `## ` section, which
    `python -m harness.chaos` keeps when it rewrites the rest)."""
    failures = [r for r in results if not r.ok]
    verdict = ("Every run passed every check: every message heard exactly once, no miss, every extra call silent."
               if not failures else f"{len(failures)} run(s) FAILED:\n\n"
               + "\n".join(f"- {r.scenario}: {'; '.join(r.violations)}" for r in failures))
    runs = "\n".join(f"    {r.line()}" for r in results)
    section = f"""{SECTION_HEADING}

`{command}`: the same faults against the Telnyx-shaped fake ({config.latency_ms:.0f} ms per REST request,
Dials over {TELNYX_DIALS_PER_SECOND:g} per second refused with 429 / 90103, every callee answering, speech a
command after `call.answered`), signed events through a proxy that strips `PUBLIC_URL`'s path prefix, each
reminder its own number, `CALLS_PER_SECOND={TELNYX_DIALS_PER_SECOND:g}`, `RECONCILE_GRACE={RECONCILE_GRACE}`;
{config.reminders} reminders per run, {rounds} round(s). The measures are Twilio mode's: *messages heard per
reminder* (exactly 1) and *extra calls* (counted, each silent, at most the attempts nobody settled). The provider
outage: 429 (nothing created), 500 after creating the call, a hang past the client's timeout.

{twilio_table(results)}

{verdict}

What the Telnyx-mode runs found, and what was fixed: a call answered while its `call.answered`
event sat on a frozen (SIGSTOP) or overloaded replica could be hung up by a callee tired of the
silence before the redelivery spoke; the reminder was then bound to a call that never spoke (a
miss). Now the outcome `answered` comes with the speech, and the leader's sweep releases a bound
call that ended unheard, for a new call. A speak refused because the call had ended was answered
503, which held up that call's hangup event behind the redeliveries; it is acknowledged now.

Every run:

{runs}
"""
    replace_section(path, SECTION_HEADING, section)


def main(argv: list[str] | None = None) -> int:
    return provider_mode_main("telnyx", TELNYX_SCENARIOS, TelnyxClusterPool, write_section, argv)


if __name__ == "__main__":
    sys.exit(main())
