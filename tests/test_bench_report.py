"""BENCHMARKS.md and the README's quoted figures are the render of the committed bench/results/*.json.

Nobody edits either by hand: `python -m bench report` rewrites both (bench/report.py and
bench/readme.py). A figure changed in the text, or a result re-run without re-rendering, fails here.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

from bench import readme, report

ROOT = Path(__file__).resolve().parents[1]


def _diff(expected: str, actual: str, name: str) -> str:
    lines = difflib.unified_diff(
        expected.splitlines(), actual.splitlines(), f"render of bench/results ({name})", name, lineterm="", n=1
    )
    return "\n".join(["", *list(lines)[:40], "", "run `python -m bench report` to re-render"])


@pytest.fixture
def rendered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """BENCHMARKS.md as `python -m bench report` would write it now."""
    monkeypatch.setattr(report, "OUT", tmp_path / "BENCHMARKS.md")
    return report.write().read_text()


def test_benchmarks_md_is_the_render_of_the_committed_results(rendered: str) -> None:
    committed = (ROOT / "BENCHMARKS.md").read_text()
    assert committed == rendered, _diff(rendered, committed, "BENCHMARKS.md")


def test_the_render_finds_every_figure(rendered: str) -> None:
    text = rendered
    assert "## Summary against the targets" in text
    sections = ("## Dispatch: 10,000 reminders due at once", "## Failover", "## API: one worker against PostgreSQL")
    for section in sections:
        assert section in text
    assert "| dispatch, 0 ms provider" in text and "| API GET /appointments/{id}" in text
    assert "None" not in text  # every figure found its value


def test_readme_quotes_the_rendered_figures(rendered: str) -> None:
    text = (ROOT / "README.md").read_text()
    assert readme.rewrite(text) == text, _diff(readme.rewrite(text), text, "README.md")
    # and the quoted figures are BENCHMARKS.md's own: each "median [min–max]" is in its summary
    figures = re.findall(r"(\d[\d,.]*)(?: calls/s| s)? \[(\d[\d,.]*–\d[\d,.]*)\]", readme.figures())
    summary = rendered.split("## Summary against the targets", 1)[1].split("\n## ", 1)[0]
    assert len(figures) == 2, figures
    for median, span in figures:
        quoted = f"{median} [{span}]"
        assert quoted in summary.replace(" s [", " ["), f"README quotes {quoted}, not in the summary"
