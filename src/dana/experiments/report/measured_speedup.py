"""Measured speedup and final test error (a task's metric) against N (paper Figure 4)."""

from __future__ import annotations

from pathlib import Path

from dana.experiments.report.groups import Group
from dana.experiments.report.load import DEFAULT_METRIC
from dana.experiments.report.style import (
    algorithm_colour,
    algorithm_label,
    metric_label,
    metric_unit,
    new_figure,
    save_figure,
)


def plot_measured_speedup(
    group: Group, points: dict[str, list[tuple[int, float, float]]], path: Path
) -> list[Path]:
    """Measured speedup (solid) and final test error (dashed) against N (paper Figure 4)."""
    label = metric_label(group.metric)
    short = label.removesuffix(metric_unit(group.metric))
    fig, axes = new_figure(8.5, 4.8)
    ax = axes[0, 0]
    errors_ax = ax.twinx()
    workers = sorted({n for series in points.values() for n, _, _ in series})
    ax.plot(workers, workers, color="0.75", linewidth=4, label="ideal (linear)", zorder=1)
    for algorithm, series in points.items():
        xs, speedups, errors = zip(*series, strict=True)
        colour = algorithm_colour(algorithm)
        name = algorithm_label(algorithm)
        ax.plot(xs, speedups, "o-", color=colour, label=f"{name} speedup", zorder=3)
        errors_ax.plot(xs, errors, "s--", color=colour, alpha=0.8, label=f"{name} {short}")
    if group.metric == DEFAULT_METRIC:
        # At least 2 percentage points on the error axis, so noise does not look like a trend.
        lowest, highest = errors_ax.get_ylim()
        centre, half = (lowest + highest) / 2, max((highest - lowest) / 2, 1.0)
        errors_ax.set_ylim(max(0.0, centre - half), centre + half)
    ax.set_xticks(workers)
    ax.set_xlabel("workers N")
    ax.set_ylabel("speedup over one worker (×), solid")
    errors_ax.set_ylabel(f"final {label}, dashed")
    ax.set_title(f"Measured speedup and final {short}\n{group.title}")
    ax.grid(True, alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + errors_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.12, 1.0), fontsize=9)
    return save_figure(fig, path)
