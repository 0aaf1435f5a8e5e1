"""BENCHMARKS.md is regenerated from the committed bench/results/*.json: the report must render them."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import report


def test_report_renders_the_committed_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "OUT", tmp_path / "BENCHMARKS.md")
    text = report.write().read_text()
    assert "## Summary against the targets" in text
    for section in ("## Dispatch: 10,000 reminders due at once", "## Failover", "## API: one worker against PostgreSQL"):
        assert section in text
    assert "| dispatch, 0 ms provider" in text and "| API GET /appointments/{id}" in text
    assert "None" not in text  # every figure found its value
