"""The README's quoted benchmark figures, rendered from bench/results/ like BENCHMARKS.md.

The README's sizing sentences (dispatch, API) each sit between two markers; `python -m bench
report` (and every bench run) rewrites them with the figures of the committed results, formatted
exactly as BENCHMARKS.md formats them, so that the two cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

from .common import ROOT, read_result
from .report import _dispatch_runs, _n, _spread  # BENCHMARKS.md's own formatting

__all__ = ["API_BEGIN", "API_END", "BEGIN", "END", "README", "api_figures", "figures", "rewrite", "write"]

README = ROOT / "README.md"
BEGIN = "<!-- bench figures: written by `python -m bench report` from bench/results/dispatch.json -->"
END = "<!-- end of bench figures -->"
API_BEGIN = "<!-- api figures: written by `python -m bench report` from bench/results/api.json -->"
API_END = "<!-- end of api figures -->"


def figures() -> str:
    """The sizing sentence on dispatch throughput, with the committed run's figures."""
    dispatch = read_result("dispatch")
    runs = _dispatch_runs(dispatch)
    zero, hundred = runs.get(0), runs.get(100)
    if not dispatch or not zero or not hundred:
        return "(no dispatch results in bench/results/: run `python -m bench dispatch`)"
    return (
        f"on the {dispatch['machine'].get('nproc', '?')}-vCPU machine of BENCHMARKS.md one leader dispatched "
        f"{_spread(zero['service'], 'calls_per_s', unit=' calls/s')} end-to-end with a provider that answers at "
        f"once, and 10,000 reminders due at once at 100 ms took "
        f"{_spread(hundred['service'], 'commit_to_all_sent_s', 2, ' s')} with "
        f"`DISPATCH_CONCURRENCY={hundred['concurrency']}` (median [min–max] over the rounds)"
    )


def api_figures() -> str:
    """The sizing sentence on one replica's API throughput, with the committed run's figures."""
    api = read_result("api")
    pairs = (api or {}).get("pairs", {})
    if not all(key in pairs for key in ("get", "post", "list")):
        return "(no API results in bench/results/: run `python -m bench api`)"

    def route(key: str) -> str:
        runs = pairs[key]["replica"]
        return f"{_n(pairs[key]['replica_rps'])} req/s (p99 {_n(max(r['p99_ms'] for r in runs), 1)} ms)"

    return (
        f"on the {api['machine'].get('nproc', '?')}-vCPU machine of BENCHMARKS.md, shared with PostgreSQL and the "
        f"load generator, one replica served `GET /appointments/{{id}}` at {route('get')}, `POST /appointments` at "
        f"{route('post')} and pages of 100 at {route('list')}"
    )


def _between(text: str, begin: str, end: str, content: str) -> str:
    head, found, rest = text.partition(begin)
    _, found_end, tail = rest.partition(end)
    if not found or not found_end:
        raise ValueError(f"README.md lacks the markers {begin!r} … {end!r}")
    return f"{head}{begin}\n{content}\n{end}{tail}"


def rewrite(text: str) -> str:
    """`text` (the README) with the parts between the markers re-rendered."""
    return _between(_between(text, BEGIN, END, figures()), API_BEGIN, API_END, api_figures())


def write() -> Path:
    """Rewrite the README's figures in place; returns its path."""
    README.write_text(rewrite(README.read_text()))
    return README
