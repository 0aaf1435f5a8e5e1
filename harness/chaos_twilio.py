"""The chaos scenarios in Twilio mode: the same faults, measured by what a real provider allows.

Twilio has no idempotency key, so "one call per key" cannot be the measure. What is checked after
every run (`verify_twilio`), with every callee answering:

* every reminder is `sent` with outcome `answered`, and its bound call is one of its calls that
  heard the message;
* **messages heard per reminder is exactly 1** (a double message and a miss are both violations);
* **extra calls** (calls beyond one per reminder) are counted; none of them heard a word, and they
  stay within the attempts whose result their sender never recorded (in doubt, or in flight when
  it died);
* no create came from a replica before it first led, nor from a resumed leader after SIGCONT;
* every replica is ready again, every call is over.

The cluster: the Twilio-shaped fake (≈ 300 ms per REST request, calls leave its queue at
`TWILIO_CPS`; `LEASE_TTL` 5 s), webhooks through a proxy that strips PUBLIC_URL's path prefix, each reminder its
own number. `python -m harness.chaos_twilio` runs the scenarios and writes its section of
RELIABILITY.md (after `python -m harness.chaos`, which writes the rest); `tests/test_chaos_twilio.py`
runs a short form.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .chaos import (
    SCENARIOS,
    ChaosConfig,
    ClusterPool,
    Fault,
    Result,
    _open_reminders,
    _window_terms,
    settle,
    wait_burst,
)
from .cluster import Cluster, wait_for

__all__ = ["TWILIO_SCENARIOS", "TwilioClusterPool", "run_twilio_scenario", "twilio_chaos_cluster", "verify_twilio"]

ROOT = Path(__file__).resolve().parents[1]
TWILIO_CPS = 50.0  # the fake's queue: a burst of hundreds of calls waits seconds in it
# Every call brings five signed webhooks (four status events and the voice request) through the
# proxy: at the chaos suite's rates that load ends terms on a 2-core machine at LEASE_TTL=2.
LEASE_TTL = 5
RECONCILE_GRACE = "5s"
SECTION_HEADING = "## Twilio mode: every message heard exactly once"


def number(index: int) -> str:
    return f"+1415{index:07d}"


def twilio_chaos_cluster(config: ChaosConfig, **options: Any) -> Cluster:
    env = {**config.env(), "RECONCILE_GRACE": RECONCILE_GRACE}
    return Cluster(3, own_postgres=True, provider_latency_ms=config.latency_ms, lease_ttl=max(config.lease_ttl, LEASE_TTL),
                   env=env,
                   telephony_provider="twilio", twilio_calls_per_second=TWILIO_CPS, twilio_ring_ms=100, **options)


def twilio_provider_outage(cluster: Cluster, config: ChaosConfig, total: int) -> Fault:
    """Twilio refuses creates with 429 (nothing created), then answers 500 after creating the call
    (every create in doubt), then hangs (client timeouts; the calls are created once it answers),
    a stretch each; every reminder must still be heard exactly once."""
    assert cluster.provider is not None
    client = cluster.provider.client
    cluster.leader()
    wait_burst(cluster, total, min(config.trigger, 0.2))
    fault = Fault(started=time.time(), expected_term_ends=0)
    fault.in_flight = cluster.reminder_statuses()["dispatching"]
    stretch = max(5, total // 20)

    def answered(status: int, at_least: int) -> Any:
        return lambda: sum(p["status"] == status for p in client.requests()) >= at_least or not _open_reminders(cluster)

    client.control(reject_rate=1.0)
    wait_for(answered(429, stretch), timeout=30, what=f"{stretch} creates answered 429")
    client.control(reject_rate=0.0, fail_after_create_rate=1.0)
    wait_for(answered(500, stretch), timeout=30, what=f"{stretch} creates answered 500 after creating")
    client.control(fail_after_create_rate=0.0, hang=True)
    hung_from = len(client.requests())
    wait_for(lambda: len(client.requests()) > hung_from + 3 or not _open_reminders(cluster), timeout=30,
             what="creates hanging")
    time.sleep(config.telephony_timeout * 2)  # the hang lasts past the client's timeout: in doubt
    client.control(hang=False)
    fault.outage = (fault.started, time.time())
    statuses = Counter(p["status"] for p in client.requests())
    fault.notes.append(f"outage {fault.outage[1] - fault.outage[0]:.1f}s: {statuses[429]}x429 {statuses[500]}x500 "
                       f"after create, hang")
    return fault


TWILIO_SCENARIOS = {
    **{name: SCENARIOS[name] for name in ("leader-sigkill", "leader-sigstop", "etcd-partition", "etcd-restart",
                                           "postgres-restart", "rolling-restart")},
    "provider-outage": (twilio_provider_outage, 1.0),
}


def run_twilio_scenario(cluster: Cluster, name: str, config: ChaosConfig, **options: Any) -> Result:
    """Recover and clear, seed (each reminder its own number), fault, wait until quiet, verify."""
    scenario, spread_factor = TWILIO_SCENARIOS[name]
    begun = time.monotonic()
    cluster.recover()
    cluster.clear()
    window_start = time.time()
    cluster.seed_due_reminders(config.reminders, due_in_seconds=1.0, spread_seconds=config.spread * spread_factor,
                               phone=number)
    fault = scenario(cluster, config, config.reminders, **options)
    problems = settle(cluster, config)
    problems += _calls_over(cluster, config)
    result = verify_twilio(cluster, name, config, fault, window_start)
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


def verify_twilio(cluster: Cluster, name: str, config: ChaosConfig, fault: Fault, window_start: float) -> Result:
    """Messages heard per reminder (exactly 1), extra calls (counted, silent, bounded), outcomes."""
    assert cluster.provider is not None
    rows = {r["id"]: r for r in cluster.reminders()}
    creates = cluster.provider.client.requests()
    calls = cluster.provider.client.calls()
    attempts = cluster.call_attempts()
    terms = _window_terms(cluster.terms(), window_start)
    result = Result(scenario=name, reminders=len(rows), posts=len(creates), calls=len(calls), in_flight=fault.in_flight,
                    terms=len(terms))
    result.notes = list(fault.notes)
    bad = result.violations

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

    first_lead: dict[str, float] = {}
    for term in terms:
        first_lead.setdefault(term.replica, term.started)
    for create in creates:
        started = first_lead.get(create["placed_by"])
        if started is None or create["received_at"] < started - 0.01:
            bad.append(f"create from {create['placed_by']} at {create['received_at']:.3f}, which had not led by then")
            break
    for replica, after in fault.silent_after.items():
        late = [p for p in creates if p["placed_by"] == replica and p["received_at"] >= after]
        if late:
            bad.append(f"{replica} sent {len(late)} create(s) after it resumed")
    return result


class TwilioClusterPool(ClusterPool):
    """ClusterPool over a Twilio-mode cluster."""

    def get(self) -> Cluster:
        if self.cluster is None:
            cluster = twilio_chaos_cluster(self.config)
            try:
                cluster.start()
            except BaseException:
                cluster.close(graceful=False)
                raise
            self.cluster = cluster
        return self.cluster

    def run(self, name: str, **options: Any) -> Result:
        cluster = self.get()
        try:
            result = run_twilio_scenario(cluster, name, self.config, **options)
        except Exception as error:  # noqa: BLE001 - a broken run is a failed run
            result = Result(scenario=name, violations=[f"{type(error).__name__}: {error}"])
        if not result.ok:
            from .chaos import evidence

            result.evidence = evidence(cluster)
            self.discard(keep_logs=True)
            result.notes.append(f"logs kept in {self.kept[-1]}")
        return result


def twilio_table(results: list[Result]) -> str:
    lines = ["| scenario | runs | reminders | creates | calls | messages heard twice | misses "
             "| extra calls (all silent) / attempts left unsettled | max lateness | p50 lateness | leader terms |",
             "|" + "---|" * 11]
    for name in TWILIO_SCENARIOS:
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


def write_section(path: Path, command: str, config: ChaosConfig, rounds: int, results: list[Result]) -> None:
    """Replace (or append) the Twilio-mode section of RELIABILITY.md (a `## ` section, which
`python -m harness.chaos` keeps when it rewrites the rest)."""
    failures = [r for r in results if not r.ok]
    verdict = ("Every run passed every check: every message heard exactly once, no miss, every extra call silent."
               if not failures else f"{len(failures)} run(s) FAILED:\n\n"
               + "\n".join(f"- {r.scenario}: {'; '.join(r.violations)}" for r in failures))
    runs = "\n".join(f"    {r.line()}" for r in results)
    section = f"""{SECTION_HEADING}

`{command}`: the same faults against the Twilio-shaped fake ({config.latency_ms:.0f} ms per REST request, calls
leave its queue at {TWILIO_CPS:g} per second, every callee answers), webhooks through a proxy that strips
`PUBLIC_URL`'s path prefix, each reminder its own number, `RECONCILE_GRACE={RECONCILE_GRACE}`; {config.reminders}
reminders per run, {rounds} round(s). Twilio has no idempotency key: the measures are *messages heard per
reminder* (must be exactly 1: *messages heard twice* and *misses* must be 0) and *extra calls* (calls beyond one
per reminder: counted, each silent, at most the attempts whose result their sender never recorded). The
provider outage here is Twilio's: 429 (nothing created), 500 after creating the call, and a hang past the
client's timeout.

{twilio_table(results)}

{verdict}

What the Twilio-mode runs found, and what was fixed: a successor's fence raise waited behind a
leader frozen inside a claim (the raise now ends that session after 2 s: leader-sigstop); the
attempt record locked the fence row per attempt (now it only reads it); a database error in the
middle of a reminder's call left it `dispatching` until the two-minute stale-claim sweep (now it is
looked at again after 2 s: provider-outage); calls answered during a 1-2 s PostgreSQL restart were
hung up without their message (the voice webhook now keeps trying for 8 s: postgres-restart).
Lateness here is CPU: every call also brings five signed webhooks through the proxy to the
replicas, on the same 2 cores.

Every run:

{runs}
"""
    replace_section(path, SECTION_HEADING, section)


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


def provider_mode_main(
    mode: str,
    scenarios: Mapping[str, Any],
    pool: Callable[[ChaosConfig], ClusterPool],
    write: Callable[[Path, str, ChaosConfig, int, list[Result]], None],
    argv: list[str] | None,
) -> int:
    """`python -m harness.chaos_<mode>`: the scenarios in a real-provider mode, a table, its section."""
    parser = argparse.ArgumentParser(prog=f"python -m harness.chaos_{mode}",
                                     description=f"Chaos scenarios in {mode.title()} mode; writes its section of "
                                                 "RELIABILITY.md.")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--reminders", type=int, default=300)
    parser.add_argument("--scenario", action="append", choices=list(scenarios))
    parser.add_argument("--output", default=str(ROOT / "RELIABILITY.md"), help="report file ('-': none)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.reminders < 1:
        parser.error("--rounds and --reminders must be at least 1")
    config = replace(ChaosConfig(), lease_ttl=LEASE_TTL, reminders=args.reminders, spread=max(4.0, args.reminders / 75),
                     settle_timeout=max(90.0, args.reminders / 5))
    command = f"python -m harness.chaos_{mode} " + " ".join(argv if argv is not None else sys.argv[1:])
    results: list[Result] = []
    clusters = pool(config)
    try:
        for round_no in range(1, args.rounds + 1):
            for name in args.scenario or list(scenarios):
                options = {"mode": "immediate" if round_no % 2 else "fast"} if name == "postgres-restart" else {}
                result = clusters.run(name, **options)
                results.append(result)
                print(f"round {round_no} ({mode}): {result.line()}", flush=True)
                for violation in result.violations:
                    print(f"    VIOLATION: {violation}", flush=True)
                if result.evidence:
                    print(result.evidence, flush=True)
    finally:
        clusters.close()
    print("\n" + twilio_table(results), flush=True)
    if args.output != "-":
        write(Path(args.output), command.strip(), config, args.rounds, results)
        print(f"\nwritten: {args.output}", flush=True)
    return 0 if all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    return provider_mode_main("twilio", TWILIO_SCENARIOS, TwilioClusterPool, write_section, argv)


if __name__ == "__main__":
    sys.exit(main())
