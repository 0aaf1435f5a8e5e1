"""The CI rule itself: a tool a test requires that is missing fails under CI=true, skips otherwise."""

from __future__ import annotations

import pytest

NEEDS_A_MISSING_TOOL = """
import pytest

@pytest.mark.requires("no-such-tool-h2")
def test_needs_it():
    pass

def test_needs_nothing():
    pass
"""


@pytest.mark.parametrize(("ci", "outcome"), [("true", {"errors": 1}), ("", {"skipped": 1})])
def test_a_missing_required_tool(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str,
                                 outcome: dict) -> None:
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(NEEDS_A_MISSING_TOOL)
    result = pytester.runpytest_inprocess("-p", "tests.support.requirements", "-p", "no:cacheprovider", "-rfEs")
    counts = {"passed": 1, "failed": 0, "errors": 0, "skipped": 0}  # a failure in setup counts as an error
    counts.update(outcome)
    result.assert_outcomes(**counts)
    result.stdout.fnmatch_lines(["*no-such-tool-h2 unavailable*"])

