"""Final test error against the number of workers (paper Figures 2–3)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from dana.experiments.report.groups import Group
from dana.experiments.report.load import DEFAULT_METRIC
from dana.experiments.report.style import (
    algorithm_colour,
    algorithm_label,
    algorithm_sort_key,
    format_metric,
    metric_label,
    metric_unit,
    new_figure,
    save_figure,
)
from dana.experiments.report.tables import Cell


def error_axis_limits(cells: Iterable[Cell]) -> tuple[float, float]:
    """The y-range of the final-error figure: ``(bottom, top)`` in percent.

    Means above ``max(2·best, best + 10)`` (``best`` the lowest mean) are off-scale
    (drawn in the upper panel of a broken axis): the range covers the other means and
    their bands, so that differences of a fraction of a percent stay visible next to a
    diverged run at the chance error. Cells of another metric (a task's, of unknown
    scale and sign) get the range of every mean and band, 8% padded, and no break.
    """
    cells = list(cells)
    if any(cell.metric != DEFAULT_METRIC for cell in cells):
        bottom = min(cell.mean - cell.band for cell in cells)
        top = max(cell.mean + cell.band for cell in cells)
        pad = 0.08 * (top - bottom) or 0.05 * abs(top) or 1.0
        return bottom - pad, top + pad
    best = min(cell.mean for cell in cells)
    cap = max(2.0 * best, best + 10.0)
    shown = [cell for cell in cells if cell.mean <= cap]
    top = min(cap, max(cell.mean + cell.band for cell in shown))
    bottom = max(0.0, min(cell.mean - cell.band for cell in shown))
    pad = max(0.08 * (top - bottom), 0.2)
    return max(0.0, bottom - pad), top + pad


def _break_marks(upper: Axes, lower: Axes) -> None:
    """The usual diagonal strokes where a broken y-axis is cut."""
    upper.spines.bottom.set_visible(False)
    lower.spines.top.set_visible(False)
    upper.tick_params(axis="x", bottom=False, labelbottom=False)
    style = {"marker": [(-1, -0.5), (1, 0.5)], "markersize": 10, "linestyle": "none"}
    upper.plot([0, 1], [0, 0], transform=upper.transAxes, color="k", clip_on=False, **style)
    lower.plot([0, 1], [1, 1], transform=lower.transAxes, color="k", clip_on=False, **style)


def _high_range(cells: Sequence[Cell], top: float) -> tuple[float, float]:
    """The y-range of the upper panel: every mean above ``top``, at least 10 points tall."""
    high = [cell.mean for cell in cells if cell.mean > top]
    margin = max(5.0, 0.1 * (max(high) - min(high)))
    return max(top, min(high) - margin), max(high) + margin


def plot_error_vs_workers(
    group: Group, cells: dict[tuple[str, int], Cell], baseline: Cell | None, path: Path
) -> list[Path]:
    """Final test error (the group's metric) against N, mean ± std per algorithm (Figs. 2–3).

    When some means are far above the rest (see :func:`error_axis_limits`) the y-axis is
    broken: a short upper panel shows those means (typically diverged runs at the chance
    error), the main panel the range that holds the others. Bands are drawn in the main
    panel only; an × marks a mean that includes diverged runs.
    """
    everything = [*cells.values(), *([baseline] if baseline else [])]
    bottom, top = error_axis_limits(everything)
    broken = any(cell.mean > top for cell in everything)
    if broken:
        fig, axes = new_figure(
            8.5, 5.6, nrows=2, sharex=True, gridspec_kw={"height_ratios": (1, 3.5)}
        )
        panels = [axes[0, 0], axes[1, 0]]
    else:
        fig, axes = new_figure(8.5, 4.8)
        panels = [axes[0, 0]]
    ax = panels[-1]
    if baseline is not None:
        unit = "%" if group.metric == DEFAULT_METRIC else ""
        label = f"Baseline, N = 1 ({format_metric(group.metric, baseline.mean)}{unit})"
        ax.axhline(baseline.mean, color="black", linestyle="--", linewidth=1.5, label=label)
        ax.axhspan(
            baseline.mean - baseline.band, baseline.mean + baseline.band, color="black", alpha=0.1
        )
    for algorithm in sorted({a for a, _ in cells}, key=algorithm_sort_key):
        series = sorted(
            (c for c in cells.values() if c.algorithm == algorithm), key=lambda c: c.workers
        )
        xs = np.array([c.workers for c in series])
        means = np.array([c.mean for c in series])
        bands = np.array([c.band for c in series])
        diverged = np.array([c.diverged > 0 for c in series])
        colour = algorithm_colour(algorithm)
        for panel in panels:
            panel.plot(xs, means, "o-", color=colour, label=algorithm_label(algorithm))
            panel.plot(xs[diverged], means[diverged], "x", color="black", markersize=7, zorder=4)
        # A partly diverged cell's band would cover the whole panel: on-scale cells only.
        ax.fill_between(
            xs,
            means - bands,
            means + bands,
            where=means <= top,
            color=colour,
            alpha=0.18,
            linewidth=0,
        )
    handles, labels = ax.get_legend_handles_labels()
    if any(cell.diverged for cell in cells.values()):
        handles.append(Line2D([], [], marker="x", linestyle="none", color="black"))
        labels.append("includes diverged runs")
    ax.set_ylim(bottom, top)
    if broken:
        panels[0].set_ylim(*_high_range(everything, top))
        _break_marks(panels[0], ax)
    workers = sorted({cell.workers for cell in everything})
    ax.set_xticks(workers)
    ax.set_xlim(min(workers) - 0.5, max(workers) * 1.03 + 0.5)
    ax.set_xlabel("workers N")
    for panel in panels:
        panel.grid(True, alpha=0.3)
    name = metric_label(group.metric)
    if broken:
        fig.supylabel(f"final {name}", fontsize="medium")
    else:
        ax.set_ylabel(f"final {name}")
    name = name.removesuffix(metric_unit(group.metric))
    fig.suptitle(f"Final {name} (mean ± std over seeds)\n{group.title}")
    # Below the plot: a legend at the right would run into a long two-line title.
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=9)
    return save_figure(fig, path)
