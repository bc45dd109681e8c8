"""Per-cell statistics over seeds and the report's markdown tables."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dana.experiments.report.groups import Group
from dana.experiments.report.load import DEFAULT_METRIC, Run
from dana.experiments.report.style import (
    algorithm_label,
    algorithm_sort_key,
    format_metric,
    metric_label,
    metric_unit,
)


@dataclass(frozen=True)
class Cell:
    """Final values of the primary metric of every seed of one algorithm at one N.

    ``errors`` are test errors in percent unless ``metric`` names another metric.
    """

    algorithm: str
    workers: int
    errors: tuple[float, ...]
    diverged: int
    metric: str = DEFAULT_METRIC

    @property
    def runs(self) -> int:
        return len(self.errors)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors)

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof = 1, like the paper's tables); NaN for one run."""
        return statistics.stdev(self.errors) if self.runs > 1 else math.nan

    @property
    def band(self) -> float:
        """Half-width of the plotted band: the std, or 0 for a single run."""
        return 0.0 if math.isnan(self.std) else self.std


def summarise(runs: Iterable[Run]) -> dict[tuple[str, int], Cell]:
    """One :class:`Cell` per (algorithm, N), in algorithm order then N."""
    collected: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in runs:
        collected[(run.algorithm, run.workers)].append(run)
    keys = sorted(collected, key=lambda key: (algorithm_sort_key(key[0]), key[1]))
    return {
        key: Cell(
            algorithm=key[0],
            workers=key[1],
            errors=tuple(run.final_metric for run in collected[key]),
            diverged=sum(run.diverged for run in collected[key]),
            metric=collected[key][0].metric,
        )
        for key in keys
    }


def _divergence_mark(cell: Cell) -> str:
    if cell.diverged == 0:
        return ""
    if cell.diverged == cell.runs:
        return " (div.)"
    return f" ({cell.diverged}/{cell.runs} div.)"


def _mean_text(cell: Cell) -> str:
    return f"{format_metric(cell.metric, cell.mean)}{_divergence_mark(cell)}"


def _std_text(cell: Cell) -> str:
    return "–" if math.isnan(cell.std) else format_metric(cell.metric, cell.std)


def _mean_std_text(cell: Cell) -> str:
    spread = "" if math.isnan(cell.std) else f" ± {format_metric(cell.metric, cell.std)}"
    return f"{format_metric(cell.metric, cell.mean)}{spread}{_divergence_mark(cell)}"


def epoch_values(runs: Iterable[Run], field: str) -> dict[int, list[float]]:
    """Per epoch, the finite values of ``field`` (an :class:`EpochRecord` field) over runs."""
    values: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for record in run.epochs:
            value = getattr(record, field)
            if not math.isnan(value):
                values[record.epoch].append(value)
    return dict(sorted(values.items()))


def epoch_curve(runs: Iterable[Run], field: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch mean of ``field`` over the runs that logged a finite value that epoch."""
    values = epoch_values(runs, field)
    return np.array(list(values), dtype=float), np.array(
        [statistics.fmean(v) for v in values.values()]
    )


def epoch_band(runs: Iterable[Run], field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, per-epoch mean and sample std (ddof = 1) of ``field`` over the runs.

    The std is NaN at an epoch where fewer than two runs logged a finite value.
    """
    values = epoch_values(runs, field)
    epochs, means = (
        np.array(list(values), dtype=float),
        np.array([statistics.fmean(v) for v in values.values()]),
    )
    stds = np.array([statistics.stdev(v) if len(v) > 1 else math.nan for v in values.values()])
    return epochs, means, stds


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def error_table(cells: dict[tuple[str, int], Cell], baseline: Cell | None) -> str:
    """Appendix A.2 style: one row per (N, algorithm) with mean, std and number of runs."""
    ordered = sorted(cells.values(), key=lambda c: (c.workers, algorithm_sort_key(c.algorithm)))
    if baseline is not None:
        ordered.insert(0, baseline)
    rows = [
        (str(c.workers), algorithm_label(c.algorithm), _mean_text(c), _std_text(c), str(c.runs))
        for c in ordered
    ]
    metric = ordered[0].metric if ordered else DEFAULT_METRIC
    header = ("N", "algorithm", f"mean {metric_label(metric)}", f"std{metric_unit(metric)}", "runs")
    return markdown_table(header, rows, "rlrrr")


def pivot_table(cells: dict[tuple[str, int], Cell], baseline: Cell | None) -> str:
    """Rows N, columns algorithms, cells ``mean ± std`` (percent for the test error)."""
    everything = dict(cells)
    if baseline is not None:
        everything[("baseline", baseline.workers)] = baseline
    algorithms = sorted({a for a, _ in everything}, key=algorithm_sort_key)
    workers = sorted({n for _, n in everything})
    rows = [
        [str(n)]
        + [_mean_std_text(everything[(a, n)]) if (a, n) in everything else "" for a in algorithms]
        for n in workers
    ]
    header = ["N", *(algorithm_label(a) for a in algorithms)]
    return markdown_table(header, rows, "r" * len(header))


def speedup_points(group: Group) -> tuple[float | None, dict[str, list[tuple[int, float, float]]]]:
    """Single-worker throughput and, per algorithm, ``(N, mean speedup, mean error)``.

    The reference is the mean throughput of every single-worker run of the group that
    measured one (the baseline or any algorithm at N = 1).
    """
    measured = [run for run in group.runs + group.baseline if run.throughput is not None]
    single = [run.throughput for run in measured if run.workers == 1]
    if not single:
        return None, {}
    reference = statistics.fmean(single)
    per_cell: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in measured:
        per_cell[(run.algorithm, run.workers)].append(run)
    points: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for (algorithm, n), members in sorted(per_cell.items(), key=lambda item: item[0][1]):
        speedup = statistics.fmean(run.throughput for run in members) / reference
        error = statistics.fmean(run.final_metric for run in members)
        points[algorithm].append((n, speedup, error))
    return reference, dict(sorted(points.items(), key=lambda item: algorithm_sort_key(item[0])))


def measured_speedup_table(
    reference: float,
    points: dict[str, list[tuple[int, float, float]]],
    metric: str = DEFAULT_METRIC,
) -> str:
    """Measured speedup and final value of the primary metric per (N, algorithm)."""
    rows = [
        (str(n), algorithm_label(a), f"{s * reference:.1f}", f"{s:.2f}", format_metric(metric, e))
        for a, series in points.items()
        for n, s, e in series
    ]
    rows.sort(key=lambda row: int(row[0]))
    final = f"final {metric_label(metric)}"
    header = ("N", "algorithm", "throughput (samples/s)", "speedup (×)", final)
    return markdown_table(header, rows, "rlrrr")


def figure_markdown(title: str, paths: Sequence[Path]) -> str:
    png, svg = paths
    return f"![{title}]({png.name})\n\n[{png.name}]({png.name}) · [{svg.name}]({svg.name})\n"
