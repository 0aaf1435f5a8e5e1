"""BENCHMARKS.md and the README's quoted figures are the render of the committed bench/results/*.json.

Nobody edits either by hand: `python -m bench report` rewrites both (bench/report.py and
bench/readme.py). A figure changed in the text, or a result re-run without re-rendering, fails here.
"""

from __future__ import annotations

import copy
import difflib
import re
import zlib
from pathlib import Path
from typing import Any

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


# -- no figure typed into the prose --------------------------------------------------------------
#
# BENCHMARKS.md and the README's figures are rendered twice: from the stored results, and from the
# same results with every number in them changed — each int and float by a factor of its own (so
# ratios between them change too), every run of digits inside strings and keys alike (so keys such
# as "inproc-50/ttl3/graceful" stay consistent with the values that name them), and every list of
# numbers one value longer (so counts of rounds change) — with TARGETS changed the same way. A
# number or a number word of the prose that survives in the same place of both renderings was not
# rendered from the results: a typed figure. The only ones allowed are references that name
# things, not measure them (ALLOWED).

_NUMBER = r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?!\w)"
_TOKEN = re.compile(rf"(?P<number>{_NUMBER})|(?P<word>\w+)|(?P<mark>\S)")
# spelled-out counts and comparisons ("about twice", "a quarter of", "three rounds")
_NUMBER_WORDS = frozenset(
    "two three four five six seven eight nine ten eleven twelve dozen hundred thousand million "
    "twice thrice half halves quarter quarters third thirds double doubled triple tripled".split())
# what the prose may keep whatever the results: names of decisions, issues and routes, and the
# structure of a statement it describes (each with what it names)
ALLOWED = (
    r"decisions?/?\s?(?:\d{4}, )*\d{4}$",  # docs/decisions/0161, 0162; decision 0162
    r"issue \d+$",  # issue 16, issue 12
    r"limit=\d+$",  # the route GET /appointments?limit=100
    r"by package \(top \d+$",  # how many packages the profile tables show of those recorded
    r"floor makes a BEGIN, two$",  # the floor's statements: BEGIN, two INSERTs, COMMIT
    r"shows as two$",  # A-B-A: two replica runs beside one floor run
)


# fields whose names hold digits that name, not count: percentiles, HTTP status classes
_NAMES = re.compile(r"p\d+_ms|non_\dxx")


def _vary_int(n: int, salt: str = "") -> int:
    return int(n * (1.3 + zlib.crc32(f"{salt}{n}".encode()) % 97 / 50)) + 1


def _vary_float(x: float, where: str, salt: str = "") -> float:
    """A measurement: its factor depends on where it is too, so that ratios between figures change."""
    return round(x * (1.3 + zlib.crc32(f"{salt}{where}={x!r}".encode()) % 97 / 50) + 0.57, 4)


def _vary(value: Any, where: str = "", salt: str = "") -> Any:
    """`value` (a result's JSON) with every number in it changed (ints, which name things too — TTLs,
    candidates, latencies — the same wherever they are, in keys and strings alike); another `salt`,
    other factors."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return _vary_int(value, salt)
    if isinstance(value, float):
        return _vary_float(value, where, salt)
    if isinstance(value, str):
        return re.sub(r"\d+", lambda m: str(_vary_int(int(m.group()), salt)), value)
    if isinstance(value, list):
        varied = [_vary(item, f"{where}/{i}", salt) for i, item in enumerate(value)]
        if varied and all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in varied):
            varied.append(max(varied) + 1)  # how many values a list holds is a figure too
        return varied
    if isinstance(value, dict):
        return {key if _NAMES.fullmatch(key) else _vary(key, salt=salt): _vary(item, f"{where}/{key}", salt)
                for key, item in value.items()}
    raise TypeError(type(value))


def _as_the_bench_writes_now(results: dict[str, Any]) -> dict[str, Any]:
    """The stored results with the fields the bench records since the report stopped typing them."""
    from bench import api, dispatch
    from bench.common import CALIBRATION_ADDITIONS, CALIBRATION_BEST_OF

    results = copy.deepcopy(results)
    for name, result in results.items():
        if result:
            result["tree"] = {"commit": f"{name[:3]}c0ffee", "dirty": False}
            result["conditions"]["calibration_loop"] = {"additions": CALIBRATION_ADDITIONS,
                                                        "best_of": CALIBRATION_BEST_OF}
    for name in ("dispatch", "dispatch_before", "dispatch_client_before", "dispatch_previous_host"):
        results[name].update(postgresql="15.8 (Debian 15.8-1.pgdg120+1)", service_defaults=dispatch.service_defaults())
    results["api"].update(warmup_s=api.WARMUP_S, appointments=api.APPOINTMENTS)
    results["micro"]["client"]["latency_ms"] = 0.0
    return results


def _rendered(results: dict[str, Any]) -> str:
    return "\n".join([report.render(results), readme.figures(results["dispatch"]), readme.api_figures(results["api"])])


def _tokens(text: str) -> list[tuple[str, str, int]]:
    return [(m.lastgroup or "", m.group(), m.end()) for m in _TOKEN.finditer(text)]


def survivors(first: str, second: str) -> list[str]:
    """The numbers and number words that stand in the same place of both renderings, with the text before each."""
    a, b = _tokens(first), _tokens(second)
    matcher = difflib.SequenceMatcher(None, [t[:2] for t in a], [t[:2] for t in b], autojunk=False)
    found = []
    for block in matcher.get_matching_blocks():
        for kind, token, end in a[block.a : block.a + block.size]:
            if kind == "number" or (kind == "word" and token.lower() in _NUMBER_WORDS):
                context = first[max(0, end - 60) : end]
                if not any(re.search(pattern, context) for pattern in ALLOWED):
                    found.append(context.replace("\n", " "))
    return found


@pytest.fixture(params=["stored results", "as the bench writes them now"])
def results(request: pytest.FixtureRequest) -> dict[str, Any]:
    stored = report.load_results()
    return stored if request.param == "stored results" else _as_the_bench_writes_now(stored)


SALTS = ("", "again")  # two variations: a figure that happens to land where another stood survives one only


def typed_figures(results: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The figures of the rendering that stand in place whatever the results and targets say: those
    that survive two different variations of every number."""
    first = _rendered(results)
    targets = dict(report.TARGETS)
    found: list[list[str]] = []
    for salt in SALTS:
        monkeypatch.setattr(report, "TARGETS", {key: _vary(value, salt=salt) for key, value in targets.items()})
        second = _rendered(_vary(results, salt=salt))
        assert first != second
        found.append(survivors(first, second))
    return [context for context in found[0] if context in found[1]]


def test_every_figure_of_the_prose_is_rendered_from_the_results(
    results: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    typed = typed_figures(results, monkeypatch)
    assert not typed, "figures that did not follow the results (typed into bench/report.py or readme.py?):\n" + (
        "\n".join(f"  …{context}" for context in typed))


def test_the_check_finds_a_typed_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: a figure and a comparison typed into the prose are found."""
    stored = report.load_results()
    render = report.render
    monkeypatch.setattr(report, "render", lambda results: render(results).replace(
        "## What limits the figures", "## What limits the figures\n\nThe issue quoted ≈ 3,700 calls/s, about twice "
        "the rate here."))
    typed = typed_figures(stored, monkeypatch)
    planted = [context for context in typed if "The issue quoted" in context]
    assert [context.rsplit(" ", 1)[1] for context in planted] == ["3,700", "twice"], typed
