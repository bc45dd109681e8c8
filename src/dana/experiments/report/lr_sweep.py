"""Learning-rate sweeps: runs that differ only in lr, as a table and a figure."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dana.experiments.report.load import Run, group_identity
from dana.experiments.report.style import (
    algorithm_colour,
    algorithm_label,
    format_metric,
    metric_label,
    new_figure,
    save_figure,
)
from dana.experiments.report.tables import figure_markdown, markdown_table


def lr_sweeps(runs: Iterable[Run]) -> dict[tuple[Any, ...], dict[float, list[Run]]]:
    """Runs that differ only in their learning rate, by (setting, algorithm, N), then lr.

    Only settings with two or more learning rates are kept: those are lr sweeps.
    """
    found: dict[tuple[Any, ...], dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        identity = group_identity(run)[:-1]
        found[(*identity, run.algorithm, run.workers)][run.lr].append(run)
    return {key: dict(by_lr) for key, by_lr in found.items() if len(by_lr) > 1}


def lr_sweep_section(runs: Sequence[Run], out_dir: Path) -> tuple[str, list[Path]]:
    """Markdown table and figure of the final metric against lr (best mean in bold)."""
    sweeps = lr_sweeps(runs)
    if not sweeps:
        return "", []
    fig, axes = new_figure(6.4, 4.2)
    ax = axes[0, 0]
    lines = ["## Learning-rate sweeps\n"]
    metrics = set()
    for (model, dataset, schedule, _runtime, preset, metric, algorithm, workers), by_lr in sorted(
        sweeps.items(), key=str
    ):
        rows, means, stds, lrs = [], [], [], sorted(by_lr)
        for lr in lrs:
            errors = np.array([run.final_metric for run in by_lr[lr]])
            means.append(errors.mean())
            stds.append(errors.std(ddof=1) if len(errors) > 1 else 0.0)
            diverged = sum(run.diverged for run in by_lr[lr])
            rows.append((lr, means[-1], stds[-1], len(errors), diverged))
        lower_is_better = by_lr[lrs[0]][0].lower_is_better
        best = int(np.argmin(means) if lower_is_better else np.argmax(means))
        metrics.add(metric)
        label = f"{algorithm_label(algorithm)}, N = {workers}"
        lines.append(f"{model} on {dataset}, {schedule} [{preset}], {label}:\n")
        table = []
        for k, (lr, mean, std, n, diverged) in enumerate(rows):
            text = f"{format_metric(metric, mean)} ± {format_metric(metric, std)}"
            text += f" ({diverged} div.)" if diverged else ""
            table.append((f"{lr:g}", f"**{text}**" if k == best else text, str(n)))
        header = ("lr", f"final {metric_label(metric)}", "runs")
        lines.append(markdown_table(header, table, "rrr"))
        lines.append(f"\nbest: lr = {lrs[best]:g}\n")
        ax.errorbar(
            lrs,
            means,
            yerr=stds,
            marker="o",
            capsize=3,
            label=f"{label} ({dataset})",
            color=algorithm_colour(algorithm),
        )
    ax.set_xscale("log")
    ticks = sorted({lr for by_lr in sweeps.values() for lr in by_lr})
    ax.set_xticks(ticks, [f"{lr:g}" for lr in ticks])
    ax.minorticks_off()
    ax.set_xlabel("learning rate η (log scale)")
    ax.set_ylabel("final " + " / ".join(metric_label(metric) for metric in sorted(metrics)))
    ax.set_title("Learning-rate sweep (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    paths = save_figure(fig, out_dir / "lr_sweep")
    lines.append(figure_markdown("learning-rate sweep", paths))
    return "\n".join(lines), paths
