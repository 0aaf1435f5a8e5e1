"""`python -m bench [all|dispatch|failover|api|webhooks|profile|micro|provider|report] [--quick]`: bench/__init__.py.
`python -m bench dispatch --events`: the dispatch rate with no EVENTS_URL, an accepting and a stalled
receiver, in one invocation (bench/events.py, bench/results/dispatch_events.json).
`python -m bench webhooks`: each provider webhook route of one replica against its floor (the same signature
check and SQL on Starlette + asyncpg), A-B-A (bench/webhooks.py, bench/results/webhooks.json).
`python -m bench provider --mode twilio|telnyx [--reminders N] [--rate R]`: a real provider's calls and their
webhooks on three replicas, beside the same run's GET /appointments/{id} and generic path
(bench/provider.py, bench/results/provider_<mode>.json; without --mode, both modes).

Each part writes bench/results/<name>.json (machine facts, load average and a CPU calibration
before and after, the figures); every run ends by regenerating BENCHMARKS.md from the JSON files.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from .common import CALIBRATION_ADDITIONS, CALIBRATION_BEST_OF, calibration, loadavg, log, machine, write_result


def _part(name: str, result_name: str, work, **options) -> None:
    started = time.monotonic()
    before = {"loadavg": loadavg(), "calibration_s": calibration()}
    log(f"{name}: start (load average {before['loadavg']}, calibration {before['calibration_s']} s)")
    data = work(**options)
    after = {"loadavg": loadavg(), "calibration_s": calibration()}
    write_result(result_name, {
        "part": name,
        "options": {k: v for k, v in options.items()},
        "conditions": {"before": before, "after": after,
                       "calibration_loop": {"additions": CALIBRATION_ADDITIONS, "best_of": CALIBRATION_BEST_OF}},
        "wall_s": round(time.monotonic() - started, 1),
        **data,
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmarks against same-run baselines.")
    parser.add_argument("part", nargs="?", default="all",
                        choices=["all", "dispatch", "failover", "api", "profile", "micro", "provider", "webhooks",
                                 "report"])
    parser.add_argument("--quick", action="store_true", help="fewer runs and shorter loads (a smoke run)")
    parser.add_argument("--concurrency", type=int, default=400,
                        help="DISPATCH_CONCURRENCY of the dispatch benchmark (and of its baselines)")
    parser.add_argument("--events", action="store_true",
                        help="dispatch only: the rate without events delivery, with an accepting and with a "
                             "stalled receiver (bench/events.py)")
    parser.add_argument("--mode", choices=["twilio", "telnyx"], default=None,
                        help="provider only: the real provider's mode (default: both, one result each)")
    parser.add_argument("--reminders", type=int, default=None,
                        help="provider only: reminders due at once (default 2,000; 300 with --quick)")
    parser.add_argument("--rate", type=float, default=None,
                        help="provider only: the provider account's calls/s (CALLS_PER_SECOND); default: 80 %% of "
                             "what the machine carries, measured by a warm-up; 0: no limit (the webhooks back up)")
    parser.add_argument("--result-name", default=None, help="file name (without .json) for a single part's results")
    args = parser.parse_args(argv)
    if (args.mode or args.reminders or args.rate is not None) and args.part != "provider":
        parser.error("--mode, --reminders and --rate go with the provider part")
    if args.rate is not None and not 0 <= args.rate <= 10_000:
        parser.error("--rate must be within [0, 10000]")
    if args.reminders is not None and not 50 <= args.reminders <= 20_000:
        parser.error("--reminders must be within [50, 20000]")
    if not 1 <= args.concurrency <= 2000:
        parser.error("--concurrency must be within [1, 2000]")
    if args.events and args.part != "dispatch":
        parser.error("--events goes with the dispatch part")
    if args.result_name and args.part in ("all", "report"):
        parser.error("--result-name needs a single part")
    info = machine()
    log(f"machine: {info['nproc']} cores, {info['cpu']}, Python {info['python']}")
    started = time.monotonic()
    failed: list[str] = []

    def attempt(name: str, module: str, result_name: str | None = None, **options: object) -> None:
        if args.part not in ("all", name):
            return
        try:
            run = importlib.import_module(f"bench.{module}").run
            _part(name, args.result_name or result_name or name, run, **options)
        except Exception:  # noqa: BLE001 - one broken part must not lose the others' results
            log(f"{name} failed:\n{traceback.format_exc()}")
            failed.append(name)

    if args.events:
        args.result_name = args.result_name or "dispatch_events"
        attempt("dispatch", "events", quick=args.quick, concurrency=args.concurrency)
    else:
        attempt("dispatch", "dispatch", quick=args.quick, concurrency=args.concurrency)
    attempt("api", "api", quick=args.quick)
    attempt("webhooks", "webhooks", quick=args.quick)
    attempt("profile", "profile", quick=args.quick)
    attempt("failover", "failover", quick=args.quick)
    attempt("micro", "micro", quick=args.quick)
    for mode in [args.mode] if args.mode else ["twilio", "telnyx"]:
        attempt("provider", "provider", f"provider_{mode}", quick=args.quick, mode=mode, reminders=args.reminders,
                concurrency=args.concurrency, rate=args.rate)
    from . import readme, report

    path = report.write()
    readme.write()  # the figures the README quotes, from the same results
    log(f"wrote {path} and the README's figures ({time.monotonic() - started:.0f} s in all)")
    if failed:
        log(f"FAILED: {', '.join(failed)} (their previous results, if any, were kept)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
