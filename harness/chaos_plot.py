"""One picture per chaos run: calls over time coloured by replica, leader terms as bands, the fault
marked — so a reader sees at once that no two replicas ever placed new calls at the same time.

`make chaos` draws one per scenario into docs/chaos/ (RELIABILITY.md shows them). matplotlib runs
on its headless Agg backend: no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Band", "Timeline", "draw_timeline"]

BIN_SECONDS = 0.25  # width of one bar of the calls-per-time histogram


@dataclass(frozen=True)
class Band:
    """A leader term: `replica` led (fencing token `token`) from `start` to `end` (epoch seconds)."""

    replica: str
    token: int
    start: float
    end: float


@dataclass
class Timeline:
    """What one chaos run looked like from outside: every POST the provider received, the leader
    terms the replicas' GET /leader showed and the span of the fault (epoch seconds)."""

    scenario: str
    origin: float  # the reminders were seeded: x = 0
    end: float  # the run was verified
    posts: list[dict[str, Any]]  # the provider's request log: received_at, placed_by, status, replayed
    terms: list[Band]
    fault: tuple[float, float]  # injected .. undone
    fault_label: str = ""
    caption: str = ""
    replicas: list[str] = field(default_factory=list)  # running at the end (drawn even if idle)

    def rows(self) -> list[str]:
        """The replicas drawn, by number: those running at the end and any that led or called."""
        names = set(self.replicas) | {p["placed_by"] for p in self.posts} | {t.replica for t in self.terms}
        return sorted(names, key=_replica_order)


def _replica_order(name: str) -> tuple[str, int]:
    prefix, _, number = name.rpartition("-")
    return (prefix, int(number)) if number.isdigit() else (name, -1)


def bands(terms: Sequence[Any], end: float, since: float) -> list[Band]:
    """Leader terms (`harness.cluster.LeaderTerm`, as GET /leader showed them) as bands: a term
    never seen to end (its replica was killed) lasts until the next term starts; the last open one
    until `end`."""
    out = []
    for index, term in enumerate(terms):
        stop = term.ended
        if stop is None:
            stop = terms[index + 1].started if index + 1 < len(terms) else end
        if stop >= since:
            out.append(Band(term.replica, term.token, max(term.started, since), min(stop, end)))
    return out


def draw_timeline(timeline: Timeline, path: Path) -> Path:
    """Write `timeline` as a PNG at `path` (folders created); returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = timeline.rows()
    palette = plt.get_cmap("tab10").colors
    colour = {name: palette[index % len(palette)] for index, name in enumerate(rows)}
    t0 = timeline.origin
    span = max(timeline.end - t0, 1.0)

    def x(at: float) -> float:
        return at - t0

    new = [p for p in timeline.posts if p["status"] == 201 and not p["replayed"]]
    replayed = [p for p in timeline.posts if p["status"] == 201 and p["replayed"]]
    refused = [p for p in timeline.posts if p["status"] != 201]

    fig, (top, raster) = plt.subplots(
        2, 1, sharex=True, figsize=(11, 3.2 + 0.45 * len(rows)),
        gridspec_kw={"height_ratios": [2.2, 0.6 + 0.35 * len(rows)]},
    )
    # leader terms: bands behind the histogram, bars on each replica's row
    for band in timeline.terms:
        top.axvspan(x(band.start), x(band.end), color=colour[band.replica], alpha=0.13, lw=0)
        raster.broken_barh([(x(band.start), band.end - band.start)], (rows.index(band.replica) - 0.38, 0.76),
                           color=colour[band.replica], alpha=0.22, lw=0)
        raster.annotate(f"token {band.token}", (x(band.start), rows.index(band.replica) - 0.38),
                        xytext=(2, -1), textcoords="offset points", va="top", fontsize=7, color="0.3")
    # new calls per bin, stacked by replica
    bins = [index * BIN_SECONDS for index in range(int(span / BIN_SECONDS) + 2)]
    series = [[x(p["received_at"]) for p in new if p["placed_by"] == name] for name in rows]
    top.hist(series, bins=bins, stacked=True, color=[colour[name] for name in rows], label=rows, lw=0)
    top.set_ylabel(f"new calls / {BIN_SECONDS:g} s")
    # every POST on its replica's row
    for marks, style in ((new, {"marker": "|", "s": 60}), (replayed, {"marker": "o", "s": 22, "facecolors": "none"}),
                         (refused, {"marker": "x", "s": 18})):
        if not marks:
            continue
        colours = ["0.45" if marks is refused else ("black" if marks is replayed else colour[p["placed_by"]])
                   for p in marks]
        raster.scatter([x(p["received_at"]) for p in marks], [rows.index(p["placed_by"]) for p in marks],
                       c=None if marks is replayed else colours, edgecolors=colours if marks is replayed else None,
                       linewidths=0.9, **style)
    raster.set_yticks(range(len(rows)), rows)
    raster.set_ylim(len(rows) - 0.5, -0.5)
    raster.set_xlabel("seconds since the reminders were seeded")
    # the fault: a red strip along the top from injected to undone, a red line where it hit
    start, healed = x(timeline.fault[0]), x(max(timeline.fault[1], timeline.fault[0] + 0.05))
    top.axvspan(start, healed, ymin=0.93, ymax=1.0, color="crimson", alpha=0.75, lw=0)
    for axis in (top, raster):
        axis.axvline(start, color="crimson", lw=1.2)
    top.annotate(timeline.fault_label or "fault", (start, 0.9), xycoords=("data", "axes fraction"),
                 xytext=(4, 0), textcoords="offset points", color="crimson", fontsize=8, va="top",
                 bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "crimson", "alpha": 0.85})
    top.set_xlim(0, span)
    legend = [Patch(color=colour[name], label=name) for name in rows]
    legend += [Patch(facecolor="0.85", label="leader term (band)"),
               Patch(color="crimson", alpha=0.75, label="fault: injected … undone"),
               Line2D([], [], ls="", marker="o", mfc="none", mec="black", label="replay (same key, stored call)"),
               Line2D([], [], ls="", marker="x", color="0.45", label="refused / failed POST")]
    top.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    title = timeline.scenario + (f" — {timeline.caption}" if timeline.caption else "")
    top.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
