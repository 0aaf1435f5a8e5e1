"""The chaos pictures (harness/chaos_plot.py) and how `make chaos` rewrites RELIABILITY.md.

The scenarios themselves run in tests/test_chaos.py; here the drawing gets a made-up run, and the
report writer an existing file with a section that is not its own.
"""

from __future__ import annotations

import struct
from pathlib import Path

from harness.chaos import keep_other_sections
from harness.chaos_plot import Band, Timeline, bands, draw_timeline
from harness.cluster import LeaderTerm

T0 = 1_800_000_000.0


def _post(at: float, replica: str, status: int = 201, replayed: bool = False) -> dict:
    return {"received_at": T0 + at, "placed_by": replica, "status": status, "replayed": replayed,
            "idempotency_key": f"reminder-{at}"}


def test_a_killed_leaders_term_lasts_until_its_successor_starts_and_the_open_one_until_the_end() -> None:
    terms = [
        LeaderTerm(7, "replica-0", T0 - 30, ended=T0 - 20),  # before the window
        LeaderTerm(8, "replica-1", T0 - 20),  # killed: its end never seen
        LeaderTerm(9, "replica-2", T0 + 4),  # still leading
    ]

    drawn = bands(terms, end=T0 + 10, since=T0)

    assert drawn == [Band("replica-1", 8, T0, T0 + 4), Band("replica-2", 9, T0 + 4, T0 + 10)]


def test_a_run_is_drawn_as_a_png(tmp_path: Path) -> None:
    posts = [_post(0.1 * i, "replica-1") for i in range(30)]
    posts += [_post(4.2, "replica-2", replayed=True), _post(4.3, "replica-2", status=500)]
    posts += [_post(4.0 + 0.1 * i, "replica-2") for i in range(20)]
    timeline = Timeline(
        scenario="leader-sigkill", origin=T0, end=T0 + 7,
        posts=posts, terms=[Band("replica-1", 8, T0, T0 + 3.2), Band("replica-2", 9, T0 + 3.9, T0 + 7)],
        fault=(T0 + 3.1, T0 + 5.0), fault_label="SIGKILL the leader", caption="50 calls, 0 duplicates",
        replicas=["replica-0", "replica-1", "replica-2"],
    )

    path = draw_timeline(timeline, tmp_path / "pictures" / "leader-sigkill.png")

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert width >= 800 and height >= 300


def test_rows_are_the_running_replicas_and_any_that_called_by_number() -> None:
    timeline = Timeline(
        scenario="s", origin=T0, end=T0 + 1, posts=[_post(0.5, "replica-10"), _post(0.6, "replica-9")],
        terms=[], fault=(T0, T0), replicas=["replica-1", "replica-0"],
    )

    assert timeline.rows() == ["replica-0", "replica-1", "replica-9", "replica-10"]


OLD = """# Reliability

old preamble

## Result

old table

## Bad values

| tried | got |
|---|---|
| a 300-character provider id | recorded |

## Every run

old runs
"""

NEW = """# Reliability

new preamble

## Result

new table

## Every run

new runs
"""


def test_the_report_keeps_sections_it_does_not_write_where_they_were() -> None:
    merged = keep_other_sections(NEW, OLD)

    bad_values = "## Bad values\n\n| tried | got |\n|---|---|\n| a 300-character provider id | recorded |\n"
    assert merged == NEW.replace("new table\n", "new table\n\n" + bad_values)
    assert "old" not in merged


def test_a_first_report_is_written_as_it_is() -> None:
    assert keep_other_sections(NEW, "") == NEW
