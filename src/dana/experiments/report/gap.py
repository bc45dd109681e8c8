"""The gap between worker and master parameters over training (paper Figure 1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from dana.experiments.report.groups import Group
from dana.experiments.report.load import Run
from dana.experiments.report.style import algorithm_colour, algorithm_label, new_figure, save_figure
from dana.experiments.report.tables import epoch_curve

_GAP_TARGET_WORKERS = 8


def _plot_gap_lines(
    ax: Axes, lines: Sequence[tuple[str, Any, Sequence[Run]]], title: str, empty: str
) -> bool:
    """One mean-gap curve per ``(label, colour, runs)``; returns whether any was drawn."""
    drawn = False
    for label, colour, runs in lines:
        epochs, gaps = epoch_curve(runs, "gap_mean")
        positive = gaps > 0
        if not positive.any():
            # log axes cannot show 0: keep the entry so the reader knows why there is no line
            ax.plot([], [], color=colour, label=f"{label} (gap = 0)")
            continue
        ax.plot(epochs[positive], gaps[positive], color=colour, label=label, linewidth=1.6)
        drawn = True
    if drawn:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean gap G(Δθ) per update")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    return drawn


def _gap_workers(group: Group) -> int:
    """The N closest to 8 among the group's multi-worker runs (ties: the smaller N)."""
    counts = [n for n in group.workers() if n > 1] or group.workers()
    return min(counts, key=lambda n: (abs(n - _GAP_TARGET_WORKERS), n))


def plot_gap(group: Group, path: Path) -> list[Path]:
    """Gap over training (paper Figure 1): (a) DANA at every N, (b) all algorithms at N ≈ 8.

    Returns no paths, writing nothing, when the group logged no positive gap at all.
    """
    if not group.runs:
        return []
    dana = "dana" if any(r.algorithm == "dana" for r in group.runs) else "dana-zero"
    dana_counts = sorted({r.workers for r in group.runs if r.algorithm == dana})
    colours = colormaps["viridis"](np.linspace(0.0, 0.85, max(len(dana_counts), 1)))
    by_n = [
        (f"N = {n}", colours[i], [r for r in group.runs if r.algorithm == dana and r.workers == n])
        for i, n in enumerate(dana_counts)
    ]
    target = _gap_workers(group)
    by_algorithm = [
        (
            algorithm_label(a),
            algorithm_colour(a),
            [r for r in group.runs if r.algorithm == a and r.workers == target],
        )
        for a in group.algorithms()
        if any(r.algorithm == a and r.workers == target for r in group.runs)
    ]
    fig, axes = new_figure(12.0, 4.6, ncols=2)
    drawn_a = _plot_gap_lines(
        axes[0, 0], by_n, f"(a) {algorithm_label(dana)} at every N", "no DANA runs in this group"
    )
    drawn_b = _plot_gap_lines(
        axes[0, 1], by_algorithm, f"(b) every algorithm at N = {target}", "no positive gap"
    )
    if not (drawn_a or drawn_b):
        return []
    fig.suptitle(f"Gap between worker and master parameters\n{group.title}")
    return save_figure(fig, path)
