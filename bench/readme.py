"""The README's quoted benchmark figures, rendered from bench/results/ like BENCHMARKS.md.

The README's sizing sentence sits between two markers; `python -m bench report` (and every
bench run) rewrites it with the figures of the committed dispatch results, formatted exactly as
BENCHMARKS.md formats them, so that the two cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

from .common import ROOT, read_result
from .report import _dispatch_runs, _spread  # BENCHMARKS.md's own formatting

__all__ = ["BEGIN", "END", "README", "figures", "rewrite", "write"]

README = ROOT / "README.md"
BEGIN = "<!-- bench figures: written by `python -m bench report` from bench/results/dispatch.json -->"
END = "<!-- end of bench figures -->"


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


def rewrite(text: str) -> str:
    """`text` (the README) with the part between the markers re-rendered."""
    head, found, rest = text.partition(BEGIN)
    _, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} … {END!r}")
    return f"{head}{BEGIN}\n{figures()}\n{END}{tail}"


def write() -> Path:
    """Rewrite the README's figures in place; returns its path."""
    README.write_text(rewrite(README.read_text()))
    return README
