"""The chaos scenarios in the real-provider modes, Twilio and Telnyx: the same faults, measured by
what a real provider allows.

Neither provider has an idempotency key, so "one call per key" cannot be the measure. What is
checked after every run (`verify_heard_once`), with every callee answering:

* every reminder is `sent` with outcome `answered`, and its bound call is one of its calls that
  heard the message;
* **messages heard per reminder is exactly 1** (a double message and a miss are both violations);
* **extra calls** (calls beyond one per reminder) are counted; none of them heard a word, and they
  stay within the attempts whose result their sender never recorded (in doubt, or in flight when
  it died);
* no create came from a replica before it first led, nor from a resumed leader after SIGCONT;
* every replica is ready again, every call is over.

The cluster: the provider's fake (≈ 300 ms per REST request; `LEASE_TTL` 5 s), its webhooks
through a proxy that strips PUBLIC_URL's path prefix, each reminder its own number. What differs
is the provider (`MODES`): Twilio's calls leave a queue at its rate; Telnyx refuses Dials over its
rate (429, code 90103), speech is a command sent after `call.answered` (a replica killed between
binding and speaking leaves the event unacknowledged: Telnyx delivers it again), and an in-doubt
Dial is reconciled through the connection's active calls and their `client_state`. The fakes
share their inspection shape, so one check serves both.

`python -m harness.chaos_providers [--provider twilio|telnyx]` runs the scenarios and writes each
mode's section of RELIABILITY.md (after `python -m harness.chaos`, which writes the rest);
`tests/test_chaos_providers.py` runs a short form.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .chaos import (
    SCENARIOS,
    ChaosConfig,
    ClusterPool,
    Fault,
    Result,
    open_reminders,
    posts_outside_terms,
    run_rounds,
    settle,
    wait_burst,
    window_terms,
)
from .cluster import Cluster, wait_for

__all__ = [
    "LEASE_TTL", "MODES", "PROVIDER_SCENARIOS", "ProviderClusterPool", "ProviderMode", "provider_chaos_cluster",
    "run_provider_scenario", "verify_heard_once", "write_section",
]

ROOT = Path(__file__).resolve().parents[1]
# Every call brings five signed webhooks (four status events and the voice request) through the
# proxy: at the chaos suite's rates that load ends terms on a 2-core machine at LEASE_TTL=2.
LEASE_TTL = 5
RECONCILE_GRACE = "5s"


@dataclass(frozen=True)
class ProviderMode:
    """What one real provider's chaos runs differ by: the fake's rate, the replicas' own settings,
    and how its section of RELIABILITY.md describes the mode and what its runs found."""

    provider: str  # the cluster's telephony_provider
    title: str
    calls_per_second: float  # the fake's rate: Twilio's queue drains at it, Telnyx refuses Dials over it
    fake: str  # the section's words for the fake: {latency_ms}, {calls_per_second}
    findings: str  # what the runs in this mode found, and what was fixed
    env: Mapping[str, str] = field(default_factory=dict)  # the replicas' settings of this mode

    @property
    def heading(self) -> str:
        return f"## {self.title} mode: every message heard exactly once"

    def cluster_env(self, config: ChaosConfig) -> dict[str, str]:
        return {**config.env(), "RECONCILE_GRACE": RECONCILE_GRACE, **self.env}


MODES = {
    "twilio": ProviderMode(
        "twilio", "Twilio", 50.0,  # the fake's queue: a burst of hundreds of calls waits seconds in it
        fake="the Twilio-shaped fake ({latency_ms:.0f} ms per REST request, calls leave its queue at "
             "{calls_per_second:g} per second, every callee answers), webhooks",
        findings="""What the Twilio-mode runs found, and what was fixed: a successor's fence raise waited behind a
leader frozen inside a claim (the raise now ends that session after 2 s: leader-sigstop); the
attempt record locked the fence row per attempt (now it only reads it); a database error in the
middle of a reminder's call left it `dispatching` until the two-minute stale-claim sweep (now it is
looked at again after 2 s: provider-outage); calls answered during a 1-2 s PostgreSQL restart were
hung up without their message (the voice webhook now keeps trying for 8 s: postgres-restart).
Lateness here is CPU: every call also brings five signed webhooks through the proxy to the
replicas, on the same 2 cores.""",
    ),
    # Telnyx's default Dial rate per connection; the replicas' CALLS_PER_SECOND matches it, as an
    # operator would set it, so the fake's 429s come at the edges of a burst and in the outage.
    "telnyx": ProviderMode(
        "telnyx", "Telnyx", 30.0,
        fake="the Telnyx-shaped fake ({latency_ms:.0f} ms per REST request, Dials over {calls_per_second:g} per "
             "second refused with 429 / 90103, every callee answering, speech a command after `call.answered`), "
             "signed events",
        findings="""What the Telnyx-mode runs found, and what was fixed: a call answered while its `call.answered`
event sat on a frozen (SIGSTOP) or overloaded replica could be hung up by a callee tired of the
silence before the redelivery spoke; the reminder was then bound to a call that never spoke (a
miss). Now the outcome `answered` comes with the speech, and the leader's sweep releases a bound
call that ended unheard, for a new call. A speak refused because the call had ended was answered
503, which held up that call's hangup event behind the redeliveries; it is acknowledged now.""",
        env={"CALLS_PER_SECOND": "30"},
    ),
}


def number(index: int) -> str:
    """Reminder `index`'s own number: one the API takes (a valid San Francisco number)."""
    return f"+1415{2_000_000 + index:07d}"


def provider_chaos_cluster(mode: ProviderMode, config: ChaosConfig, **options: Any) -> Cluster:
    return Cluster(3, own_postgres=True, provider_latency_ms=config.latency_ms,
                   lease_ttl=max(config.lease_ttl, LEASE_TTL), env=mode.cluster_env(config),
                   telephony_provider=mode.provider, fake_calls_per_second=mode.calls_per_second, fake_ring_ms=100,
                   watch_leaders=True, **options)


def real_provider_outage(cluster: Cluster, config: ChaosConfig, total: int) -> Fault:
    """The provider refuses creates with 429 (nothing created), then answers 500 after creating the
    call (every create in doubt), then hangs (client timeouts; the calls are created once it
    answers), a stretch each; every reminder must still be heard exactly once."""
    assert cluster.provider is not None
    client = cluster.provider.client
    cluster.leader()
    wait_burst(cluster, total, min(config.trigger, 0.2))
    fault = Fault(started=time.time(), expected_term_ends=0)
    fault.in_flight = cluster.reminder_statuses()["dispatching"]
    stretch = max(5, total // 20)

    def answered(status: int, at_least: int) -> Any:
        return lambda: sum(p["status"] == status for p in client.requests()) >= at_least or not open_reminders(cluster)

    client.control(reject_rate=1.0)
    wait_for(answered(429, stretch), timeout=30, what=f"{stretch} creates answered 429")
    client.control(reject_rate=0.0, fail_after_create_rate=1.0)
    wait_for(answered(500, stretch), timeout=30, what=f"{stretch} creates answered 500 after creating")
    client.control(fail_after_create_rate=0.0, hang=True)
    hung_from = len(client.requests())
    wait_for(lambda: len(client.requests()) > hung_from + 3 or not open_reminders(cluster), timeout=30,
             what="creates hanging")
    time.sleep(config.telephony_timeout * 2)  # the hang lasts past the client's timeout: in doubt
    client.control(hang=False)
    fault.outage = (fault.started, time.time())
    statuses = Counter(p["status"] for p in client.requests())
    fault.notes.append(f"outage {fault.outage[1] - fault.outage[0]:.1f}s: {statuses[429]}x429 {statuses[500]}x500 "
                       f"after create, hang")
    return fault


PROVIDER_SCENARIOS = {
    **{name: SCENARIOS[name] for name in ("leader-sigkill", "leader-sigstop", "etcd-partition", "etcd-restart",
                                           "postgres-restart", "rolling-restart")},
    "provider-outage": (real_provider_outage, 1.0),
}


def run_provider_scenario(cluster: Cluster, name: str, config: ChaosConfig, **options: Any) -> Result:
    """Recover and clear, seed (each reminder its own number), fault, wait until quiet, verify."""
    scenario, spread_factor = PROVIDER_SCENARIOS[name]
    begun = time.monotonic()
    cluster.recover()
    cluster.clear()
    window_start = time.time()
    cluster.seed_due_reminders(config.reminders, due_in_seconds=1.0, spread_seconds=config.spread * spread_factor,
                               phone=number)
    fault = scenario(cluster, config, config.reminders, **options)
    problems = settle(cluster, config)
    problems += _calls_over(cluster, config)
    result = verify_heard_once(cluster, name, fault, window_start)
    result.violations[:0] = problems
    result.seconds = time.monotonic() - begun
    return result


def _calls_over(cluster: Cluster, config: ChaosConfig) -> list[str]:
    assert cluster.provider is not None
    client = cluster.provider.client

    def over() -> bool:
        # A reminder `sent` without an outcome still has a call to come (Telnyx: a bound call that
        # ended before its message is released and called again).
        if any(r["status"] in ("pending", "dispatching") or (r["status"] == "sent" and r["outcome"] is None)
               for r in cluster.reminders()):
            return False
        return all(c["status"] in ("completed", "canceled", "busy", "no-answer", "failed") for c in client.calls())

    try:
        wait_for(over, timeout=config.settle_timeout, what="every call over", interval=0.2)
    except TimeoutError as error:
        return [str(error)]
    return []


def verify_heard_once(cluster: Cluster, name: str, fault: Fault, window_start: float) -> Result:
    """Messages heard per reminder (exactly 1), extra calls (counted, silent, bounded), outcomes."""
    assert cluster.provider is not None
    rows = {r["id"]: r for r in cluster.reminders()}
    creates = cluster.provider.client.requests()
    calls = cluster.provider.client.calls()
    attempts = cluster.call_attempts()
    terms = window_terms(cluster.terms(), window_start)
    result = Result(scenario=name, reminders=len(rows), posts=len(creates), calls=len(calls), in_flight=fault.in_flight,
                    terms=len(terms))
    result.notes = list(fault.notes)
    bad = result.violations
    bad.extend(_heard_once(result, rows, calls, attempts))

    # Extra calls: silent (checked above: one heard per reminder), bounded by the attempts whose
    # result nobody recorded (in doubt, or left `creating` by a term that ended) or that a
    # reconciliation judged never made. A refused send or a 429 certainly made no call.
    result.redundant = max(0, len(calls) - len(rows))
    unsettled = sum(1 for a in attempts if a["state"] in ("creating", "in_doubt")
                    or (a["state"] == "not_created" and (a["error"] or "").startswith("reconciled"))
                    # Telnyx: a bound call that ended before its message, released for a new call
                    or (a["error"] or "").startswith("released"))
    result.budget = unsettled
    if result.redundant > unsettled:
        bad.append(f"{result.redundant} extra call(s), but only {unsettled} attempt(s) were left unsettled")

    lateness = sorted((r["sent_at"] - r["due_at"]).total_seconds() for r in rows.values() if r["sent_at"])
    if lateness:
        result.max_lateness, result.p50_lateness = lateness[-1], statistics.median(lateness)
    bad.extend(posts_outside_terms(terms, creates, fault, noun="create"))
    return result


def _heard_once(result: Result, rows: dict[str, dict[str, Any]], calls: list[dict[str, Any]],
                attempts: list[dict[str, Any]]) -> list[str]:
    """Violations of "every reminder's message heard exactly once, on its bound call"; counts the
    duplicates and misses into `result`."""
    bad = []
    heard = Counter(c["stamp"].get("r") for c in calls if c["heard"])
    twice = {r: n for r, n in heard.items() if n > 1}
    strangers = set(heard) - set(rows)
    unheard = [r for r in rows if heard[r] == 0]
    result.duplicates = sum(n - 1 for n in twice.values()) + len(strangers)
    if twice:
        bad.append(f"{len(twice)} reminder(s) heard more than once, e.g. {list(twice.items())[:3]}")
    if strangers:
        bad.append(f"messages heard for reminders that do not exist: {sorted(strangers)[:3]}")
    not_answered = [r for r in rows.values() if r["status"] != "sent" or r["outcome"] != "answered"]
    result.misses = len({r["id"] for r in not_answered} | set(unheard))
    if not_answered:
        now = datetime.now(UTC)
        tried: dict[str, list[tuple[str, int, str]]] = {}
        for a in attempts:
            tried.setdefault(a["reminder_id"], []).append((a["state"], a["fencing_token"], (a["error"] or "")[:40]))
        sample = [(r["status"], r["attempts"], round((r["next_attempt_at"] - now).total_seconds(), 1), r["last_error"],
                   r["claimed_by"], r["fence_token"], tried.get(r["id"])) for r in not_answered[:4]]
        bad.append(f"{len(not_answered)} reminder(s) not sent/answered: "
                   f"{dict(Counter((r['status'], r['outcome']) for r in not_answered))}; e.g. (status, attempts, "
                   f"due in s, last error, claimed by, token, attempts) {sample}")
    if unheard:
        bad.append(f"{len(unheard)} reminder(s) never heard, e.g. {unheard[:3]}")
    by_sid = {c["sid"]: c for c in calls}
    wrong_bound = [r["id"] for r in rows.values() if r["bound_call_id"] is not None
                   and not (by_sid.get(r["bound_call_id"], {}).get("heard")
                            and by_sid[r["bound_call_id"]]["stamp"].get("r") == r["id"])]
    if wrong_bound:
        bad.append(f"{len(wrong_bound)} reminder(s) bound to a call that did not speak their message")
    return bad


class ProviderClusterPool(ClusterPool):
    """ClusterPool over a real-provider cluster of `mode`, running `PROVIDER_SCENARIOS`."""

    def __init__(self, config: ChaosConfig, mode: ProviderMode) -> None:
        super().__init__(config)
        self.mode = mode

    def new_cluster(self) -> Cluster:
        return provider_chaos_cluster(self.mode, self.config)

    def run_on(self, cluster: Cluster, name: str, **options: Any) -> Result:
        return run_provider_scenario(cluster, name, self.config, **options)


def provider_table(results: list[Result]) -> str:
    lines = ["| scenario | runs | reminders | creates | calls | messages heard twice | misses "
             "| extra calls (all silent) / attempts left unsettled | max lateness | p50 lateness | leader terms |",
             "|" + "---|" * 11]
    for name in PROVIDER_SCENARIOS:
        runs = [r for r in results if r.scenario == name]
        if not runs:
            continue
        failed = sum(not r.ok for r in runs)
        lines.append(
            f"| {name} | {len(runs)}{f' ({failed} failed)' if failed else ''} | {sum(r.reminders for r in runs)} "
            f"| {sum(r.posts for r in runs)} | {sum(r.calls for r in runs)} | {sum(r.duplicates for r in runs)} "
            f"| {sum(r.misses for r in runs)} | {sum(r.redundant for r in runs)} / {sum(r.budget for r in runs)} "
            f"| {max(r.max_lateness for r in runs):.2f} s | {statistics.median(r.p50_lateness for r in runs):.2f} s "
            f"| {sum(r.terms for r in runs)} |"
        )
    return "\n".join(lines)


def write_section(path: Path, mode: ProviderMode, command: str, config: ChaosConfig, rounds: int,
                  results: list[Result]) -> None:
    """Replace (or append) `mode`'s section of RELIABILITY.md (a `## ` section, which `python -m
    harness.chaos` keeps when it rewrites the rest)."""
    failures = [r for r in results if not r.ok]
    verdict = ("Every run passed every check: every message heard exactly once, no miss, every extra call silent."
               if not failures else f"{len(failures)} run(s) FAILED:\n\n"
               + "\n".join(f"- {r.scenario}: {'; '.join(r.violations)}" for r in failures))
    runs = "\n".join(f"    {r.line()}" for r in results)
    settings = ", ".join(f"`{name}={value}`"
                         for name, value in {**mode.env, "RECONCILE_GRACE": RECONCILE_GRACE}.items())
    fake = mode.fake.format(latency_ms=config.latency_ms, calls_per_second=mode.calls_per_second)
    section = f"""{mode.heading}

`{command}`: the same faults against {fake} through a proxy that strips `PUBLIC_URL`'s path prefix,
each reminder its own number, {settings}; {config.reminders} reminders per run, {rounds} round(s).
{mode.title} has no idempotency key: the measures are *messages heard per reminder* (must be exactly 1:
*messages heard twice* and *misses* must be 0) and *extra calls* (calls beyond one per reminder: counted,
each silent, at most the attempts whose result their sender never recorded). The provider outage here is
{mode.title}'s: 429 (nothing created), 500 after creating the call, and a hang past the client's timeout.

{provider_table(results)}

{verdict}

{mode.findings}

Every run:

{runs}
"""
    replace_section(path, mode.heading, section)


def replace_section(path: Path, heading: str, section: str) -> None:
    """`section` in place of RELIABILITY.md's section under `heading` (which runs to the next `## `
    heading; harness.chaos keeps it there), or appended when there is none."""
    text = path.read_text() if path.exists() else ""
    match = re.search(rf"(?ms)^{re.escape(heading)}$.*?(?=^## |\Z)", text)
    if match:
        text = text[: match.start()] + section + "\n" + text[match.end():].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.chaos_providers`: the scenarios in each real-provider mode asked for (both
    by default, Twilio first), a table and a section of RELIABILITY.md each."""
    parser = argparse.ArgumentParser(prog="python -m harness.chaos_providers",
                                     description="Chaos scenarios in the real-provider modes; writes each mode's "
                                                 "section of RELIABILITY.md.")
    parser.add_argument("--provider", action="append", choices=list(MODES), help="only these (repeatable)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--reminders", type=int, default=300)
    parser.add_argument("--scenario", action="append", choices=list(PROVIDER_SCENARIOS))
    parser.add_argument("--output", default=str(ROOT / "RELIABILITY.md"), help="report file ('-': none)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.reminders < 1:
        parser.error("--rounds and --reminders must be at least 1")
    config = replace(ChaosConfig(), lease_ttl=LEASE_TTL, reminders=args.reminders, spread=max(4.0, args.reminders / 75),
                     settle_timeout=max(90.0, args.reminders / 5))
    command = "python -m harness.chaos_providers " + " ".join(argv if argv is not None else sys.argv[1:])
    ok = True
    for provider in args.provider or list(MODES):
        mode = MODES[provider]
        results = run_rounds(ProviderClusterPool(config, mode), args.scenario or list(PROVIDER_SCENARIOS), args.rounds,
                             label=f" ({provider})")
        ok = ok and all(r.ok for r in results)
        print(f"\n{mode.title} mode\n\n" + provider_table(results), flush=True)
        if args.output != "-":
            write_section(Path(args.output), mode, command.strip(), config, args.rounds, results)
            print(f"\nwritten: {args.output}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
