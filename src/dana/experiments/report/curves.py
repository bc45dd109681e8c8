"""Learning curves: the primary metric and the train loss per epoch, one column per N.

Each N gets two stacked panels: the group's primary metric (the test error for
classification) above, the train loss below. Lines are means over seeds, bands ±1
sample std (ddof = 1) where a cell has two or more seeds that epoch. On every N > 1
panel the single-worker baseline is overlaid (grey, dashed), so that each algorithm is
read against what one worker reaches.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from dana.experiments.report.groups import Group
from dana.experiments.report.load import DEFAULT_METRIC, Run
from dana.experiments.report.style import (
    algorithm_colour,
    algorithm_label,
    algorithm_sort_key,
    grid_columns,
    label_log_axis,
    metric_label,
    new_figure,
    save_figure,
)
from dana.experiments.report.tables import epoch_band

#: Colour and style of the baseline overlaid on the N > 1 panels.
BASELINE_OVERLAY = {"color": "0.45", "linestyle": "--", "linewidth": 1.3}
#: Label of the overlaid baseline line (tests and legends find it by this label).
BASELINE_OVERLAY_LABEL = "Baseline, N = 1"
_BAND_ALPHA = 0.15

Curve = tuple[np.ndarray, np.ndarray, np.ndarray]


def _curves(group: Group, field: str) -> tuple[dict[tuple[int, str], Curve], Curve | None]:
    """Per (N, algorithm) the epochs, mean and std of ``field``; and the baseline's."""
    everything = group.runs + group.baseline
    curves: dict[tuple[int, str], Curve] = {}
    for run_key in sorted({(r.workers, r.algorithm) for r in everything}):
        runs = [r for r in everything if (r.workers, r.algorithm) == run_key]
        curve = epoch_band(runs, field)
        if curve[0].size:
            curves[run_key] = curve
    baseline = epoch_band(group.baseline, field) if group.baseline else None
    return curves, baseline if baseline is not None and baseline[0].size else None


def _log_scale(curves: list[Curve], percent: bool) -> bool:
    """Log y when every mean is positive (the test error always: 0% points are dropped)."""
    means = np.concatenate([mean for _, mean, _ in curves]) if curves else np.array([])
    return bool(means.size) and (percent or bool((means > 0).all()))


def _draw(ax: Axes, curve: Curve, log: bool, band: bool, **style: object) -> None:
    """One mean line and, where there are two seeds or more, its ±std band."""
    epochs, mean, std = curve
    shown = mean > 0 if log else np.ones_like(mean, dtype=bool)
    ax.plot(epochs[shown], mean[shown], **style)
    spread = shown & np.isfinite(std)
    if band and spread.any():
        lower, upper = mean - std, mean + std
        if log:  # a band reaching 0 runs to the bottom of the panel
            lower = np.where(lower > 0, lower, mean * 1e-3)
        ax.fill_between(
            epochs,
            lower,
            upper,
            where=spread,
            color=style.get("color"),
            alpha=_BAND_ALPHA,
            linewidth=0,
        )


def _limits(curves: list[Curve], log: bool, percent: bool) -> tuple[float, float] | None:
    """A y-range holding every mean line of one row kind (bands may be clipped)."""
    means = np.concatenate([mean for _, mean, _ in curves]) if curves else np.array([])
    means = means[means > 0] if log else means
    if not means.size:
        return None
    low, high = float(means.min()), float(means.max())
    if log:
        top = high * 1.15
        return low / 1.15, min(100.0, top) if percent else top
    pad = 0.08 * (high - low) or 0.05 * abs(high) or 1.0
    return low - pad, high + pad


def learning_curves_figure(group: Group) -> Figure:
    """The learning-curves figure of a group (see the module docstring), not yet saved.

    Lines carry labels: ``algorithm_label(algorithm)`` for an algorithm's mean and
    :data:`BASELINE_OVERLAY_LABEL` for the overlaid baseline; metric panels are titled
    ``N = n``, train-loss panels ``N = n, train loss``.
    """
    percent = group.metric == DEFAULT_METRIC
    metric_curves, metric_baseline = _curves(group, "metric")
    loss_curves, loss_baseline = _curves(group, "train_loss")
    everything: list[Run] = group.runs + group.baseline
    workers = sorted({run.workers for run in everything})
    algorithms = sorted({run.algorithm for run in everything}, key=algorithm_sort_key)
    ncols = grid_columns(len(workers))
    blocks = math.ceil(len(workers) / ncols)
    fig, axes = new_figure(
        3.4 * ncols + 1.8,
        4.6 * blocks + 1.1,
        nrows=2 * blocks,
        ncols=ncols,
        gridspec_kw={"height_ratios": (1.15, 1.0) * blocks},
    )
    rows = (
        ("metric", metric_curves, metric_baseline, metric_label(group.metric), percent),
        ("train_loss", loss_curves, loss_baseline, "train loss", False),
    )
    scales = []
    for offset, (_field, curves, baseline, ylabel, is_percent) in enumerate(rows):
        log = _log_scale(list(curves.values()), is_percent)
        scales.append("log" if log else "linear")
        limits = _limits(list(curves.values()), log, is_percent)
        for index, n in enumerate(workers):
            ax = axes[2 * (index // ncols) + offset, index % ncols]
            if n > 1 and baseline is not None:
                _draw(ax, baseline, log, False, label=BASELINE_OVERLAY_LABEL, **BASELINE_OVERLAY)
            for algorithm in algorithms:
                if (n, algorithm) in curves:
                    colour = algorithm_colour(algorithm)
                    label = algorithm_label(algorithm)
                    _draw(ax, curves[(n, algorithm)], log, True, color=colour, label=label)
            ax.set_title(f"N = {n}" if offset == 0 else f"N = {n}, train loss", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if log:
                ax.set_yscale("log")
                label_log_axis(ax)
            if limits is not None:
                ax.set_ylim(*limits)
            if index % ncols == 0:
                ax.set_ylabel(ylabel)
            # "epoch" under the lowest train-loss panel of each column
            if offset == 1 and index + ncols >= len(workers):
                ax.set_xlabel("epoch")
            if not curves:
                ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center")
    for index in range(len(workers), blocks * ncols):
        for offset in (0, 1):
            axes[2 * (index // ncols) + offset, index % ncols].set_axis_off()

    handles: list[Line2D | Patch] = [
        Line2D([], [], color=algorithm_colour(a), label=algorithm_label(a)) for a in algorithms
    ]
    if group.baseline and any(n > 1 for n in workers):
        label = f"{BASELINE_OVERLAY_LABEL} (N > 1 panels)"
        handles.append(Line2D([], [], label=label, **BASELINE_OVERLAY))
    if any(
        np.isfinite(std).any() for _, _, std in [*metric_curves.values(), *loss_curves.values()]
    ):
        handles.append(Patch(color="0.3", alpha=_BAND_ALPHA * 2, label="±1 std over seeds"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(5, len(handles)), fontsize=9)
    name = "Test error" if percent else group.metric
    scale = f"{scales[0]} scale" if len(set(scales)) == 1 else f"{' / '.join(scales)} scales"
    fig.suptitle(
        f"{name} and train loss during training (mean ± std over seeds, {scale})\n{group.title}"
    )
    return fig


def plot_learning_curves(group: Group, path: Path) -> list[Path]:
    """Write :func:`learning_curves_figure` of ``group`` as PNG and SVG; return the paths."""
    return save_figure(learning_curves_figure(group), path)
