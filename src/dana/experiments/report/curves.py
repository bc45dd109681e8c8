"""Learning curves: the test error per epoch, one panel per number of workers."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.lines import Line2D

from dana.experiments.report.groups import Group
from dana.experiments.report.style import (
    algorithm_colour,
    algorithm_label,
    algorithm_sort_key,
    label_log_axis,
    new_figure,
    save_figure,
)
from dana.experiments.report.tables import epoch_curve


def plot_learning_curves(group: Group, path: Path) -> list[Path]:
    """Test error per epoch (mean over seeds), one panel per N, one line per algorithm."""
    workers = sorted({run.workers for run in group.runs + group.baseline})
    ncols = min(4, len(workers))
    nrows = math.ceil(len(workers) / ncols)
    fig, axes = new_figure(3.4 * ncols + 1.8, 2.9 * nrows + 0.8, nrows=nrows, ncols=ncols)
    algorithms = sorted({r.algorithm for r in group.runs + group.baseline}, key=algorithm_sort_key)
    lowest, highest = math.inf, 0.0
    for ax, n in zip(axes.flat, workers, strict=False):
        for algorithm in algorithms:
            runs = [
                r
                for r in group.runs + group.baseline
                if r.algorithm == algorithm and r.workers == n
            ]
            epochs, errors = epoch_curve(runs, "test_error")
            positive = errors > 0
            if positive.any():
                ax.plot(epochs[positive], errors[positive], color=algorithm_colour(algorithm))
                lowest = min(lowest, errors[positive].min())
                highest = max(highest, errors[positive].max())
        ax.set_title(f"N = {n}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(workers) :]:
        ax.set_axis_off()
    for ax in axes.flat[: len(workers)]:
        if highest > 0:
            ax.set_yscale("log")
            ax.set_ylim(lowest / 1.15, min(100.0, highest * 1.15))
            label_log_axis(ax)
    for ax in axes[-1, :]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("test error (%)")
    handles = [
        Line2D([], [], color=algorithm_colour(a), label=algorithm_label(a)) for a in algorithms
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=9)
    fig.suptitle(f"Test error during training (mean over seeds, log scale)\n{group.title}")
    return save_figure(fig, path)
