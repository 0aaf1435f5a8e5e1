"""BENCHMARKS.md, regenerated from bench/results/*.json at the end of every bench run.

Every figure in it, in the tables and in the prose alike, is rendered from the results (or computed
from them: ratios, shares, comparisons, the verdicts against TARGETS); the paragraphs on what
limits each figure come from profiling done while building the benchmarks (py-spy and cProfile)
and are kept here, next to the numbers they explain, with their numbers taken from the results
they cite. A figure with no source in the results is not written (tests/test_bench_report.py
renders the file from results with every number changed and fails on a figure that did not move).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import ROOT, read_result
from .common import machine as machine_info

OUT = ROOT / "BENCHMARKS.md"

# What the results are judged against (the issues' targets), the only figures typed here.
TARGETS: dict[str, float] = {
    "calls_per_s": 2000,  # dispatch with the fastest provider: end-to-end calls/s, at least
    "ceiling_ratio": 0.5,  # … and at least this × the provider's own ceiling
    "all_sent_s": 10,  # dispatch with the slowest provider: commit → all sent, at most
    "peak_rss_mb": 200,  # the replica's peak RSS while dispatching, at most
    "graceful_s": 0.2,  # graceful failover, the median per TTL, at most
    "sigkill_over_ttl_s": 0.5,  # SIGKILL failover: every run within TTL + this
    "growth_graceful_s": 0.05,  # 3 → 50 candidates: "no growth" within this (graceful) …
    "growth_s": 0.5,  # … or this (lease-bound scenarios)
    "floor_ratio": 0.5,  # API: the replica at least this × its floor …
    "errors": 0,  # … with at most this many errors
    "events_stalled_ratio": 0.9,  # dispatch while the events receiver hangs: at least this × without delivery
    "webhook_get_ratio": 3,  # issue 26: the replicas' CPU per webhook, at most this × per GET /appointments/{id} …
    "call_extra_gets": 2,  # … and per call at most (webhooks per call + this) × per GET
    "webhook_floor_ratio": 0.5,  # issue 26: every webhook route at least this × its floor's requests/s
}

# The results BENCHMARKS.md is rendered from (bench/results/<name>.json), in the header's order.
RESULT_NAMES = ("dispatch", "api", "profile", "profile_before", "failover", "micro", "dispatch_before",
                "dispatch_client_before", "dispatch_previous_host", "failover_before", "dispatch_events",
                "provider_twilio", "provider_telnyx", "provider_twilio_before", "provider_telnyx_before", "webhooks")
_HEADER_LABELS = {"dispatch": "dispatch", "api": "api", "profile": "profile", "profile_before": "profile, before",
                  "failover": "failover", "micro": "micro", "dispatch_previous_host": "dispatch, previous host",
                  "failover_before": "failover, before the revoke fix", "dispatch_events": "dispatch with events",
                  "provider_twilio": "provider, Twilio mode", "provider_telnyx": "provider, Telnyx mode",
                  "provider_twilio_before": "provider, Twilio mode, before issue 26's changes",
                  "provider_telnyx_before": "provider, Telnyx mode, before issue 26's changes"}
# (the webhook routes' section names its command, day, commit and machine itself: `_webhooks`)
PROVIDER_RESULTS = {"provider_twilio": "Twilio", "provider_telnyx": "Telnyx"}

# How many packages the profile tables show of those the profile recorded (a choice of the table).
TOP_PACKAGES = 5

Add = Callable[[str], None]


def _n(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        text = f"{value:,.{digits}f}"
    else:
        text = str(value)
    return f"{text}{unit}"


def _g(value: float) -> str:
    """A target as written: 2,000 / 0.5 / 10."""
    return format(value, ",g")


def _pct(share: float) -> str:
    """0.487 → "49 %"."""
    return f"{share * 100:.0f} %"


def _ok(flag: bool | None) -> str:
    return "–" if flag is None else ("**met**" if flag else "**missed**")


def _span(fig: dict[str, Any] | None, digits: int = 3) -> str:
    if not fig or fig.get("median") is None:
        return "–"
    return f"{fig['median']:.{digits}f} [{fig['min']:.{digits}f}–{fig['max']:.{digits}f}] (n={fig['n']})"


def _conditions(result: dict[str, Any]) -> str:
    c = result.get("conditions", {})
    b, a = c.get("before", {}), c.get("after", {})
    return (f"load average {b.get('loadavg', ['?'])[0]} → {a.get('loadavg', ['?'])[0]}, "
            f"calibration {b.get('calibration_s', '?')} s → {a.get('calibration_s', '?')} s")


def _spread(fig: dict[str, Any], key: str, digits: int = 0, unit: str = "") -> str:
    """ "1,196" for one run, "1,196 [1,020–1,250] (n=3)" for the median of several."""
    values = [v for v in fig.get(f"{key}_all") or [] if v is not None]
    if len(values) < 2:
        return _n(fig.get(key), digits, unit)
    return f"{_n(fig.get(key), digits, unit)} [{_n(min(values), digits)}–{_n(max(values), digits)}] (n={len(values)})"


def _bare_client(run: dict[str, Any]) -> str:
    bare = run.get("bare_aiohttp_client")
    if not bare:
        return "–"
    return f"{_spread(bare, 'calls_per_s', unit='/s')} ({_n(bare.get('client_cpu_ms_per_call'), 2)} ms CPU per call)"


def _dispatch_runs(result: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    return {run["latency_ms"]: run for run in (result or {}).get("runs", [])}


def fast_and_slow(result: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The dispatch run with the fastest provider and the one with the slowest (None if fewer than two)."""
    runs = _dispatch_runs(result)
    if len(runs) < 2:
        return runs.get(min(runs)) if runs else None, None
    return runs[min(runs)], runs[max(runs)]


def _host(result: dict[str, Any] | None) -> str:
    """The CPU's maker, as the prose names a host: "AMD", "Intel"."""
    cpu = str(((result or {}).get("machine") or {}).get("cpu") or "?")
    return re.sub(r"\((R|TM)\)", "", cpu.split()[0]) if cpu.split() else "?"


def _day(result: dict[str, Any]) -> str:
    return str(result["machine"]["date"])[:10]


def _at_commit(result: dict[str, Any] | None, before: str = "", after: str = "") -> str:
    """`before`commit abc1234`after` when the run recorded the commit it ran from, else ""."""
    tree = (result or {}).get("tree") or {}
    if not tree.get("commit"):
        return ""
    return f"{before}commit {tree['commit']}{' with uncommitted changes' if tree.get('dirty') else ''}{after}"


def _cpu_ms_per_reminder(run: dict[str, Any]) -> float | None:
    """The replica's CPU per reminder: cores busy × commit → all sent (observed) ÷ reminders."""
    svc = run.get("service", {})
    cores = svc.get("cores_busy", {}).get("replica")
    wall = svc.get("commit_to_all_sent_observed_s")
    return cores * wall / run["reminders"] * 1000 if cores is not None and wall else None


def _configs(failover: dict[str, Any] | None) -> list[str]:
    """The failover configurations in its figures ("real-3", "inproc-3", …): real ones first, then by size."""
    names: list[str] = []
    for key in (failover or {}).get("figures", {}):
        if (name := key.split("/")[0]) not in names:
            names.append(name)
    return sorted(names, key=lambda name: (not name.startswith("real"), _candidates(name)))


def _candidates(config: str) -> int:
    return int(config.rsplit("-", 1)[1])


def _inproc(failover: dict[str, Any] | None) -> tuple[str, str] | None:
    """The smallest and the largest in-process configuration."""
    inproc = [c for c in _configs(failover) if c.startswith("inproc")]
    return (inproc[0], inproc[-1]) if len(inproc) > 1 else None


def _growth(failover: dict[str, Any], scenario: str) -> list[tuple[int, float, float, bool]]:
    """Per TTL: (ttl, small median, large median, grew) from the smallest to the largest in-process configuration."""
    pair, figures, rows = _inproc(failover), failover.get("figures", {}), []
    if pair is None:
        return rows
    for ttl in failover.get("ttls", []):
        small, large = (figures.get(f"{config}/ttl{ttl}/{scenario}") for config in pair)
        if small and large and small.get("median") is not None and large.get("median") is not None:
            # "no growth": within measurement noise — TARGETS' slack for graceful, lease-bound otherwise
            slack = TARGETS["growth_graceful_s"] if scenario == "graceful" else TARGETS["growth_s"]
            rows.append((ttl, small["median"], large["median"], large["median"] > small["median"] + slack))
    return rows


def load_results() -> dict[str, dict[str, Any] | None]:
    return {name: read_result(name) for name in RESULT_NAMES}


def render(results: dict[str, dict[str, Any] | None]) -> str:
    """BENCHMARKS.md's text for `results` (name → the JSON of bench/results/<name>.json, or None)."""
    lines: list[str] = []
    add = lines.append
    _header(add, results)
    _summary(add, results["dispatch"], results["failover"], results["api"], results.get("dispatch_events"),
             {title: results.get(name) for name, title in PROVIDER_RESULTS.items()})
    if results["dispatch"]:
        _dispatch(add, results["dispatch"], results["dispatch_before"], results["dispatch_client_before"])
    if results.get("dispatch_events"):
        _dispatch_events(add, results["dispatch_events"])
    if results["failover"]:
        _failover(add, results["failover"])
    if results["api"]:
        _api(add, results["api"])
    if results.get("webhooks"):
        _webhooks(add, results["webhooks"])
    if results["profile_before"] or results["profile"]:
        _profiles(add, results["profile_before"], results["profile"])
    providers = {title: results[name] for name, title in PROVIDER_RESULTS.items() if results.get(name)}
    if providers:
        _providers(add, providers, {title: results.get(f"{name}_before") for name, title in PROVIDER_RESULTS.items()})
    if results["micro"]:
        _micro(add, results["micro"])
    _limits(add, results)
    return "\n".join(lines) + "\n"


def write() -> Path:
    """Render BENCHMARKS.md from the committed results; returns its path."""
    OUT.write_text(render(load_results()))
    return OUT


def _calibration_note(results: dict[str, dict[str, Any] | None], nproc: Any) -> str:
    loops = [r["conditions"]["calibration_loop"] for r in results.values()
             if r and r.get("conditions", {}).get("calibration_loop")]
    loop = (f"{_n(loops[0]['additions'])} Python additions (best of {loops[0]['best_of']})" if loops
            else "a fixed loop of Python additions (the best of a few tries)")
    hosts: dict[str, list[float]] = {}
    for result in results.values():
        for side in ("before", "after"):
            value = (result or {}).get("conditions", {}).get(side, {}).get("calibration_s")
            if value is not None:
                hosts.setdefault(_host(result), []).append(value)
    spans = " and ".join(f"{_n(min(v), 3)}–{_n(max(v), 3)} s on the {host} host" for host, v in hosts.items())
    worst = max((max(v) / min(v) for v in hosts.values() if min(v) > 0), default=None)
    moves = (f"the calibrations recorded with these results span {spans}, so absolute figures move by a factor of "
             f"up to {_n(worst, 1)} between runs on one host" if worst else "absolute figures move between runs")
    return (f"*Calibration* = CPU seconds for {loop}, taken before and after each part. This machine's {nproc} "
            f"vCPUs are shared: {moves}; the ratios to the same-run baselines are the figures to compare.")


def _header(add: Add, results: dict[str, dict[str, Any] | None]) -> None:
    any_result = results["dispatch"] or results["failover"] or results["api"]
    machine = (any_result or {}).get("machine") or machine_info()

    add("# Benchmarks")
    add("")
    add("Written by `make bench` (= `.venv/bin/python -m bench`) from `bench/results/*.json`; do not edit by "
        "hand (the text lives in `bench/report.py`). One part: `python -m bench dispatch|api|profile|failover "
        "[--quick]` (and `micro`, the side-by-side measurements in their own section); `python -m bench report` "
        "only rewrites this file. Every figure below has its baseline measured in the same invocation, on the same "
        "machine, against the same processes.")
    add("")
    add(f"Machine: `nproc` = {machine.get('nproc', '?')}, {machine.get('cpu', '?')}, "
        f"{machine.get('memory_gb', '?')} GB, Python {machine.get('python', '?')}, {machine.get('platform', '?')}.")
    for name, label in _HEADER_LABELS.items():
        result = results.get(name)
        if result:
            cpu = result["machine"].get("cpu")
            elsewhere = f", on {cpu} (another host of the same size)" if cpu != machine.get("cpu") else ""
            add(f"- `{result.get('command', 'python -m bench')}` — {label}: {result['machine']['date']}{elsewhere}"
                f"{_at_commit(result, ', ')}, {result.get('wall_s', '?')} s, {_conditions(result)}.")
    add("")
    add(_calibration_note(results, machine.get("nproc", "?")))
    add("")


def _summary_dispatch(add: Add, dispatch: dict[str, Any] | None) -> None:
    zero, slow = fast_and_slow(dispatch)
    if zero:
        svc, ceiling = zero.get("service", {}), zero.get("provider_ceiling", {})
        rate = svc.get("calls_per_s")
        least = TARGETS["ceiling_ratio"] * ceiling.get("rps", 0) if ceiling else None
        ok = None if rate is None else (rate >= TARGETS["calls_per_s"] and least is not None and rate >= least)
        raw = zero["raw_client"]["calls_per_s"]
        add(f"| dispatch, {zero['latency_ms']} ms provider: end-to-end calls/s (first call → last `sent`) | "
            f"{_spread(svc, 'calls_per_s')} "
            f"({_n(rate / ceiling['rps'] if rate and ceiling.get('rps') else None, 2)} × provider ceiling, "
            f"{_n(rate / raw if rate and raw else None, 2)} × raw client) | "
            f"≥ {_g(TARGETS['calls_per_s'])} and ≥ {_g(TARGETS['ceiling_ratio'])} × provider ceiling ({_n(least)}) | "
            f"provider ceiling {_n(ceiling.get('rps'))} "
            f"({ceiling.get('tool')}); raw client {_n(zero['raw_client']['calls_per_s'])}; bare aiohttp client "
            f"{_n(zero.get('bare_aiohttp_client', {}).get('calls_per_s'))}; sequential "
            f"{_n(zero['sequential']['calls_per_s'])} | {_ok(ok)} |")
        add(f"| dispatch, {zero['latency_ms']} ms: commit → all {_n(zero['reminders'])} `sent` | "
            f"{_spread(svc, 'commit_to_all_sent_s', 2, ' s')} | – | "
            f"sequential loop ≈ {_n(_extrapolated(zero), 0, ' s')} | – |")
    if slow:
        svc = slow.get("service", {})
        secs = svc.get("commit_to_all_sent_s")
        raw = slow["raw_client"]
        add(f"| dispatch, {slow['latency_ms']} ms provider: commit → all {_n(slow['reminders'])} `sent` | "
            f"{_spread(svc, 'commit_to_all_sent_s', 2, ' s')} ({_n(svc.get('calls_per_s'))} calls/s, "
            f"{_n(svc['calls_per_s'] / raw['calls_per_s'] if svc.get('calls_per_s') else None, 2)}"
            f" × raw client) | ≤ {_g(TARGETS['all_sent_s'])} s | raw client "
            f"{_n(raw['seconds'], 2, ' s')} for {_n(raw['calls'])}; provider ceiling "
            f"{_n(slow['provider_ceiling']['rps'])}/s; sequential ≈ {_n(_extrapolated(slow), 0, ' s')} | "
            f"{_ok(None if secs is None else secs <= TARGETS['all_sent_s'] and svc.get('all_sent'))} |")
    runs = _dispatch_runs(dispatch)
    peaks = [r["service"].get("replica_peak_rss_mb") for r in runs.values() if r.get("service")]
    peaks = [p for p in peaks if p is not None]
    if peaks:
        idle = [r["service"].get("replica_rss_idle_mb") for r in runs.values()]
        count = max(r["reminders"] for r in runs.values())
        add(f"| replica peak RSS (VmHWM) while dispatching the {_n(count)} | {_n(max(peaks), 1, ' MB')} | "
            f"≤ {_g(TARGETS['peak_rss_mb'])} MB | idle replica {_n(min(i for i in idle if i), 1, ' MB')} | "
            f"{_ok(max(peaks) <= TARGETS['peak_rss_mb'])} |")


_EVENT_MODES = {"none": "no EVENTS_URL", "accepting": "receiver answering at once",
                "stalled": "receiver that never answers"}


def _summary_events(add: Add, events: dict[str, Any] | None) -> None:
    if not events:
        return
    figures, ratios = events["figures"], events["ratios"]
    stalled, base = figures["stalled"], figures["none"]
    ratio = ratios.get("stalled")
    add(f"| dispatch, {events['latency_ms']} ms, events delivered to a {_EVENT_MODES['stalled']}: end-to-end "
        f"calls/s | {_spread(stalled, 'calls_per_s')} ({_n(ratio, 2)} × without delivery) | "
        f"≥ {_g(TARGETS['events_stalled_ratio'])} × without delivery | {_EVENT_MODES['none']}: "
        f"{_spread(base, 'calls_per_s')} (same run, interleaved) | "
        f"{_ok(None if ratio is None else ratio >= TARGETS['events_stalled_ratio'])} |")


def _dispatch_events(add: Add, events: dict[str, Any]) -> None:
    figures, ratios = events["figures"], events["ratios"]
    count = _n(events["reminders"])
    add(f"## Dispatch with events delivery: {count} reminders, a receiver that hangs")
    add("")
    add(f"`python -m bench dispatch --events` (bench/events.py): the dispatch benchmark's service run "
        f"({events['latency_ms']} ms provider, `DISPATCH_CONCURRENCY={events['concurrency']}`, {count} due reminders "
        f"committed at once, end-to-end calls/s), each `sent` reminder writing its `reminder.finished` event in its "
        f"outcome's transaction, so each run makes {count} events for the relay. Each mode against the same "
        "processes: no EVENTS_URL (the events are written and numbered for the feed, never sent); EVENTS_URL at a "
        "receiver that verifies each signature and answers at once; EVENTS_URL at one that accepts the TCP "
        f"connection and never answers (each try waits EVENTS_TIMEOUT = {_n(events['events_timeout_s'])} s). The "
        "replica is restarted with the mode's settings before each run and the tables emptied; the modes are "
        f"interleaved in {_n(events['rounds'])} round(s) whose order alternates ({' → '.join(events['order'])}), "
        f"after a warm-up run without delivery that is not counted ({_n(events.get('warmup_calls_per_s'))} calls/s). "
        "Each figure is the median run's, [min–max] beside it; the ratio is to the median without delivery.")
    add("")
    add("| EVENTS_URL | service calls/s | ratio to none | commit → all sent | replica cores busy | events delivered "
        "during the run (median run) | receiver connections during the run | exactly once |")
    add("|---|---|---|---|---|---|---|---|")
    for mode, label in _EVENT_MODES.items():
        fig = figures[mode]
        received = fig.get("receiver_during_run", {})
        add(f"| {label} | **{_spread(fig, 'calls_per_s')}** | {_n(ratios.get(mode), 3) if mode != 'none' else '–'} | "
            f"{_n(fig.get('commit_to_all_sent_s'), 2, ' s')} | {_n(fig.get('cores_busy', {}).get('replica'), 2)} | "
            f"{_n(received.get('verified'))} verified (events: "
            f"{', '.join(f'{_n(n)} {state}' for state, n in sorted(fig.get('events', {}).items())) or '–'}) | "
            f"{_n(received.get('stalled_connections'))} held open | "
            f"{'yes' if events.get('exactly_once_every_run') else 'NO'} |")
    add("")


def _extrapolated(run: dict[str, Any]) -> float | None:
    """The sequential loop's time extrapolated to the run's reminders (recorded under that count's key)."""
    return run["sequential"].get(f"extrapolated_s_for_{run['reminders']}")


def _summary_failover(add: Add, failover: dict[str, Any] | None) -> None:
    figures = (failover or {}).get("figures", {})
    ttls = (failover or {}).get("ttls", [])
    configs = _configs(failover)
    for config in configs:
        graceful = [figures.get(f"{config}/ttl{t}/graceful") for t in ttls]
        graceful = [g for g in graceful if g and g.get("median") is not None]
        if graceful:
            worst = max(g["median"] for g in graceful)
            add(f"| graceful failover, {config} (median per TTL) | "
                f"{', '.join(format(g['median'], '.3f') + ' s' for g in graceful)} | ≤ {_g(TARGETS['graceful_s'])} s "
                f"| – | {_ok(worst <= TARGETS['graceful_s'])} |")
    for config in configs:
        cells, ok = [], True
        for ttl in ttls:
            fig = figures.get(f"{config}/ttl{ttl}/sigkill")
            if fig and fig.get("max") is not None:
                cells.append(f"TTL {ttl}: {fig['median']:.2f} s (max {fig['max']:.2f})")
                ok = ok and fig["max"] <= ttl + TARGETS["sigkill_over_ttl_s"]
        if cells:
            add(f"| SIGKILL failover, {config} | {'; '.join(cells)} | ≤ TTL + {_g(TARGETS['sigkill_over_ttl_s'])} s "
                f"(every run) | – | {_ok(ok)} |")
    pair = _inproc(failover)
    growth_cells, growth_ok = [], True
    for ttl in ttls:
        for scenario in ("graceful", "sigkill", "outage_recovery"):
            for row_ttl, small, large, grew in _growth(failover or {}, scenario):
                if row_ttl == ttl:
                    growth_ok = growth_ok and not grew
                    growth_cells.append(f"{scenario} TTL {ttl}: {small:.3f} → {large:.3f} s")
    if growth_cells and pair:
        add(f"| {_candidates(pair[0])} → {_candidates(pair[1])} candidates (in-process, medians) | "
            f"{'; '.join(growth_cells)} | no growth (≤ +{_g(TARGETS['growth_graceful_s'] * 1000)} ms graceful, "
            f"≤ +{_g(TARGETS['growth_s'])} s otherwise) | {_candidates(pair[0])} candidates | {_ok(growth_ok)} |")


def _summary(
    add: Add, dispatch: dict[str, Any] | None, failover: dict[str, Any] | None, api: dict[str, Any] | None,
    events: dict[str, Any] | None = None, providers: dict[str, dict[str, Any] | None] | None = None,
) -> None:
    add("## Summary against the targets")
    add("")
    add("| figure | measured | target | same-run baseline | verdict |")
    add("|---|---|---|---|---|")
    _summary_dispatch(add, dispatch)
    _summary_events(add, events)
    _summary_failover(add, failover)
    for key, pair in (api or {}).get("pairs", {}).items():
        floor = pair["floor"]
        ok = (pair["ratio"] is not None and pair["ratio"] >= TARGETS["floor_ratio"]
              and pair["errors"] <= TARGETS["errors"])
        add(f"| API {API_PAIRS[key][0]}: req/s (p50 / p99), one worker, PostgreSQL | {_n(pair['replica_rps'])} "
            f"({_latencies(pair['replica'])}) | ≥ {_g(TARGETS['floor_ratio'])} × {API_PAIRS[key][1]}, "
            f"{_g(TARGETS['errors'])} errors | "
            f"floor {_n(floor['rps'])} ({_n(floor['p50_ms'], 1)} / {_n(floor['p99_ms'], 1)} ms): ratio "
            f"{_n(pair['ratio'], 3)}; {pair['errors']} errors | {_ok(ok)} |")
    for title, result in (providers or {}).items():
        if result:
            _summary_provider(add, title, result)
    add("")


def _dispatch(add: Add, dispatch: dict[str, Any], before: dict[str, Any] | None,
              client_before: dict[str, Any] | None) -> None:
    runs = _dispatch_runs(dispatch)
    first = dispatch["runs"][0]
    count, rounds = _n(first["reminders"]), first.get("service", {}).get("runs", 1)
    version = str(dispatch.get("postgresql") or "").split()
    add(f"## Dispatch: {count} reminders due at once")
    add("")
    add(f"One `reminders serve` replica leads (harness.cluster.Cluster, PostgreSQL{' ' + version[0] if version else ''}"
        f" with fsync off, `DISPATCH_CONCURRENCY={first['concurrency']}`); the {count} reminders, planned as the "
        "API's create plans them (bench/seeding.py: the domain's planning and wording), are committed in one "
        "transaction. End-to-end = first call received by the provider → last reminder recorded "
        "`sent`. Baselines, same provider process, same concurrency: the provider's own ceiling (a load "
        f"tool that is not our client, POSTing new calls for {_n(first['provider_ceiling'].get('duration_s'))} s), "
        f"the raw client ceiling ({_n(first['raw_client']['calls'])} "
        "`HttpTelephonyClient.place_call` with a `may_send` check, as the dispatcher calls it, no DB), the same "
        f"{_n(first.get('bare_aiohttp_client', {}).get('calls'))} POSTs through a bare `aiohttp.ClientSession` "
        "(what the exchange costs without httpx's layer), the service's `Dispatcher` in the bench process with a "
        "client that answers at once (*dispatcher alone*: claims, term checks, batched outcome writes, against the "
        "same PostgreSQL), and the naive cron job (read the due rows, then call and UPDATE one at a time with the "
        f"same client; time-boxed to {_n(first['sequential'].get('time_boxed_s'))} s, extrapolated to {count}). "
        f"*cores busy* = CPU seconds each process used per wall second while the {count} were dispatched. The "
        f"client baselines, the dispatcher alone and the service run in rounds (raw, bare, alone, service; {rounds} "
        "in this run, one with `--quick`): each figure is the median round's, [min–max] over the rounds beside it; "
        "the cores busy, RSS and per-call CPU are the median service round's.")
    add("")
    add("| provider latency | service calls/s | commit → all sent | first call after commit | provider ceiling (wrk) "
        "| provider ceiling (aiohttp) | raw client | bare aiohttp client | sequential | peak RSS | cores busy "
        "(replica / provider / PostgreSQL) | exactly once |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for latency, run in sorted(runs.items()):
        _dispatch_row(add, latency, run)
    add("")
    _cpu_per_call(add, fast_and_slow(dispatch)[0])
    _before_after(add, dispatch, before, client_before)


def _dispatch_row(add: Add, latency: int, run: dict[str, Any]) -> None:
    svc = run["service"]
    ceiling = run["provider_ceiling"]
    aio = run.get("provider_ceiling_aiohttp") or (ceiling if ceiling["tool"] == "aiohttp" else None)
    wrk = ceiling if ceiling["tool"] == "wrk" else None
    cores = svc.get("cores_busy", {})
    once = svc.get("exactly_once_every_run", (
        svc["provider_calls"] == svc["distinct_keys_called"] == run["reminders"]
        and svc.get("statuses", {}).get("sent") == run["reminders"]))
    raw = run["raw_client"]
    add(f"| {latency} ms | **{_spread(svc, 'calls_per_s')}** | {_spread(svc, 'commit_to_all_sent_s', 2, ' s')} | "
        f"{_n(svc.get('commit_to_first_call_s'), 2, ' s')} | "
        f"{_n(wrk['rps'] if wrk else None)} | {_n(aio['rps'] if aio else None)} | "
        f"{_spread(raw, 'calls_per_s', unit='/s')} ({_n(raw.get('client_cpu_ms_per_call'), 2)} ms CPU per call) | "
        f"{_bare_client(run)} | "
        f"{_n(run['sequential']['calls_per_s'])}/s (≈ {_n(_extrapolated(run))} s for {_n(run['reminders'])}) | "
        f"{_n(svc.get('replica_peak_rss_mb'), 1, ' MB')} | "
        f"{_n(cores.get('replica'), 2)} / {_n(cores.get('provider'), 2)} / {_n(cores.get('postgresql'), 2)} | "
        f"{'yes' if once else 'NO'}: {svc['provider_calls']} calls, {svc['distinct_keys_called']} keys, "
        f"{svc.get('replayed_requests', 0)} replays"
        f"{' (median round; every round checked)' if svc.get('runs', 1) > 1 else ''} |")


def _cpu_per_call(add: Add, zero: dict[str, Any] | None) -> None:
    if not (zero and zero.get("dispatcher_alone") and zero["service"].get("cores_busy")):
        return
    per_call = _cpu_ms_per_reminder(zero)
    client = zero["raw_client"]["client_cpu_ms_per_call"]
    alone = zero["dispatcher_alone"]["cpu_ms_per_reminder"]
    bare = zero.get("bare_aiohttp_client", {}).get("client_cpu_ms_per_call")
    add(f"**Where a call's CPU goes ({zero['latency_ms']} ms, this run).** The replica used {_n(per_call, 2)} ms of "
        f"CPU per reminder (cores busy × commit → all sent ÷ {_n(zero['reminders'])}); the client alone needs "
        f"{client:.2f} ms per call (*raw client*) and the dispatcher with a client that answers at once "
        f"{alone:.2f} ms per reminder ({_n(zero['dispatcher_alone']['reminders_per_s'])} reminders/s, "
        f"*dispatcher alone*): {client + alone:.2f} ms together. The same exchange through a bare aiohttp "
        f"session costs {_n(bare, 2)} ms. One core at {_g(TARGETS['calls_per_s'])} calls/s leaves "
        f"{_g(1000 / TARGETS['calls_per_s'])} ms per call.")
    add("")


def _before_after(add: Add, dispatch: dict[str, Any], before: dict[str, Any] | None,
                  client_before: dict[str, Any] | None) -> None:
    befores = [(label, result) for label, result in (
        ("dispatcher: before", before), ("client: before", client_before)) if result]
    if not befores:
        return
    add("### Before and after")
    add("")
    add("Each row is a separate invocation of `python -m bench dispatch` with its own same-run baselines, "
        "run from a work tree of the commit before the change (`--result-name dispatch_before` / "
        "`dispatch_client_before`). *dispatcher: before* = `service/dispatch/{dispatcher,store}.py` before "
        "batched outcome writes and one-statement claims (one UPDATE transaction per outcome, claims sized "
        f"by each freed slot, ORM entities per claim{_at_commit(before, '; ')}); *client: before* = "
        "`HttpTelephonyClient` sending through `httpx.AsyncClient` with per-phase timeouts "
        f"({_at_commit(client_before, after=', ')}uvloop and httptools installed); *now* = this tree.")
    add("")
    add("| provider latency | version | service calls/s | commit → all sent | replica cores busy | replica CPU ms per "
        "reminder | raw client (same run) | provider ceiling (same run) | date |")
    add("|---|---|---|---|---|---|---|---|---|")
    for label, result in [*befores, ("now", dispatch)]:
        for latency, run in sorted(_dispatch_runs(result).items()):
            svc = run["service"]
            add(f"| {latency} ms | {label} | {_n(svc.get('calls_per_s'))} | "
                f"{_n(svc.get('commit_to_all_sent_s'), 2, ' s')}{'' if svc.get('all_sent') else ' (not all sent)'} | "
                f"{_n(svc.get('cores_busy', {}).get('replica'), 2)} | {_n(_cpu_ms_per_reminder(run), 2)} | "
                f"{_n(run['raw_client']['calls_per_s'])} | {_n(run['provider_ceiling']['rps'])} | "
                f"{result['machine']['date']} |")
    add("")


def _failover(add: Add, failover: dict[str, Any]) -> None:
    figures, ttls, configs = failover.get("figures", {}), failover.get("ttls", []), _configs(failover)
    real = [c for c in configs if c.startswith("real")]
    inproc = [c for c in configs if c.startswith("inproc")]
    add("## Failover")
    add("")
    described = "".join(
        f"`{config}`: {_candidates(config)} `reminders serve` processes (harness.cluster.Cluster, each behind its own "
        "TCP proxy to etcd), timed from the signal to the successor's `leads: term` log line (millisecond "
        "timestamps). " for config in real)
    if inproc:
        largest = _candidates(inproc[-1])
        described += (
            f"{' / '.join(f'`{c}`' for c in inproc)}: `service.election.Elector` objects in helper processes "
            "(`python -m bench.electors`) — the leader alone in one process so it can be signalled, the other "
            f"{' or '.join(str(_candidates(c) - 1) for c in inproc)} candidates together in a second process; each "
            f"candidate has its own etcd client and lease, as a replica would. The {largest}-candidate figures "
            f"therefore come from in-process electors, not {largest} replicas. ")
    add(f"Seconds, median [min–max] (n runs). {described}graceful = SIGTERM (resign); "
        "sigkill = SIGKILL (the lease must expire on the server); outage = etcd SIGKILLed for "
        f"{_n(failover.get('outage_seconds'))} s and restarted with its data: *step-down* = outage start → the "
        "old leader ends its term, *recovery* = etcd healthy again → a leader elected, *leaderless* = step-down "
        "→ next leader. All configurations go through the same outages together (one etcd). The election runs "
        "with its default margin (service/election/config.py).")
    add("")
    scenarios = ("graceful", "sigkill", "outage_step_down", "outage_recovery", "outage_leaderless")
    add("| candidates | TTL | " + " | ".join(scenarios) + " |")
    add("|---|---|" + "---|" * len(scenarios))
    for ttl in ttls:
        for config in configs:
            add(f"| {config} | {ttl} s | "
                + " | ".join(_span(figures.get(f"{config}/ttl{ttl}/{s}")) for s in scenarios) + " |")
    add("")


API_PAIRS = {
    "get": ("GET /appointments/{id}", "the one-query floor", "GET /bare-db/{id}: one joined SELECT"),
    "post": ("POST /appointments", "the one-transaction floor",
             "POST /bare-db/appointments: one transaction, the appointment and its reminder INSERTed"),
    "list": ("GET /appointments?limit=100", "the one-query floor",
             "GET /bare-db/appointments?limit=100: one SELECT, a page with its reminders"),
}


def _latencies(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{_n(r['p50_ms'], 1)} / {_n(r['p99_ms'], 1)} ms" for r in runs)


def _api(add: Add, api: dict[str, Any]) -> None:
    add("## API: one worker against PostgreSQL")
    add("")
    warmup = f"a {_n(api['warmup_s'])} s warm-up" if api.get("warmup_s") is not None else "a warm-up"
    rotates = (f"{_n(api['appointments'])} appointments" if api.get("appointments") is not None
               else "the appointments created through the API beforehand")
    add(f"wrk (`-t1`) with {api['connections']} connections for {_n(api['duration_s'])} s per run, each after "
        f"{warmup}. The service is a full `reminders serve` replica (leading, its dispatcher idle); GET rotates "
        f"over {rotates}; POST creates one appointment (and plans its reminder) per request; the list "
        "reads its first page with their reminders. Each route runs beside its *floor* in A-B-A order "
        f"({api.get('order', 'replica, floor, replica')}), so a machine that drifts shows as two different "
        "replica runs; the replica's figure is their mean. The floors are `bench/bare.py`: FastAPI on the same "
        "uvicorn settings, the same database work through a plain asyncpg pool (no SQLAlchemy, no reset query "
        "on release), the same fields in the answer. *bare* routes: the same FastAPI without a database.")
    add("")
    add("| route | run | req/s | p50 | p90 | p99 | errors |")
    add("|---|---|---|---|---|---|---|")

    def row(label: str, run: str, r: dict[str, Any]) -> None:
        add(f"| {label} | {run} | {_n(r['rps'])} | {_n(r['p50_ms'], 1)} ms | {_n(r['p90_ms'], 1)} ms | "
            f"{_n(r['p99_ms'], 1)} ms | {r['errors']} |")

    for key, pair in api.get("pairs", {}).items():
        label, _, floor_label = API_PAIRS[key]
        row(label, "A: replica", pair["replica"][0])
        row(floor_label, "B: floor", pair["floor"])
        row(label, "A: replica", pair["replica"][1])
        add(f"| **{label}** | **ratio** | **{_n(pair['replica_rps'])} / {_n(pair['floor']['rps'])} = "
            f"{_n(pair['ratio'], 3)}** | | | | |")
    for key, label in (("patch_appointment", "PATCH /appointments/{id} (a `notes` change; no floor)"),
                       ("bare_get", "bare GET /bare (no database)"), ("bare_post", "bare POST /bare (no database)")):
        if api.get(key):
            row(label, "once", api[key])
    starlette = api.get("starlette_floors") or {}
    for key, run in starlette.items():
        row(f"{API_PAIRS[key][2]}, on Starlette alone", "once", run)
    add("")
    add(f"Errors over all runs: {api.get('errors', '–')}.")
    add("")
    if starlette:
        ratios = ", ".join(f"{API_PAIRS[key][0]} {_n(pair['replica_rps'] / starlette[key]['rps'], 3)}"
                           for key, pair in api.get("pairs", {}).items() if starlette.get(key, {}).get("rps"))
        add("The same floors on Starlette alone (`python -m bench.bare --framework starlette`: no FastAPI, the body "
            "validated by the same pydantic model, Starlette's JSONResponse) show what the framework costs a floor; "
            f"the replica's mean against them, measured once each after the pairs: {ratios}.")
        add("")


WEBHOOK_ROUTES = {
    "twilio/status": "POST /telephony/twilio/status: `CallStatus=ringing` on a call with no status yet",
    "twilio/voice": "POST /telephony/twilio/voice: the first answer (a person) of a `sent`, unbound reminder's call",
    "twilio/gather": "POST /telephony/twilio/gather: the confirmation key, first round, on the bound call",
    "telnyx/initiated": "POST /telephony/telnyx/events: `call.initiated` (with its event id) on a call with no status",
}
# the webhooks of a call, as `bench/webhooks.py` counts them at the routes it measures
CALL_WEBHOOK_NAMES = {"twilio/status": "status callback at `ringing`'s cost", "twilio/voice": "voice request",
                      "twilio/gather": "keypad answer"}
WEBHOOK_ROWS = {"twilio/status": "calls ringing", "twilio/voice": "reminders bound, `answered`",
                "twilio/gather": "appointments confirmed", "telnyx/initiated": "calls initiated"}


def _us(ms: float | None) -> str:
    return "–" if ms is None else f"{_n(ms * 1000)} µs"


def _statements(count: int | None) -> str:
    return "–" if count is None else f"{_n(count)} statement{'' if count == 1 else 's'}"


def _same(flag: bool | None) -> str:
    return "–" if flag is None else ("same" if flag else "**differs**")


def _webhooks(add: Add, result: dict[str, Any]) -> None:
    """Issue 26: each webhook route of one replica against its floor (bench/webhooks.py)."""
    machine = result.get("machine") or {}
    target = TARGETS["webhook_floor_ratio"]
    routes = result.get("routes") or {}
    add("## Webhook routes against their floors (issue 26)")
    add("")
    add(f"Command: `{result.get('command', 'python -m bench webhooks')}`, {_day(result)}"
        f"{_at_commit(result, ', ')}, {result.get('wall_s', '?')} s, {_conditions(result)}. Machine: `nproc` = "
        f"{machine.get('nproc', '?')}, {machine.get('cpu', '?')}, Python {machine.get('python', '?')}.")
    add("")
    add(f"wrk (`-t1`) with {result['connections']} connections for {_n(result['duration_s'])} s per run, each after "
        f"a {_n(result['warmup_s'])} s warm-up, in A-B-A order ({result.get('order', 'replica, floor, replica')}). "
        "The replica is a full `reminders serve` in the provider's mode (the leader of a one-replica cluster, "
        "nothing due). Every request does its route's first-time work on rows of its own "
        f"({_n(result['rows_per_route'])} appointments per route, each with a `sent` reminder and its placed call, "
        "seeded in SQL beforehand), pre-signed for the replica's PUBLIC_URL and sent in turn by a wrk Lua script. "
        "The floors are `bench/bare_webhooks.py`: Starlette and one asyncpg pool, the service's signature classes "
        "(`TwilioSignature`, `TelnyxSignature`), then the SQL the route sends, compiled once from the ledger's "
        "statements (one statement outside a transaction, or the same sequence in one transaction), answering "
        "the same body (TwiML, an empty success). *CPU/request*: utime + stime of the process and its children "
        "over the measured run, per request. *SQL as the ledger*: the floor's statements compared with those the "
        "ledger sends for the same route, captured once on rows of their own. *Answer as the replica's*: one "
        "request to each before the runs, the status and body compared (each answer's own ids aside).")
    add("")
    add("| route | replica req/s (A, A) | replica CPU/request | replica p50 / p99 (A, A) | floor req/s | "
        "floor CPU/request | floor p50 / p99 | ratio | non-2xx | rows done / seeded | SQL as the ledger | "
        "answer as the replica's |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in routes.items():
        replica, floor = r["replica"], r["floor"]
        rows = r.get("rows") or {}
        sql = r.get("sql") or {}
        ratio = f"**{_n(r['ratio'], 3)}**" if r.get("ratio") is not None else "–"
        add(f"| {WEBHOOK_ROUTES.get(key, key)} | {_n(r['replica_rps'])} ({', '.join(_n(x['rps']) for x in replica)}) "
            f"| {_us(r['replica_cpu_ms_per_request'])} | {_latencies(replica)} | {_n(floor['rps'])} | "
            f"{_us(r['floor_cpu_ms_per_request'])} | {_latencies([floor])} | {ratio} | {r['non_2xx']} | "
            f"{_n(rows.get('rows_done'))} / {_n(rows.get('rows'))} "
            f"{WEBHOOK_ROWS.get(key, '')}{', **the rows ran out**' if r.get('wrapped') else ''} | "
            f"{_same(sql.get('same_as_floor'))} ({_statements(sql.get('statements'))}) | "
            f"{_same((r.get('answers') or {}).get('same'))} |")
    add("")
    idle = [(mode.capitalize(), result[mode]) for mode in ("twilio", "telnyx")
            if (result.get(mode) or {}).get("replica_idle_cpu_share") is not None]
    if idle:
        add("The replica's CPU while nothing was sent (the leader's own loops, counted in its CPU/request too), "
            f"over {_n(idle[0][1]['idle_s'])} s before the runs: "
            + ", ".join(f"{_pct(part['replica_idle_cpu_share'])} of a core in {mode} mode" for mode, part in idle)
            + ".")
        add("")
    _webhooks_against_get(add, result)
    below = [key for key, r in routes.items() if r.get("ratio") is None or r["ratio"] < target]
    verdict = ("every route at or above it" if not below else
               f"below it: {', '.join(f'`{key}`' for key in below)}")
    add(f"Target: each route at {_n(target, 1)} × its floor's requests/s or more, with no error: {verdict}; "
        f"errors over all runs {result.get('errors', '–')}, non-2xx {result.get('non_2xx', '–')}.")
    add("")
    for item in result.get("not_built") or []:
        add(f"Not built: {item}.")
        add("")


def _webhooks_against_get(add: Add, result: dict[str, Any]) -> None:
    """The GET a call is measured against, at the replica and at its floor, and a call's webhooks
    in GETs of their own side (bench/webhooks.py `call_webhooks`)."""
    parts = [(mode.capitalize(), result[mode]) for mode in ("twilio", "telnyx") if (result.get(mode) or {}).get("get")]
    if not parts:
        return
    add("`GET /appointments/{id}` in the same runs, A-B-A the same way over the seeded appointments: the replica's "
        "read against its floor (`bench/bare.py`'s one joined SELECT, on the floors' Starlette app); then the webhooks "
        "of an answered call that confirms, at the replica's and at the floors' CPU per request, each in GETs of its "
        "own side. The budget issue 26 sets for the whole call, its dispatch included, is (webhooks + "
        f"{_g(TARGETS['call_extra_gets'])}) GETs.")
    add("")
    add("| mode | replica req/s (A, A) | replica CPU/GET | floor req/s | floor CPU/GET | ratio | non-2xx | "
        "fields as the replica's |")
    add("|---|---|---|---|---|---|---|---|")
    for mode, part in parts:
        get = part["get"]
        add(f"| {mode} | {_n(get['replica_rps'])} ({', '.join(_n(x['rps']) for x in get['replica'])}) | "
            f"{_us(get['replica_cpu_ms_per_request'])} | {_n(get['floor']['rps'])} | "
            f"{_us(get['floor_cpu_ms_per_request'])} | {_n(get['ratio'], 3)} | {get['non_2xx']} | "
            f"{_same((get.get('answers') or {}).get('same'))} |")
    add("")
    for mode, part in parts:
        call = part.get("call") or {}
        sides = [(side, call[side]) for side in ("replica", "floor") if call.get(side)]
        if not sides:
            continue
        said = "; ".join(f"at the {side}'s cost {_us(c['webhooks_cpu_ms'])}, **{_n(c['in_gets'], 1)} ×** its GET "
                         f"({_us(c['get_cpu_ms'])})" for side, c in sides)
        made_of = ", ".join(f"{_n(n)} × {CALL_WEBHOOK_NAMES.get(route, route)}"
                            for route, n in call["per_call"].items())
        add(f"{mode}: a call's {_n(call['webhooks_per_call'])} webhooks ({made_of}), {said}; the budget for the whole "
            f"call is {_n(call['budget_in_gets'])} ×.")
        add("")


def _profile_table(add: Add, label: str, result: dict[str, Any]) -> None:
    routes = result.get("routes", {})
    names = list(next(iter(routes.values()))["named_inclusive"]) if routes else []
    add(f"**{label}** ({result['machine']['date']}, {_conditions(result)}):")
    add("")
    add(f"| route | req/s under py-spy | own time by package (top {TOP_PACKAGES}) | " + " | ".join(names) + " |")
    add("|---|---|---|" + "---|" * len(names))
    for r in routes.values():
        own = ", ".join(f"{p} {v:.0f} %" for p, v in r["own_by_package"][:TOP_PACKAGES])
        add(f"| {r['label']} | {_n(r['load'].get('rps'))} | {own} | "
            + " | ".join(f"{r['named_inclusive'][n]:.1f} %" for n in names) + " |")
    add("")


def _profiles(add: Add, before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
    setup = after or before or {}
    add("## Where a replica's CPU goes, per API route (`python -m bench profile`)")
    add("")
    add(f"py-spy (`record --format raw`, {_n(setup.get('rate_hz'))} Hz, {_n(setup.get('seconds'))} s) on the replica "
        f"while wrk loads one route with {_n(setup.get('connections'))} connections; percentages of the samples. "
        "*Own time* is the function at the top of the stack, summed by package (*event loop* is uvloop's C code; "
        "asyncpg's includes the socket writes its Cython code makes). The named columns are inclusive: the share "
        "of samples with that function anywhere on the stack. *Before*: "
        f"`{(before or {}).get('command', 'python -m bench profile --result-name profile_before')}` run from a work "
        f"tree of the service before issue 16's changes{_at_commit(before, ' (', ')')} with this tree's `bench/`; "
        "*after*: this tree.")
    add("")
    for label, result in (("Before", before), ("After", after)):
        if result:
            _profile_table(add, label, result)


def _paced_rounds(paced: dict[str, Any]) -> str:
    """The paced GET's rounds, when it had several (the figure is their median)."""
    rounds = paced.get("rounds_cpu_ms_per_get") or []
    if len(rounds) < 2:
        return ""
    return f"; the median of {len(rounds)} such runs: " + ", ".join(f"{_n(r, 3)}" for r in rounds) + " ms"


def _provider_verdicts(result: dict[str, Any], against: str = "") -> tuple[bool | None, bool | None]:
    """(CPU per webhook within its target, CPU per call within its), against the run's GET flat
    out (`against` "") or paced at the webhooks' rate ("_paced")."""
    ratios, run = result.get("ratios") or {}, result["run"]
    webhook, call = ratios.get(f"webhook_to_get{against}"), ratios.get(f"call_to_get{against}")
    heard = not result["heard_once"]["violations"]
    budget = run["webhooks_per_call"] + TARGETS["call_extra_gets"]
    return (None if webhook is None else heard and webhook <= TARGETS["webhook_get_ratio"],
            None if call is None else heard and call <= budget)


def _summary_provider(add: Add, title: str, result: dict[str, Any]) -> None:
    run, get, heard = result["run"], result["get"], result["heard_once"]
    ratios = result.get("ratios") or {}
    webhook_ok, call_ok = _provider_verdicts(result)
    budget = run["webhooks_per_call"] + TARGETS["call_extra_gets"]
    add(f"| {title} mode, {_n(result['replicas'])} replicas: replicas' CPU per webhook ÷ per "
        f"`GET /appointments/{{id}}` flat out (wrk) | {_n(ratios.get('webhook_to_get'), 1)} × "
        f"({_n(run['cpu_ms_per_webhook'], 2)} ms ÷ {_n(get.get('cpu_ms_per_get'), 3)} ms) | "
        f"≤ {_g(TARGETS['webhook_get_ratio'])} × | the GET on the same replicas in the same run; "
        f"{_n(heard['reminders'])} reminders, {_n(heard['duplicates'])} heard more than once, "
        f"{_n(heard['misses'])} missed | {_ok(webhook_ok)} |")
    add(f"| {title} mode: replicas' CPU per call ÷ per GET | {_n(ratios.get('call_to_get'), 1)} × "
        f"({_n(run['cpu_ms_per_call'], 2)} ms) | ≤ webhooks per call + {_g(TARGETS['call_extra_gets'])} = "
        f"{_n(budget, 2)} × | {_n(run['webhooks_per_call'], 2)} webhooks per call; the generic path "
        f"{_n(result['generic']['cpu_ms_per_call'], 2)} ms per call | {_ok(call_ok)} |")
    paced = (get.get("paced") or {})
    if paced.get("cpu_ms_per_get"):
        webhook_paced_ok, call_paced_ok = _provider_verdicts(result, "_paced")
        add(f"| {title} mode: the same, against the GET paced at the webhooks' rate "
            f"({_n(paced['rate'], 1)} req/s on one follower) | webhook {_n(ratios.get('webhook_to_get_paced'), 1)} ×, "
            f"call {_n(ratios.get('call_to_get_paced'), 1)} × ({_n(paced['cpu_ms_per_get'], 3)} ms per GET) | "
            f"≤ {_g(TARGETS['webhook_get_ratio'])} ×, ≤ {_n(budget, 2)} × | the like-for-like GET: a request's CPU "
            f"depends on the load it comes in; a follower's webhook alone "
            f"{_n(ratios.get('follower_webhook_to_get_paced'), 1)} × | webhook {_ok(webhook_paced_ok)}, "
            f"call {_ok(call_paced_ok)} |")


def _providers(add: Add, providers: dict[str, dict[str, Any]],
               befores: dict[str, dict[str, Any] | None] | None = None) -> None:
    first = next(iter(providers.values()))
    caps = first.get("caps") or {}
    controls = first.get("fake_controls") or {}
    version = str(first.get("postgresql") or "").split()
    add("## Real providers: a call and its webhooks against a GET (issue 26)")
    add("")
    add(f"`python -m bench provider --mode twilio|telnyx` (bench/provider.py). {_n(first['replicas'])} "
        f"`reminders serve` replicas (harness.cluster.Cluster, `LEASE_TTL={_n(first['lease_ttl'])}`) on "
        f"PostgreSQL{' ' + version[0] if version else ''} with `DISPATCH_CONCURRENCY={_n(first['concurrency'])}` "
        "and the service's default log level, in the provider's mode against its fake — "
        f"{_n(controls.get('latency_ms'))} ms per REST request, "
        f"{'no rate limit of its own' if not controls.get('calls_per_second') else 'its own rate limit'}, the callee "
        "ringing "
        f"{_n(controls.get('ring_ms'))} ms, speech and machine detection taking "
        f"{_n(controls.get('speak_ms'))} ms — every webhook through the front that strips PUBLIC_URL's prefix "
        "(harness/webhook_proxy.py, round robin over the replicas); every reminder its own number, whose scripted "
        f"callee answers at once and presses {first.get('callee', {}).get('digits', '?')}; EVENTS_URL at a receiver "
        "that verifies each delivery "
        "(harness/events_receiver.py); caps per number on "
        f"({_n(caps.get('max_calls_per_number_per_day'))} a day, {_n(caps.get('max_calls_per_number_per_week'))} "
        "a week: nobody held back). The provider account's rate — `CALLS_PER_SECOND` on every replica, as an "
        "operator sets it to the account's — is measured, not guessed: a first warm-up burst (not counted) gives the "
        "CPU per call of every process on the machine (replicas, PostgreSQL, the fake, the front, the bench), hence "
        "the calls/s its cores would carry, and the rate is set to a share of that (below). Without a rate the calls "
        "answered at once queue their webhooks behind each other past the providers' timeouts — Twilio's status "
        "callbacks retried and given up, voice requests sent to the fallback, Telnyx's events delivered again — and a"
        " run measures that spiral (and never ends once final events are given up): issue 26's burst problem, not a "
        "webhook's cost. A second warm-up at that rate (not counted); the replicas then idle as long as the run "
        "should last, and their idle CPU per second is subtracted from the run's. The run: the reminders committed "
        "due at once. *calls/s* = first create the fake received → last call attempt recorded over (its final "
        "status); *CPU* = utime + stime of each replica and its children from before the commit until every call was "
        "over and every event delivered, idle subtracted; *per webhook* = all of it ÷ the webhooks the front answered"
        " (the dispatch included, as issue 26 counts it); *statements* = pg_stat_statements' executions by the "
        "replicas' role (transaction control apart), per route the replicas' own count (bench/statements.py, enabled "
        "by the variable `BENCH_STATEMENTS`, which only the bench sets; an executemany is one there); latency per "
        "route = the front's time to the replica's answer. Then, on the same replicas: wrk on one follower's `GET "
        "/appointments/{id}` over the run's appointments, flat out, then paced at the rate that follower answered "
        "webhooks in the run (the median of several runs: at so low a rate one run's figure is far from the next's); "
        "py-spy on another follower through one more burst. The "
        "*generic path* = the same settings, no rate, `TELEPHONY_PROVIDER=generic`, the same reminders (a database of "
        "its own, the same PostgreSQL). Every reminder is checked heard exactly once by the chaos harness's promise "
        "(`harness.chaos_providers.judge` on the fake's record and the rows) and every appointment confirmed; a run "
        "that fails it writes no result.")
    add("")
    for title, result in providers.items():
        before = (befores or {}).get(title)
        if before:
            _provider_before_after(add, title, before, result)
        _provider(add, title, result)


def _hosts(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Whether two runs of one bench ran on one kind of host (their CPUs)."""
    cpus = [(run.get("machine") or {}).get("cpu") for run in (before, after)]
    if cpus[0] == cpus[1]:
        return "Same bench, same host"
    return (f"Same bench, another host: before on {cpus[0]}, after on {cpus[1]} (absolute CPU figures move with the "
            "host; the ratios to each run's own GET are the ones to compare)")


def _provider_before_after(add: Add, title: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    """The same bench before issue 26's changes (bench/results/provider_<mode>_before.json, a run of
    the commit before them) and now."""
    add(f"### {title} mode: before and after issue 26's changes")
    add("")
    add(f"*Before* = `{before.get('command', 'python -m bench provider')}` at {before['machine']['date']}"
        f"{_at_commit(before, ', ')}; *after* = the run below{_at_commit(after, ', ')}. {_hosts(before, after)}; "
        "each run's account rate measured by its own warm-up (a cheaper call carries a higher rate).")
    add("")
    add("| figure | before | after |")
    add("|---|---|---|")

    def row(label: str, value: Callable[[dict[str, Any]], Any], digits: int = 2, unit: str = "") -> None:
        add(f"| {label} | {_n(value(before), digits, unit)} | {_n(value(after), digits, unit)} |")

    row("calls/s end to end", lambda r: r["run"]["calls_per_s"], 1)
    row("replicas' CPU per call", lambda r: r["run"]["cpu_ms_per_call"], 2, " ms")
    row("replicas' CPU per webhook (all ÷ webhooks)", lambda r: r["run"]["cpu_ms_per_webhook"], 2, " ms")
    row("a follower's CPU per webhook", lambda r: r["run"].get("followers_cpu_ms_per_webhook"), 2, " ms")
    row("CPU per `GET /appointments/{id}`", lambda r: r["get"].get("cpu_ms_per_get"), 3, " ms")
    row("ratio webhook ÷ GET", lambda r: (r.get("ratios") or {}).get("webhook_to_get"), 1, " ×")
    row("ratio call ÷ GET", lambda r: (r.get("ratios") or {}).get("call_to_get"), 1, " ×")
    row("CPU per GET paced at the webhooks' rate", lambda r: (r["get"].get("paced") or {}).get("cpu_ms_per_get"), 3,
        " ms")
    row("ratio webhook ÷ paced GET", lambda r: (r.get("ratios") or {}).get("webhook_to_get_paced"), 1, " ×")
    row("ratio call ÷ paced GET", lambda r: (r.get("ratios") or {}).get("call_to_get_paced"), 1, " ×")
    row("statements per call (pg_stat_statements)", lambda r: r["statements"]["pg_stat_statements"]["per_call"], 1)
    row("transactions per call", lambda r: r["statements"]["pg_stat_statements"]["transactions_per_call"], 1)
    row("statements per call outside requests", lambda r: r["statements"]["background_per_call"], 1)
    for label in after["routes"]:
        if label in before["routes"]:
            row(f"{label}: statements / transactions per request, p99",
                lambda r, label=label: f"{r['routes'][label]['statements_per_request']:.2f} / "
                                       f"{r['routes'][label]['transactions_per_request']:.2f}, "
                                       f"{r['routes'][label]['p99_ms']:.1f} ms")
    add("")


def _provider(add: Add, title: str, result: dict[str, Any]) -> None:
    run, get, heard, generic = result["run"], result["get"], result["heard_once"], result["generic"]
    ratios, statements = result.get("ratios") or {}, result["statements"]
    pg = statements["pg_stat_statements"]
    machine = result["machine"]
    load = run.get("loadavg_at_start") or ["?"]
    webhook_ok, call_ok = _provider_verdicts(result)
    per_get = get.get("cpu_ms_per_get")
    budget = run["webhooks_per_call"] + TARGETS["call_extra_gets"]
    add(f"### {title} mode: {_n(result['reminders'])} reminders due at once")
    add("")
    add(f"`{result.get('command', 'python -m bench provider')}` — {machine['date']}{_at_commit(result, ', ')}, "
        f"{machine.get('cpu')} ({machine.get('nproc')} vCPUs), load average {load[0]} at the run's start; "
        f"{_conditions(result)}; {result.get('wall_s', '?')} s in all.")
    add("")
    add(f"| figure | {title} mode | issue 26's target |")
    add("|---|---|---|")
    pace = result.get("pace") or {}
    paced = (f"the account's rate {_n(pace.get('calls_per_s'), 1)} calls/s, {_pct(pace['headroom'])} of the "
             f"{_n(pace.get('ceiling_calls_per_s'), 1)} calls/s the {_n(pace.get('cores'))} cores would carry at the "
             f"warm-up's {_n(pace.get('cpu_ms_per_call_all_processes'), 1)} ms of CPU per call of every process"
             if pace.get("headroom") is not None else
             f"the account's rate {_n(pace.get('calls_per_s'), 1)} calls/s, as given" if pace.get("calls_per_s")
             else "no rate: every call at once")
    add(f"| calls/s end to end (first create → last call over) | **{_n(run['calls_per_s'], 1)}** "
        f"({_n(run['reminders'])} calls in {_n(run['first_create_to_last_final_s'], 2)} s; first create "
        f"{_n(run['commit_to_first_create_s'], 2)} s after the commit; {paced}) | – |")
    add(f"| replicas' CPU per call (idle subtracted) | **{_n(run['cpu_ms_per_call'], 2)} ms** "
        f"({_n(run['replicas_cpu_s'], 2)} s over {_n(run['cpu_interval_s'], 2)} s, less "
        f"{_n(run['idle_subtracted_s'], 2)} s idle) | ≤ (webhooks per call + {_g(TARGETS['call_extra_gets'])}) × "
        f"per GET = {_n(budget * per_get if per_get else None, 2)} ms: {_ok(call_ok)} |")
    add(f"| replicas' CPU per webhook (all of it ÷ webhooks) | **{_n(run['cpu_ms_per_webhook'], 2)} ms** "
        f"(the followers alone, which only answer webhooks: {_n(run.get('followers_cpu_ms_per_webhook'), 2)} ms) | "
        f"≤ {_g(TARGETS['webhook_get_ratio'])} × per GET = "
        f"{_n(TARGETS['webhook_get_ratio'] * per_get if per_get else None, 2)} ms: {_ok(webhook_ok)} |")
    add(f"| replicas' CPU per `GET /appointments/{{id}}` ({get['replica']}, wrk {_n(get['connections'])} "
        f"connections, {_n(get['load']['duration_s'], 1)} s) | **{_n(per_get, 3)} ms** ({_n(get['load']['rps'])} "
        f"req/s, p50 {_n(get['load']['p50_ms'], 1)} ms, p99 {_n(get['load']['p99_ms'], 1)} ms, "
        f"{_n(get['load']['errors'])} errors) | – |")
    add(f"| ratios to the GET | webhook {_n(ratios.get('webhook_to_get'), 1)} ×, call "
        f"{_n(ratios.get('call_to_get'), 1)} × | ≤ {_g(TARGETS['webhook_get_ratio'])} ×, ≤ "
        f"{_n(budget, 2)} × |")
    paced = get.get("paced") or {}
    if paced.get("cpu_ms_per_get"):
        webhook_paced_ok, call_paced_ok = _provider_verdicts(result, "_paced")
        add(f"| replicas' CPU per `GET /appointments/{{id}}` paced at the rate {get['replica']} answered webhooks "
            f"in the run ({_n(paced['rate'], 1)} req/s, {_n(paced['connections'])} connections, "
            f"{_n(paced['load']['duration_s'], 1)} s{_paced_rounds(paced)}) | **{_n(paced['cpu_ms_per_get'], 3)} ms** "
            f"({_n(paced['load']['rps'], 1)} req/s, {_n(paced['load']['errors'])} errors) | – |")
        add(f"| ratios to the paced GET (like for like) | webhook {_n(ratios.get('webhook_to_get_paced'), 1)} ×, "
            f"call {_n(ratios.get('call_to_get_paced'), 1)} ×; a follower's webhook "
            f"{_n(ratios.get('follower_webhook_to_get_paced'), 1)} × | ≤ {_g(TARGETS['webhook_get_ratio'])} ×: "
            f"{_ok(webhook_paced_ok)}, ≤ {_n(budget, 2)} ×: {_ok(call_paced_ok)} |")
    add(f"| webhooks per call (at the front) | {_n(run['webhooks_per_call'], 2)} ({_n(run['webhooks'])} webhooks; "
        f"the fake delivered {_n(heard['event_deliveries'])}, {_n(heard['event_redeliveries'])} of them a try "
        f"after the first) | – |")
    add(f"| database statements per call | {_n(pg['per_call'], 1)} (pg_stat_statements; "
        f"{_n(pg['transactions_per_call'], 1)} transactions); {_n(statements['sqlalchemy_per_call'], 1)} as the "
        f"replicas count them, {_n(statements['background_per_call'], 1)} of them outside requests (dispatch, "
        "sweeps, events relay) | – |")
    add(f"| the generic path, same reminders and settings, no rate | {_n(generic['calls_per_s'], 1)} calls/s, "
        f"{_n(generic['cpu_ms_per_call'], 2)} ms of replicas' CPU and {_n(generic['statements_per_call'], 1)} "
        "statements per call | – |")
    others = run.get("others_cpu_ms_per_call") or {}
    add("| CPU per call beside the replicas (same interval) | "
        + ", ".join(f"{name} {_n(value, 2)} ms" for name, value in others.items()) + " | – |")
    add(f"| every reminder heard exactly once | {_n(heard['reminders'])} reminders, {_n(heard['calls'])} calls, "
        f"{_n(heard['duplicates'])} heard more than once, {_n(heard['misses'])} missed, "
        f"{_n(heard['extra_calls'])} extra calls (silent, within the attempts in doubt), "
        f"{_n(heard['confirmed'])} confirmed | every one |")
    add("")
    add("| webhook | per call | p50 | p99 | max | non-2xx | statements per request | transactions per request |")
    add("|---|---|---|---|---|---|---|---|")
    for label, route in result["routes"].items():
        add(f"| {label} | {_n(route['per_call'], 2)} | {_n(route['p50_ms'], 1)} ms | {_n(route['p99_ms'], 1)} ms | "
            f"{_n(route['max_ms'], 1)} ms | {_n(route['non_2xx'])} | {_n(route['statements_per_request'], 2)} | "
            f"{_n(route['transactions_per_request'], 2)} |")
    add("")
    top = pg.get("top") or []
    if top:
        add(f"Most executed statements, executions over the {_n(run['reminders'])} calls: " + "; ".join(
            f"{_n(calls)} × `{_excerpt(text)} …`" for calls, text in top[:5]) + ".")
        add("")
    _provider_profile(add, result.get("profile") or {})
    if result.get("leader_profile"):
        _provider_profile(add, result["leader_profile"], leader=True)


def _excerpt(statement: Any) -> str:
    """A statement's first five words, its parameters' numbers left out ($n): not figures."""
    return re.sub(r"\$\d+", "$n", " ".join(str(statement).split()[:5]))


def _provider_profile(add: Add, profile: dict[str, Any], *, leader: bool = False) -> None:
    title = "Where the leader's CPU goes" if leader else "Where a webhook's CPU goes"
    if profile.get("error") or not profile.get("samples"):
        add(f"*{title}*: no profile ({profile.get('error', 'no samples')}).")
        add("")
        return
    where = profile.get("where") or {}
    if leader:
        whose = "the leader: the dispatch, the events relay, the sweeps and its share of the webhooks"
        elsewhere = "in its other tasks (the dispatch, the events relay, the sweeps)"
    else:
        whose, elsewhere = "a follower: webhooks, no dispatch", "elsewhere"
    add(f"**{title}** — py-spy on {profile['replica']} ({whose}) "
        f"through a burst of {_n(profile.get('burst'))}, {_n(profile['samples'])} busy samples at "
        f"{_n(profile['rate_hz'])} Hz over {_n(profile['seconds'])} s: {_n(where.get('requests'), 1)} % in HTTP "
        f"requests ({_n(where.get('in_routes'), 1)} % under the routes' functions — the signature check, the "
        "route's work — the rest the server's and the middlewares' own), "
        f"{_n(where.get('greenlets'), 1)} % in "
        "SQLAlchemy's greenlets (the statements of `Database.read`/`write`: compiled, sent, their rows), "
        f"{_n(where.get('event_loop_own'), 1)} % in the event loop's own C code (uvloop: sockets, callbacks), "
        f"{_n(where.get('other_tasks'), 1)} % {elsewhere}. The service's functions with the most samples on the "
        "stack (own + children; own beside), the middlewares every request goes through left out:")
    add("")
    for name, share, own in (profile.get("top_service") or [])[:12 if leader else 10]:
        add(f"- `{name}` — {_n(share, 1)} % (own {_n(own, 1)} %)")
    add("")


def _micro(add: Add, micro: dict[str, Any]) -> None:
    add("## Side by side: client, provider stack, one read (`python -m bench micro`)")
    add("")
    client, provider, read = micro["client"], micro["provider"], micro["read"]
    latency = f" at {_n(client['latency_ms'])} ms" if client.get("latency_ms") is not None else ""
    add(f"CPU per call, median [min–max] over {len(next(iter(client['cpu_per_call'].values()))['rounds'])} "
        f"interleaved rounds of {_n(client['posts'])} POSTs, {client['concurrency']} in flight, to the fake "
        f"provider{latency}:")
    add("")
    add("| client | CPU per call |")
    add("|---|---|")
    labels = {"httpx_async_client": "`httpx.AsyncClient` on httpx-aiohttp's transport (how the client sent before)",
              "telephony_client": "`HttpTelephonyClient` (straight to the transport)",
              "telephony_client_may_send": "`HttpTelephonyClient` with a `may_send` check (as the dispatcher calls it)",
              "bare_aiohttp": "bare `aiohttp.ClientSession`"}
    for key, label in labels.items():
        fig = client["cpu_per_call"].get(key)
        if fig:
            add(f"| {label} | {fig['median_ms']:.2f} ms [{fig['min_ms']:.2f}–{fig['max_ms']:.2f}] |")
    add("")
    add(f"The fake provider under uvicorn, POSTs/s from the load tool ({provider['connections']} connections, "
        f"{_n(provider['duration_s'])} s per round): "
        + "; ".join(f"{name} {_n(fig['median'])} (rounds: {', '.join(_n(r) for r in fig['rounds'])})"
                    for name, fig in provider["rps"].items()) + ".")
    add("")
    add(f"CPU per read of one appointment with its reminder, PostgreSQL, in-process, {_n(read['reads'])} reads "
        "per round, median [min–max]:")
    add("")
    add("| read | CPU per read |")
    add("|---|---|")
    labels = {"orm_and_response_model": "ORM load (joined) + response model (the API's read before issue 16)",
              "service_read_and_response_model":
                  "`service.appointments.read` (Core, one greenlet hop) + response model",
              "core_rows": "the same SELECT through SQLAlchemy Core, rows only",
              "asyncpg_rows": "the same SELECT through asyncpg on a connection of the same pool"}
    for key, label in labels.items():
        fig = read["cpu_per_read"].get(key)
        if fig:
            add(f"| {label} | {fig['median_ms']:.2f} ms [{fig['min_ms']:.2f}–{fig['max_ms']:.2f}] |")
    add("")


def _limits(add: Add, results: dict[str, dict[str, Any] | None]) -> None:
    add("## What limits the figures")
    add("")
    add("Found with py-spy (replica processes under load) and cProfile (the dispatcher and the API\n"
        "in-process), then split by the same-run baselines above: *raw client*, *bare aiohttp client*,\n"
        "*dispatcher alone*, and the one-SELECT route `/bare-db/{id}`. CPU times are this machine's.")
    add("")
    dispatch = results["dispatch"]
    zero, slow = fast_and_slow(dispatch)
    if dispatch and zero and zero.get("dispatcher_alone") and zero["service"].get("cores_busy"):
        _limits_one_core(add, dispatch, zero)
        _limits_client(add, zero, results["micro"])
        _limits_database(add, dispatch, results["dispatch_before"], results["profile_before"])
        _limits_provider(add, dispatch, zero)
    if dispatch and slow:
        _limits_latency(add, dispatch, slow, results["dispatch_previous_host"])
    if results["api"]:
        _limits_api(add, results["api"], results["profile"])
    if results["failover"]:
        _limits_failover(add, results["failover"], results["failover_before"])


def _limits_one_core(add: Add, dispatch: dict[str, Any], zero: dict[str, Any]) -> None:
    cores = zero["service"]["cores_busy"]
    nproc = dispatch["machine"].get("nproc")
    idle = nproc - sum(cores.values()) if isinstance(nproc, (int, float)) else None
    client = zero["raw_client"]["client_cpu_ms_per_call"]
    alone = zero["dispatcher_alone"]["cpu_ms_per_reminder"]
    bare = zero.get("bare_aiohttp_client", {}).get("client_cpu_ms_per_call")
    budget = 1000 / TARGETS["calls_per_s"]
    if bare is not None and bare + alone > budget:
        verdict = (f"even the bare aiohttp exchange plus the dispatcher alone ({bare + alone:.2f} ms) exceed that on "
                   "this machine, so the absolute target is out of reach for one Python leader here whatever the "
                   "client.")
    elif client + alone > budget:
        verdict = (f"the bare aiohttp exchange plus the dispatcher alone ({_n((bare or 0) + alone, 2)} ms) would fit "
                   f"in it, the service's client plus the dispatcher alone ({client + alone:.2f} ms) does not: on "
                   "this machine the client's layer decides whether one Python leader reaches the absolute target.")
    else:
        verdict = (f"the service's client plus the dispatcher alone ({client + alone:.2f} ms) fit in it on this "
                   "machine.")
    add(f"**Dispatch — one process, one core.** Only the leader dispatches, in one Python process, so its CPU per "
        f"call bounds the rate: at {zero['latency_ms']} ms the replica kept {_n(cores.get('replica'), 2)} of a core "
        f"busy (*cores busy*) while the provider and PostgreSQL used {_n(cores.get('provider'), 2)} and "
        f"{_n(cores.get('postgresql'), 2)}, {_n(idle, 2)} of the machine's {nproc} cores idle. Per call (paragraph "
        f"above the before/after table): the client ({client:.2f} ms) and claims + term checks + batched outcome "
        f"writes ({alone:.2f} ms) together {client + alone:.2f} ms, against the {_n(_cpu_ms_per_reminder(zero), 2)} "
        f"ms the replica spent per reminder. At {_g(TARGETS['calls_per_s'])} calls/s one core leaves "
        f"{_g(budget)} ms per call; {verdict}")
    add("")


def _limits_client(add: Add, zero: dict[str, Any], micro: dict[str, Any] | None) -> None:
    client = zero["raw_client"]["client_cpu_ms_per_call"]
    bare = zero.get("bare_aiohttp_client", {}).get("client_cpu_ms_per_call")
    per = _cpu_ms_per_reminder(zero)
    gap = (f" ({client - bare:.2f} ms per call at {zero['latency_ms']} ms, {_pct((client - bare) / per)} of the "
           f"replica's {per:.2f} ms per reminder)" if bare is not None and per else "")
    calls = (micro or {}).get("client", {}).get("cpu_per_call", {})
    with_check, without = calls.get("telephony_client_may_send"), calls.get("telephony_client")
    price = (f": {with_check['median_ms']:.2f} ms per call with it, {without['median_ms']:.2f} ms without, medians "
             "of the same rounds" if with_check and without else "")
    add("**Dispatch — the client (fixed: service/telephony/client.py).** `HttpTelephonyClient` sent through "
        "`httpx.AsyncClient`: its cookie jar (urllib's `cookiejar` on every response), auth and redirect flow, URL "
        "merge and header copies cost more CPU than the aiohttp transport beneath them (the side-by-side table "
        "above), and each of its per-phase timeouts became an aiohttp timer per call. Requests now go straight to "
        "the transport as `httpx.Request`s (the interface respx and the tests' ASGI transport implement too), under "
        "one `asyncio.timeout`. What remains of httpx — request and header objects, the response stream wrappers "
        f"— is the gap between the *raw client* and *bare aiohttp client* columns{gap}. Posting through aiohttp "
        "directly would remove it, and drop the chosen httpx stack and the respx-mocked tests with it: not done, "
        "left as a decision. The `may_send` check sends the body as a one-chunk stream so the check runs right "
        f"before the first byte leaves (its price: the `HttpTelephonyClient` rows of the side-by-side table{price}); "
        "kept: it is what stops a paused ex-leader that resumes (RELIABILITY.md).")
    add("")


def _limits_database(add: Add, dispatch: dict[str, Any], before: dict[str, Any] | None,
                     profile_before: dict[str, Any] | None) -> None:
    costs = [c for c in (_cpu_ms_per_reminder(r) for r in (before or {}).get("runs", [])) if c is not None]
    cost = (f": {min(costs):.2f}–{max(costs):.2f} ms of CPU per reminder (*dispatcher: before* rows)" if costs
            else "")
    batch = (dispatch.get("service_defaults") or {}).get("record_batch")
    writes = f"writes up to {_n(batch)} per transaction" if batch else "writes them in batches, one transaction each"
    ping = ""
    routes = (profile_before or {}).get("routes", {})
    shares = [(r["named_inclusive"].get("pool pre-ping (BEGIN; ; ROLLBACK)"), r["label"]) for r in routes.values()]
    shares = [(share, label) for share, label in shares if share is not None]
    if shares:
        share, label = max(shares)
        ping = f" were up to {share:.0f} % of an API replica's samples ({label}, profile before);"
    else:
        ping = " cost every request;"
    add("**Dispatch — the database (fixed earlier: service/dispatch).** Every outcome used to be recorded in a "
        f"transaction of its own and claims loaded ORM entities for as few rows as slots had freed{cost}. Outcomes "
        f"now go to a per-term `OutcomeRecorder` that {writes} (`SELECT … FOR UPDATE` of the rows still "
        "`dispatching` under the token, one executemany UPDATE with the same fenced WHERE), and a claim reads what "
        "the calls need in the statement that locks the candidates, once enough slots are free to be worth a claim "
        "(service/dispatch/dispatcher.py). *dispatcher alone* shows the remainder. Claims run one at a time; both "
        "latencies are CPU-bound now, so overlapping them would not raise the rate. `pool_pre_ping` is off since "
        f"issue 16 (docs/decisions/0161): its BEGIN, query and ROLLBACK before every checkout{ping} a connection "
        "broken by a database restart now fails its one statement, and SQLAlchemy then replaces the whole pool.")
    add("")


def _limits_provider(add: Add, dispatch: dict[str, Any], zero: dict[str, Any]) -> None:
    add("**Dispatch — the provider and the machine.** The fake provider is Starlette on uvicorn with httptools and "
        "uvloop (in pyproject.toml; both stacks side by side in the section above) and logs one INFO line per call; "
        f"at {zero['concurrency']} connections its ceiling is the wrk column. The relative target "
        f"(≥ {_g(TARGETS['ceiling_ratio'])} × that ceiling) compares a leader that claims, fences and records every "
        f"call to a server that only answers; the {dispatch['machine'].get('nproc')} vCPUs are shared with other "
        "work (calibration), so compare ratios, not absolutes, across runs.")
    add("")


def _limits_latency(add: Add, dispatch: dict[str, Any], slow: dict[str, Any],
                    previous: dict[str, Any] | None) -> None:
    seconds, count = slow["latency_ms"] / 1000, slow["reminders"]
    default = (dispatch.get("service_defaults") or {}).get("dispatch_concurrency")
    capped = (f" The default of {default} caps dispatch at {_n(default / seconds)} calls/s, "
              f"{_n(count / (default / seconds))} s for {_n(count)}, whatever the CPU;" if default else "")
    within = TARGETS["all_sent_s"]
    text = (f"**At {slow['latency_ms']} ms latency** calls in flight bound the rate: DISPATCH_CONCURRENCY / "
            f"{_g(seconds)} s.{capped} {_n(count)} within {_g(within)} s needs DISPATCH_CONCURRENCY above "
            f"{_n(count / within * seconds)} (the bench runs {slow['concurrency']}) *and* less than "
            f"{_g(within / count * 1000)} ms of replica CPU per call, the start included.")
    zero, _ = fast_and_slow(dispatch)
    old_zero, old_slow = fast_and_slow(previous)
    if previous and zero and old_zero and old_slow:
        baselines = [(r.get("provider_ceiling", {}).get("rps"), o.get("provider_ceiling", {}).get("rps"))
                     for r, o in ((zero, old_zero),)]
        for key, field in (("provider_ceiling_aiohttp", "rps"), ("raw_client", "calls_per_s"),
                           ("bare_aiohttp_client", "calls_per_s"), ("sequential", "calls_per_s"),
                           ("dispatcher_alone", "reminders_per_s")):
            baselines.append(((zero.get(key) or {}).get(field), (old_zero.get(key) or {}).get(field)))
        factors = [now / then for now, then in baselines if now and then]
        ratio = zero["service"]["calls_per_s"] / zero["raw_client"]["calls_per_s"]
        old_ratio = old_zero["service"]["calls_per_s"] / old_zero["raw_client"]["calls_per_s"]
        old_secs = old_slow["service"].get("commit_to_all_sent_s")
        edge = "within" if old_secs is not None and old_secs <= within else "over"
        text += (f" On the {_host(previous)} host of {_day(previous)} the rounds took "
                 f"{_spread(old_slow['service'], 'commit_to_all_sent_s', 2, ' s')} at {old_slow['latency_ms']} ms, "
                 f"{edge} the {_g(within)} s (bench/results/dispatch_previous_host.json); the run above, on the "
                 f"{_host(dispatch)} host of {_day(dispatch)}, has its baselines at {_n(min(factors), 1)}–"
                 f"{_n(max(factors), 1)} times those of the {_host(previous)} host (raw client "
                 f"{_n(zero['raw_client']['calls_per_s'])} calls/s against "
                 f"{_n(old_zero['raw_client']['calls_per_s'])}) "
                 f"and the service at {ratio:.2f} × its raw client ({old_ratio:.2f} then): compare ratios across "
                 "hosts, not absolutes.")
    add(text)
    add("")


def _limits_api(add: Add, api: dict[str, Any], profile: dict[str, Any] | None) -> None:
    pairs, starlette = api.get("pairs", {}), api.get("starlette_floors") or {}
    get = pairs.get("get")
    p99 = (f"; GET's p99 is {_n(max(r['p99_ms'] for r in get['replica']), 1)} ms now (the API table)"
           if get else "")
    answer = "one validation + orjson (`_answer`)"
    named = (((profile or {}).get("routes") or {}).get("list") or {}).get("named_inclusive") or {}
    largest = (f" ({named[answer]:.0f} % of the list route's samples in the profile after"
               f"{', the largest named cost' if named[answer] == max(named.values()) else ''})"
               if named.get(answer) is not None else "")
    faster = ""
    if get and starlette.get("get", {}).get("rps"):
        faster = (f"; the same floors on Starlette alone (the last rows of the API table) run GET "
                  f"{starlette['get']['rps'] / get['floor']['rps']:.1f} times as fast as the FastAPI floor, and "
                  f"against them the replica's GET is {get['replica_rps'] / starlette['get']['rps']:.2f}: that gap "
                  "is FastAPI's own per-request work, which the service keeps (decision 0162)")
    add("**API (issue 16; docs/decisions/0161, 0162).** The profile before (table above) named: the pool's "
        "pre-ping, its BEGIN, query and ROLLBACK before every checkout; the ORM — row loading and identity map for "
        "reads, a second `selectin` query for every list page and PATCH, the unit-of-work flush for writes, and a "
        "re-read after every write; FastAPI dependency solving (session, settings, token); the response model "
        "built in the route and validated again by `response_model`. Now `service/appointments.py` reads and "
        "writes through SQLAlchemy Core with statements built once — one joined SELECT per read or page; a create "
        "in ONE statement on PostgreSQL (the appointment's INSERT in a WITH, the reminders' INSERT after it), "
        "atomic on its own and so sent outside an explicit transaction: one round trip where the floor makes a "
        "BEGIN, two INSERTs and a COMMIT; SELECT … FOR UPDATE plus one statement per changed table for a PATCH; "
        "nothing read back — each call a plain function over a `Connection` run in one greenlet hop "
        "(`Database.read`/`write`/`write_one`); single statements on a pool of their own that stays in "
        "autocommit and does no reset at checkin; no pre-ping; the routes take the `Request`, validate the answer "
        "once and write it with orjson (the bytes pydantic writes); the bearer scheme is written into the OpenAPI "
        "document rather than solved as a dependency on every request; FastAPI's native OpenTelemetry is off; a "
        "create parses the phone number once and renders its wording with the locale's patterns looked up once "
        "per template. `reminders serve` freezes what startup made (`gc.freeze()`): full collections walking the "
        f"startup objects with the event loop stopped were the p99 of every route{p99}. What separates a route "
        "from its floor now, by the profile after: SQLAlchemy's execution path (checkout and checkin through its "
        "pool and events, execution context, result rows, the greenlet hop) against asyncpg's `fetch`; the "
        "pure-ASGI middlewares issue 12 added (request deadline, auth, body limit) against a route with none; one "
        "validation of the answer against the response model, which the floors, returning untyped dicts, skip"
        f"{largest}; and for POST the planning, the number policy and the wording, which the floor does not do. "
        f"The floors are FastAPI routes{faster}.")
    add("")


def _limits_failover(add: Add, failover: dict[str, Any], before: dict[str, Any] | None) -> None:
    configs, figures = _configs(failover), failover.get("figures", {})
    graceful = [figures[k]["median"] for k in figures if k.endswith("/graceful") and figures[k].get("median")]
    resign = f": {min(graceful) * 1000:.0f}–{max(graceful) * 1000:.0f} ms (medians)" if graceful else ""
    pair = _inproc(failover)
    sigkill = _growth(failover, "sigkill")
    flat = ""
    if pair and sigkill:
        shape = "flat" if not any(grew for *_, grew in sigkill) else "growing"
        flat = f"; {shape} from {_candidates(pair[0])} to {_candidates(pair[1])} candidates"
    add(f"**Failover.** A graceful resign is one etcd txn plus the successor's watch{resign}. SIGKILL waits for the "
        "lease to expire on the server: up to the TTL after the kill, less the time since the last keepalive "
        f"landed{flat}. After an etcd outage the leader steps down on its local deadline (last acknowledged "
        "keepalive + TTL − margin), before etcd could let anyone else in.")
    add("")
    add(_recovery_note(failover, before))
    if pair and configs:
        small, large = _candidates(pair[0]), _candidates(pair[1])
        real = next((c for c in configs if c.startswith("real")), None)
        add(f"- *graceful, in-process only*: the successor watches only its predecessor (no herd in the election), "
            f"but every `Elector` also observes the leader key; with {large - 1} electors packed into one process "
            f"all {large - 1} wake in one event loop on each change (a run with the observer patched out, not kept "
            f"in bench/, put {large} candidates level with {small})."
            + (f" Replicas are separate processes, so `{real}` is the figure that applies to a deployment." if real
               else ""))


def _recovery_note(failover: dict[str, Any], before: dict[str, Any] | None) -> str:
    def medians(result: dict[str, Any]) -> str:
        return ", ".join(f"{small:.2f} → {large:.2f} s at TTL {ttl}"
                         for ttl, small, large, _ in _growth(result, "outage_recovery"))

    pair = _inproc(failover)
    sizes = f"{_candidates(pair[0])} → {_candidates(pair[1])}: " if pair else ""
    then = (f" That grew with N ({sizes}{medians(before)} in bench/results/failover_before.json, "
            f"`{before.get('command')}` on the {_host(before)} host of {_day(before)})." if before and pair else "")
    return ("- *recovery after an outage (fixed: service/election)*: old keys keep their leases across an etcd "
            "restart and every new campaign key is younger, so the first leader waits for the slowest of the N "
            f"candidates' revocations, and the revoke backoff then grew to seconds.{then} Now a failed revoke "
            "retries as soon as etcd grants the elector its next lease, its backoff is capped lower, and so is "
            f"gRPC's reconnect backoff: see the outage_recovery column ({sizes}{medians(failover)} in this run).")
