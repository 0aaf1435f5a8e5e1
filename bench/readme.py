"""The README's quoted benchmark figures, rendered from bench/results/ like BENCHMARKS.md.

The README's sizing sentences (dispatch, API) each sit between two markers; `python -m bench
report` (and every bench run) rewrites them with the figures of the committed results, formatted
exactly as BENCHMARKS.md formats them, so that the two cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import ROOT, read_result
from .report import API_PAIRS, _n, _spread, fast_and_slow  # BENCHMARKS.md's own formatting

__all__ = ["API_BEGIN", "API_END", "BEGIN", "END", "README", "api_figures", "figures", "rewrite", "write"]

README = ROOT / "README.md"
BEGIN = "<!-- bench figures: written by `python -m bench report` from bench/results/dispatch.json -->"
END = "<!-- end of bench figures -->"
API_BEGIN = "<!-- api figures: written by `python -m bench report` from bench/results/api.json -->"
API_END = "<!-- end of api figures -->"

_MISSING = object()


def figures(dispatch: Any = _MISSING) -> str:
    """The sizing sentence on dispatch throughput, with the committed run's figures (or `dispatch`'s)."""
    if dispatch is _MISSING:
        dispatch = read_result("dispatch")
    zero, slow = fast_and_slow(dispatch)
    if not dispatch or not zero or not slow:
        return "(no dispatch results in bench/results/: run `python -m bench dispatch`)"
    return (
        f"on the {dispatch['machine'].get('nproc', '?')}-vCPU machine of BENCHMARKS.md one leader dispatched "
        f"{_spread(zero['service'], 'calls_per_s', unit=' calls/s')} end-to-end with the provider at "
        f"{zero['latency_ms']} ms latency, and {_n(slow['reminders'])} reminders due at once at "
        f"{slow['latency_ms']} ms took "
        f"{_spread(slow['service'], 'commit_to_all_sent_s', 2, ' s')} with "
        f"`DISPATCH_CONCURRENCY={slow['concurrency']}` (median [min–max] over the rounds)"
    )


def api_figures(api: Any = _MISSING) -> str:
    """The sizing sentence on one replica's API throughput, with the committed run's figures (or `api`'s)."""
    if api is _MISSING:
        api = read_result("api")
    pairs = (api or {}).get("pairs", {})
    if not all(key in pairs for key in ("get", "post", "list")):
        return "(no API results in bench/results/: run `python -m bench api`)"

    def route(key: str) -> str:
        runs = pairs[key]["replica"]
        return (f"`{API_PAIRS[key][0]}` at {_n(pairs[key]['replica_rps'])} req/s "
                f"(p99 {_n(max(r['p99_ms'] for r in runs), 1)} ms)")

    return (
        f"on the {api['machine'].get('nproc', '?')}-vCPU machine of BENCHMARKS.md, shared with PostgreSQL and the "
        f"load generator, one replica served {route('get')}, {route('post')} and {route('list')}"
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
