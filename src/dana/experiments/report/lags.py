"""The lag distribution: how many updates were applied at each lag τ, per algorithm and N.

Drawn from the ``lag_histogram`` ({lag: updates}) that ``dana launch`` results record
(simulator results may too); a group none of whose runs has one gets no figure. The lag
of an update is SPEC's: the master updates between the worker's read of the parameters
and the master's application of its gradient. One panel per N, one step line per
algorithm: the updates at each lag, averaged over the seeds that recorded a histogram.
The count axis is logarithmic when the counts span more than two decades.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dana.experiments.report.groups import Group
from dana.experiments.report.load import Run
from dana.experiments.report.style import (
    algorithm_colour,
    algorithm_label,
    algorithm_sort_key,
    grid_columns,
    new_figure,
    save_figure,
)

#: Counts spanning more than this ratio get a logarithmic axis.
_LOG_SPAN = 100.0


def mean_lag_histogram(runs: list[Run]) -> np.ndarray:
    """Updates at lag 0, 1, …, max over ``runs``, averaged over the runs (all recorded one)."""
    totals: dict[int, float] = defaultdict(float)
    for run in runs:
        for lag, count in run.lag_histogram or ():
            totals[lag] += count
    if not totals:
        return np.zeros(0)
    counts = np.zeros(max(totals) + 1)
    for lag, total in totals.items():
        counts[lag] = total / len(runs)
    return counts


def _mean_lag(counts: np.ndarray) -> float:
    total = counts.sum()
    return float((np.arange(counts.size) * counts).sum() / total) if total > 0 else math.nan


def lag_figure(group: Group) -> Figure | None:
    """The lag-distribution figure of ``group``, or None when no run recorded a histogram.

    Step lines are labelled ``"<algorithm label> (mean τ …)"``; panels are titled ``N = n``.
    """
    recorded = [run for run in group.runs + group.baseline if run.lag_histogram is not None]
    if not recorded:
        return None
    cells: dict[tuple[int, str], np.ndarray] = {}
    for key in sorted({(r.workers, r.algorithm) for r in recorded}):
        counts = mean_lag_histogram([r for r in recorded if (r.workers, r.algorithm) == key])
        if counts.sum() > 0:
            cells[key] = counts
    if not cells:
        return None
    workers = sorted({n for n, _ in cells})
    positive = np.concatenate([counts[counts > 0] for counts in cells.values()])
    log = positive.max() / positive.min() > _LOG_SPAN
    ncols = grid_columns(len(workers))
    nrows = math.ceil(len(workers) / ncols)
    fig, axes = new_figure(3.4 * ncols + 1.8, 2.9 * nrows + 1.0, nrows=nrows, ncols=ncols)
    for ax, n in zip(axes.flat, workers, strict=False):
        algorithms = sorted({a for m, a in cells if m == n}, key=algorithm_sort_key)
        for algorithm in algorithms:
            counts = cells[(n, algorithm)]
            edges = np.arange(counts.size + 1) - 0.5
            label = f"{algorithm_label(algorithm)} (mean τ {_mean_lag(counts):.2f})"
            ax.stairs(counts, edges, color=algorithm_colour(algorithm), label=label, linewidth=1.5)
        shown = [cells[(n, a)] for a in algorithms]
        highest = max(counts.max() for counts in shown)
        if log:
            ax.set_yscale("log")
            lowest = min(counts[counts > 0].min() for counts in shown)
            ax.set_ylim(lowest / 2, highest * 2)
        else:
            ax.set_ylim(0, highest * 1.08)
        # At least lags 0..4 on the x-axis: a lone spike at 0 (N = 1) stays a narrow bar.
        ax.set_xlim(-0.7, max(4.5, max(counts.size for counts in shown) - 0.3))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"N = {n}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[len(workers) :]:
        ax.set_axis_off()
    for index, ax in enumerate(axes.flat[: len(workers)]):
        if index + ncols >= len(workers):
            ax.set_xlabel("lag τ (master updates)")
        if index % ncols == 0:
            ax.set_ylabel("updates per run" + (" (log)" if log else ""))
    seeds = {len([r for r in recorded if (r.workers, r.algorithm) == key]) for key in cells}
    if len(seeds) == 1:
        count = seeds.pop()
        over = f"{count} seed" + ("s" if count > 1 else "")
    else:
        over = "the seeds of each line"
    fig.suptitle(f"Lag distribution (updates at each lag, mean over {over})\n{group.title}")
    return fig


def plot_lag_distribution(group: Group, path: Path) -> list[Path]:
    """Write :func:`lag_figure` of ``group`` (PNG and SVG); no paths when it has none."""
    fig = lag_figure(group)
    return [] if fig is None else save_figure(fig, path)
