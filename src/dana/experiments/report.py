"""Figures and markdown tables from a folder of ``result.json`` files (``dana report``).

Every ``result.json`` below the results folder (written by ``dana run`` or ``dana launch``)
is read; runs are grouped by (model, dataset, schedule) — plus the runtime for ``dana
launch`` results and the preset where two presets share a model and dataset — and each
group gets:

- ``error_vs_workers_<group>``: final test error against N per algorithm, mean line and
  ±1 std band over seeds, the single-worker baseline as a dashed line with its band
  (paper Figures 2–3);
- ``gap_<group>``: the per-epoch mean gap, (a) DANA for every N, (b) every algorithm at
  the N closest to 8 (paper Figure 1);
- ``learning_curves_<group>``: test error per epoch, one panel per N;
- ``speedup_<group>`` (results with a measured ``throughput`` only): speedup over one
  worker and final test error against N (paper Figure 4);
- ``tables_<group>.md``: the paper's Appendix A.2 table and a pivot table.

``report.md`` links every figure and holds every table. Figures are written as PNG and
SVG with matplotlib's object-oriented API on an explicit Agg canvas: no display, no
pyplot global state, whatever backend the caller's process has selected.

Plot scales (also stated in ``report.md``):

- final test error: linear, because the differences that matter are fractions of a
  percent. When a mean lies far above the best one (diverged runs sit at the chance
  error, 90% for 10 classes) the y-axis is broken: the main panel stops at
  ``max(2·best, best + 10)`` percent and a short panel above it shows the high means;
  an × marks a mean that includes diverged runs; the tables give every value;
- gap: logarithmic (it spans decades and drops at each learning-rate decay); a gap of
  exactly 0 (SSGD, one worker) cannot be drawn and is marked "gap = 0" in the legend;
- learning curves: logarithmic test error, so the late epochs where the algorithms
  differ are not squashed by the first epochs' near-chance errors;
- speedup: linear, with the ideal linear speedup for reference.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from dana.errors import DanaError
from dana.rules import ALGORITHMS

Warn = Callable[[str], None]

#: Order of the algorithms in legends and tables: SPEC's, as in dana.rules.ALGORITHMS.
ALGORITHM_ORDER: tuple[str, ...] = tuple(ALGORITHMS)
ALGORITHM_LABELS: dict[str, str] = {
    "baseline": "Baseline",
    "asgd": "ASGD",
    "nag-asgd": "NAG-ASGD",
    "multi-asgd": "Multi-ASGD",
    "multi-nag": "Multi-NAG",
    "dana-zero": "DANA-Zero",
    "dana": "DANA",
    "ssgd": "SSGD",
}
ALGORITHM_COLOURS: dict[str, str] = {
    "baseline": "black",
    "asgd": "tab:blue",
    "nag-asgd": "tab:orange",
    "multi-asgd": "tab:green",
    "multi-nag": "tab:olive",
    "dana-zero": "tab:purple",
    "dana": "tab:red",
    "ssgd": "tab:brown",
}
_EXTRA_COLOURS = ("tab:pink", "tab:cyan", "tab:gray")

_DPI = 150
_GAP_TARGET_WORKERS = 8


# --------------------------------------------------------------------------- figures


def new_figure(
    width: float, height: float, *, nrows: int = 1, ncols: int = 1, **subplot_kw: Any
) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure on an Agg canvas and its ``(nrows, ncols)`` axes array."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def save_figure(fig: Figure, path: Path) -> list[Path]:
    """Write ``fig`` next to ``path`` as ``.png`` and ``.svg``; return the two paths."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        written = []
        # Not with_suffix: slugs hold dots ("lr0.01"); only an image suffix is dropped.
        stem = path.name[:-4] if path.suffix in (".png", ".svg") else path.name
        for suffix in (".png", ".svg"):
            target = path.parent / (stem + suffix)
            # No date and fixed ids in the SVG: re-running a report gives identical files.
            with matplotlib.rc_context({"svg.hashsalt": "dana"}):
                fig.savefig(target, dpi=_DPI, metadata={"Date": None} if suffix == ".svg" else None)
            written.append(target)
    except OSError as exc:
        raise DanaError(
            f"cannot write figure {path}: {exc.strerror}; choose another --out"
        ) from None
    return written


def algorithm_label(algorithm: str) -> str:
    """The paper's spelling of an algorithm name (unknown names are kept)."""
    return ALGORITHM_LABELS.get(algorithm, algorithm)


def algorithm_colour(algorithm: str) -> str:
    """One colour per algorithm, the same in every figure (unknown names hash to one)."""
    if algorithm in ALGORITHM_COLOURS:
        return ALGORITHM_COLOURS[algorithm]
    return _EXTRA_COLOURS[zlib.crc32(algorithm.encode()) % len(_EXTRA_COLOURS)]


def _algorithm_sort_key(algorithm: str) -> tuple[int, str]:
    known = algorithm in ALGORITHM_ORDER
    return (ALGORITHM_ORDER.index(algorithm) if known else len(ALGORITHM_ORDER), algorithm)


def _label_log_axis(ax: Axes) -> None:
    """Plain numbers on a log y-axis: decades plus the 2× and 5× minor ticks."""

    def minor(value: float, _position: float) -> str:
        if value <= 0:
            return ""
        leading = round(value / 10 ** math.floor(math.log10(value)))
        return f"{value:g}" if leading in (2, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of a run; NaN where the result file has no (finite) value."""

    epoch: int
    test_error: float
    gap_mean: float


@dataclass(frozen=True)
class Run:
    """One finished run read from a ``result.json``."""

    path: Path
    preset: str
    model: str
    dataset: str
    schedule: str
    runtime: str
    algorithm: str
    workers: int
    seed: int
    lr: float
    final_test_error: float
    diverged: bool
    epochs: tuple[EpochRecord, ...]
    throughput: float | None
    setup: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class LoadedResults:
    """Runs that count, plus what was left out and why (for the report's summary)."""

    files: int
    runs: tuple[Run, ...]
    unfinished: tuple[Path, ...]
    skipped: tuple[tuple[Path, str], ...]


class _BadResult(Exception):
    """A ``result.json`` that parses but does not follow the schema."""


# Config keys that must agree inside a group for its runs to be comparable.
_SETUP_KEYS = ("epochs", "batch_size", "train_samples")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_or_nan(value: object) -> float:
    return float(value) if _is_number(value) and math.isfinite(float(value)) else math.nan


def _text(config: dict[str, Any], key: str, default: str | None = None) -> str:
    value = config.get(key)
    value = default if value is None else value
    if not isinstance(value, str) or not value:
        raise _BadResult(f"config.{key} must be a non-empty string")
    return value


def _integer(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    value = default if value is None else value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _BadResult(f"config.{key} must be an integer")
    return value


def _parse_epochs(records: object) -> tuple[EpochRecord, ...]:
    if records is None:
        return ()
    if not isinstance(records, list):
        raise _BadResult("epochs must be a list")
    parsed = []
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise _BadResult("every epochs entry must be an object")
        epoch = record.get("epoch", index)
        parsed.append(
            EpochRecord(
                epoch=int(epoch) if _is_number(epoch) else index,
                test_error=_finite_or_nan(record.get("test_error")),
                gap_mean=_finite_or_nan(record.get("gap_mean")),
            )
        )
    return tuple(parsed)


def _parse_run(path: Path, data: dict[str, Any]) -> Run:
    config = data.get("config")
    if not isinstance(config, dict):
        raise _BadResult("no config object")
    workers = _integer(config, "workers")
    if workers < 1:
        raise _BadResult("config.workers must be >= 1")
    diverged = bool(data.get("diverged", False))
    final = _finite_or_nan(data.get("final_test_error"))
    if math.isnan(final):
        classes = data.get("num_classes")
        if not (diverged and _is_number(classes) and classes > 0):
            raise _BadResult("final_test_error must be a finite number")
        final = 100.0 * (1.0 - 1.0 / classes)  # chance error, as the runner records it
    throughput = data.get("throughput")
    return Run(
        path=path,
        preset=str(config.get("preset") or "-"),
        model=_text(config, "model"),
        dataset=_text(config, "dataset"),
        schedule=_text(config, "schedule", "n/a"),
        runtime=str(data.get("runtime") or "simulator"),
        algorithm=_text(config, "algorithm"),
        workers=workers,
        seed=_integer(config, "seed", 0),
        lr=float(config["lr"]) if _is_number(config.get("lr")) else math.nan,
        final_test_error=final,
        diverged=diverged,
        epochs=_parse_epochs(data.get("epochs")),
        throughput=float(throughput) if _is_number(throughput) and throughput > 0 else None,
        setup=tuple((key, config.get(key)) for key in _SETUP_KEYS),
    )


def _print_warning(message: str) -> None:
    print(message, file=sys.stderr)


def load_results(
    results_dir: Path, *, warn: Warn = _print_warning, exclude: Path | None = None
) -> LoadedResults:
    """Read every ``result.json`` below ``results_dir`` (recursively, sorted by path).

    Unreadable or malformed files are skipped with a ``warning:`` line through ``warn``;
    unfinished runs (``"finished": false``) are left out; a second run with the same
    group, algorithm, N and seed is skipped with a warning (the first path wins).
    Files below ``exclude`` (the report folder) are ignored.

    Raises:
        DanaError: the folder does not exist or holds no ``result.json``.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise DanaError(f"results folder {results_dir} does not exist: give the folder of a sweep")
    paths = sorted(results_dir.rglob("result.json"))
    # A report folder inside the results is skipped; one that holds them excludes nothing.
    if exclude is not None and not results_dir.resolve().is_relative_to(exclude.resolve()):
        paths = [path for path in paths if not path.resolve().is_relative_to(exclude.resolve())]
    if not paths:
        raise DanaError(f"no result.json found under {results_dir}: run `dana sweep` first")

    runs: list[Run] = []
    unfinished: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen: dict[tuple[Any, ...], Path] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise _BadResult("not a JSON object")
            if data.get("finished") is False:
                unfinished.append(path)
                continue
            run = _parse_run(path, data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = f"not valid JSON ({exc})"
        except _BadResult as exc:
            reason = str(exc)
        else:
            identity = (*_group_identity(run), run.algorithm, run.workers, run.seed)
            if identity not in seen:
                seen[identity] = path
                runs.append(run)
                continue
            reason = f"same algorithm, N and seed as {seen[identity]}"
        warn(f"warning: skipping {path}: {reason}")
        skipped.append((path, reason))
    return LoadedResults(len(paths), tuple(runs), tuple(unfinished), tuple(skipped))


# --------------------------------------------------------------------------- grouping


@dataclass
class Group:
    """Runs of one (model, dataset, schedule[, runtime, preset]) and their baseline runs."""

    model: str
    dataset: str
    schedule: str
    runtime: str
    preset: str
    runs: list[Run]
    baseline: list[Run]
    slug: str = ""
    lr: float = math.nan

    @property
    def title(self) -> str:
        text = f"{self.model} on {self.dataset}, {self.schedule} scheduling"
        if self.runtime != "simulator":
            text += f" ({self.runtime})"
        if self.preset != "-":
            text += f" [{self.preset}]"
        if not math.isnan(self.lr):
            text += f", lr {self.lr:g}"
        return text

    def workers(self) -> list[int]:
        return sorted({run.workers for run in self.runs})

    def algorithms(self) -> list[str]:
        return sorted({run.algorithm for run in self.runs}, key=_algorithm_sort_key)


def _group_identity(run: Run) -> tuple[str, str, str, str, str, float]:
    return (run.model, run.dataset, run.schedule, run.runtime, run.preset, run.lr)


def _slugify(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", part).strip("-") or "x" for part in parts)


def group_runs(runs: Iterable[Run], *, warn: Warn = _print_warning) -> list[Group]:
    """Group runs by (model, dataset, schedule, runtime, preset) and attach baselines.

    A group's baseline runs are its own ``baseline`` runs or, when it has none, those
    of the same model, dataset, runtime and preset under any schedule (with one worker
    every schedule is the same). A group holding nothing but baseline runs is not
    reported on its own when other groups of that model, dataset, runtime and preset
    exist. File-name slugs are
    ``model_dataset_schedule``, plus the runtime when it is not the simulator and the
    preset when two presets would otherwise share a slug.
    """
    by_identity: dict[tuple[str, ...], list[Run]] = defaultdict(list)
    for run in runs:
        by_identity[_group_identity(run)].append(run)

    baselines: dict[tuple[str, ...], list[Run]] = defaultdict(list)
    for (model, dataset, _schedule, runtime, preset, lr), members in by_identity.items():
        baselines[(model, dataset, runtime, preset, lr)] += [
            run for run in members if run.algorithm == "baseline"
        ]

    groups: list[Group] = []
    for identity in sorted(by_identity):
        model, dataset, schedule, runtime, preset, lr = identity
        members = by_identity[identity]
        own = [run for run in members if run.algorithm == "baseline"]
        others = [run for run in members if run.algorithm != "baseline"]
        if not others and any(
            key[:2] == (model, dataset) and key[3:] == (runtime, preset, lr) and key != identity
            for key in by_identity
        ):
            continue
        baseline = own or baselines[(model, dataset, runtime, preset, lr)]
        groups.append(Group(model, dataset, schedule, runtime, preset, others, baseline, lr=lr))

    slugs = defaultdict(list)
    for group in groups:
        parts = [group.model, group.dataset, group.schedule]
        if group.runtime != "simulator":
            parts.append(group.runtime)
        slugs[_slugify(*parts)].append(group)
    for slug, members in slugs.items():
        presets = {group.preset for group in members}
        lrs = {group.lr for group in members}
        for group in members:
            parts = [slug]
            if len(presets) > 1:
                parts.append(_slugify(group.preset))
            if len(lrs) > 1:
                parts.append(f"lr{group.lr:g}")
            group.slug = "_".join(parts)

    for group in groups:
        setups = {run.setup for run in group.runs + group.baseline}
        if len(setups) > 1:
            described = "; ".join(
                ", ".join(f"{key}={value}" for key, value in setup)
                for setup in sorted(setups, key=str)
            )
            warn(f"warning: group {group.slug} mixes runs with different settings: {described}")
    return groups


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Cell:
    """Final test errors (percent) of every seed of one algorithm at one N."""

    algorithm: str
    workers: int
    errors: tuple[float, ...]
    diverged: int

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
    keys = sorted(collected, key=lambda key: (_algorithm_sort_key(key[0]), key[1]))
    return {
        key: Cell(
            algorithm=key[0],
            workers=key[1],
            errors=tuple(run.final_test_error for run in collected[key]),
            diverged=sum(run.diverged for run in collected[key]),
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
    return f"{cell.mean:.2f}{_divergence_mark(cell)}"


def _std_text(cell: Cell) -> str:
    return "–" if math.isnan(cell.std) else f"{cell.std:.2f}"


def _mean_std_text(cell: Cell) -> str:
    spread = "" if math.isnan(cell.std) else f" ± {cell.std:.2f}"
    return f"{cell.mean:.2f}{spread}{_divergence_mark(cell)}"


def _epoch_curve(runs: Iterable[Run], field: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch mean of ``field`` over the runs that logged a finite value that epoch."""
    values: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for record in run.epochs:
            value = getattr(record, field)
            if not math.isnan(value):
                values[record.epoch].append(value)
    epochs = sorted(values)
    return np.array(epochs, dtype=float), np.array([statistics.fmean(values[e]) for e in epochs])


# --------------------------------------------------------------------------- tables


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def error_table(cells: dict[tuple[str, int], Cell], baseline: Cell | None) -> str:
    """Appendix A.2 style: one row per (N, algorithm) with mean, std and number of runs."""
    ordered = sorted(cells.values(), key=lambda c: (c.workers, _algorithm_sort_key(c.algorithm)))
    if baseline is not None:
        ordered.insert(0, baseline)
    rows = [
        (str(c.workers), algorithm_label(c.algorithm), _mean_text(c), _std_text(c), str(c.runs))
        for c in ordered
    ]
    header = ("N", "algorithm", "mean test error (%)", "std (%)", "runs")
    return _markdown_table(header, rows, "rlrrr")


def pivot_table(cells: dict[tuple[str, int], Cell], baseline: Cell | None) -> str:
    """Rows N, columns algorithms, cells ``mean ± std`` (percent)."""
    everything = dict(cells)
    if baseline is not None:
        everything[("baseline", baseline.workers)] = baseline
    algorithms = sorted({a for a, _ in everything}, key=_algorithm_sort_key)
    workers = sorted({n for _, n in everything})
    rows = [
        [str(n)]
        + [_mean_std_text(everything[(a, n)]) if (a, n) in everything else "" for a in algorithms]
        for n in workers
    ]
    header = ["N", *(algorithm_label(a) for a in algorithms)]
    return _markdown_table(header, rows, "r" * len(header))


def _speedup_points(group: Group) -> tuple[float | None, dict[str, list[tuple[int, float, float]]]]:
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
        error = statistics.fmean(run.final_test_error for run in members)
        points[algorithm].append((n, speedup, error))
    return reference, dict(sorted(points.items(), key=lambda item: _algorithm_sort_key(item[0])))


def measured_speedup_table(
    reference: float, points: dict[str, list[tuple[int, float, float]]]
) -> str:
    """Measured speedup and final error per (N, algorithm)."""
    rows = [
        (str(n), algorithm_label(a), f"{s * reference:.1f}", f"{s:.2f}", f"{e:.2f}")
        for a, series in points.items()
        for n, s, e in series
    ]
    rows.sort(key=lambda row: int(row[0]))
    header = ("N", "algorithm", "throughput (images/s)", "speedup (×)", "final test error (%)")
    return _markdown_table(header, rows, "rlrrr")


# --------------------------------------------------------------------------- plots


def error_axis_limits(cells: Iterable[Cell]) -> tuple[float, float]:
    """The y-range of the final-error figure: ``(bottom, top)`` in percent.

    Means above ``max(2·best, best + 10)`` (``best`` the lowest mean) are off-scale
    (drawn in the upper panel of a broken axis): the range covers the other means and
    their bands, so that differences of a fraction of a percent stay visible next to a
    diverged run at the chance error.
    """
    cells = list(cells)
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
    """Final test error against N, mean ± std per algorithm and the baseline (Figures 2–3).

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
        label = f"Baseline, N = 1 ({baseline.mean:.2f}%)"
        ax.axhline(baseline.mean, color="black", linestyle="--", linewidth=1.5, label=label)
        ax.axhspan(
            baseline.mean - baseline.band, baseline.mean + baseline.band, color="black", alpha=0.1
        )
    for algorithm in sorted({a for a, _ in cells}, key=_algorithm_sort_key):
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
    if broken:
        fig.supylabel("final test error (%)", fontsize="medium")
    else:
        ax.set_ylabel("final test error (%)")
    fig.suptitle(f"Final test error (mean ± std over seeds)\n{group.title}")
    # Below the plot: a legend at the right would run into a long two-line title.
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=9)
    return save_figure(fig, path)


def _plot_gap_lines(
    ax: Axes, lines: Sequence[tuple[str, Any, Sequence[Run]]], title: str, empty: str
) -> bool:
    """One mean-gap curve per ``(label, colour, runs)``; returns whether any was drawn."""
    drawn = False
    for label, colour, runs in lines:
        epochs, gaps = _epoch_curve(runs, "gap_mean")
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


def plot_learning_curves(group: Group, path: Path) -> list[Path]:
    """Test error per epoch (mean over seeds), one panel per N, one line per algorithm."""
    workers = sorted({run.workers for run in group.runs + group.baseline})
    ncols = min(4, len(workers))
    nrows = math.ceil(len(workers) / ncols)
    fig, axes = new_figure(3.4 * ncols + 1.8, 2.9 * nrows + 0.8, nrows=nrows, ncols=ncols)
    algorithms = sorted({r.algorithm for r in group.runs + group.baseline}, key=_algorithm_sort_key)
    lowest, highest = math.inf, 0.0
    for ax, n in zip(axes.flat, workers, strict=False):
        for algorithm in algorithms:
            runs = [
                r
                for r in group.runs + group.baseline
                if r.algorithm == algorithm and r.workers == n
            ]
            epochs, errors = _epoch_curve(runs, "test_error")
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
            _label_log_axis(ax)
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


def plot_measured_speedup(
    group: Group, points: dict[str, list[tuple[int, float, float]]], path: Path
) -> list[Path]:
    """Measured speedup (solid) and final test error (dashed) against N (paper Figure 4)."""
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
        errors_ax.plot(xs, errors, "s--", color=colour, alpha=0.8, label=f"{name} test error")
    # At least 2 percentage points on the error axis, so noise does not look like a trend.
    lowest, highest = errors_ax.get_ylim()
    centre, half = (lowest + highest) / 2, max((highest - lowest) / 2, 1.0)
    errors_ax.set_ylim(max(0.0, centre - half), centre + half)
    ax.set_xticks(workers)
    ax.set_xlabel("workers N")
    ax.set_ylabel("speedup over one worker (×), solid")
    errors_ax.set_ylabel("final test error (%), dashed")
    ax.set_title(f"Measured speedup and final test error\n{group.title}")
    ax.grid(True, alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + errors_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.12, 1.0), fontsize=9)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- report


_SCALES_NOTE = """\
Plot scales: final test error is linear; when a mean is far above the best one (a
diverged run sits at the chance error) the y-axis is broken: the main panel stops at
max(2·best, best + 10) percent and a short panel above shows the high means. An ×
marks a mean that includes diverged runs.
Gaps and learning curves use a logarithmic y-axis; a gap of exactly 0 (SSGD, one worker)
cannot be drawn and is listed as "gap = 0". Bands and "std" are the sample standard
deviation over seeds (ddof = 1; "–" for a single run). "(div.)" marks a mean whose runs
all diverged, "(k/n div.)" one where k of n did; a diverged run counts with the chance
error the runner recorded.
"""


def _figure_markdown(title: str, paths: Sequence[Path]) -> str:
    png, svg = paths
    return f"![{title}]({png.name})\n\n[{png.name}]({png.name}) · [{svg.name}]({svg.name})\n"


def _write_text(path: Path, text: str) -> Path:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise DanaError(f"cannot write {path}: {exc.strerror}; choose another --out") from None
    return path


def _report_group(group: Group, out_dir: Path, warn: Warn) -> tuple[str, list[Path]]:
    """Figures and tables of one group; returns its report.md section and the paths."""
    cells = summarise(group.runs)
    baseline = summarise(group.baseline).get(("baseline", 1))
    written: list[Path] = []
    section = [f"## {group.title}\n"]

    tables = [
        f"Final test error (%), {len(group.runs) + len(group.baseline)} runs.\n",
        error_table(cells, baseline),
        "Mean ± std (%):\n",
        pivot_table(cells, baseline),
    ]
    reference, points = _speedup_points(group)
    if points:
        tables += ["Measured speedup:\n", measured_speedup_table(reference, points)]
    elif any(run.throughput is not None for run in group.runs):
        warn(f"warning: group {group.slug} has no single-worker throughput: speedup not plotted")
    table_path = _write_text(
        out_dir / f"tables_{group.slug}.md", f"# {group.title}\n\n" + "\n".join(tables)
    )
    written.append(table_path)

    paths = plot_error_vs_workers(
        group, cells, baseline, out_dir / f"error_vs_workers_{group.slug}"
    )
    written += paths
    section.append("### Final test error vs workers\n\n" + _figure_markdown("error", paths))
    section += [f"### Tables ([{table_path.name}]({table_path.name}))\n", *tables]
    paths = plot_gap(group, out_dir / f"gap_{group.slug}")
    if paths:
        written += paths
        section.append("### Gap over training\n\n" + _figure_markdown("gap", paths))
    paths = plot_learning_curves(group, out_dir / f"learning_curves_{group.slug}")
    written += paths
    section.append("### Learning curves\n\n" + _figure_markdown("learning curves", paths))
    if points:
        paths = plot_measured_speedup(group, points, out_dir / f"speedup_{group.slug}")
        written += paths
        section.append("### Measured speedup\n\n" + _figure_markdown("speedup", paths))
    return "\n".join(section), written


def _summary(loaded: LoadedResults, results_dir: Path) -> str:
    def relative(path: Path) -> str:
        return str(path.relative_to(results_dir)) if path.is_relative_to(results_dir) else str(path)

    lines = [
        f"Read {loaded.files} result.json file(s) under `{results_dir}`: "
        f"{len(loaded.runs)} run(s) used, {len(loaded.unfinished)} unfinished run(s) "
        f"excluded, {len(loaded.skipped)} file(s) skipped.",
        "",
    ]
    lines += [f"- unfinished, excluded: `{relative(path)}`" for path in loaded.unfinished]
    lines += [f"- skipped: `{relative(path)}`: {reason}" for path, reason in loaded.skipped]
    return "\n".join(lines) + "\n"


def lr_sweeps(runs: Iterable[Run]) -> dict[tuple[Any, ...], dict[float, list[Run]]]:
    """Runs that differ only in their learning rate, by (setting, algorithm, N), then lr.

    Only settings with two or more learning rates are kept: those are lr sweeps.
    """
    found: dict[tuple[Any, ...], dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        identity = _group_identity(run)[:-1]
        found[(*identity, run.algorithm, run.workers)][run.lr].append(run)
    return {key: dict(by_lr) for key, by_lr in found.items() if len(by_lr) > 1}


def _lr_sweep_section(runs: Sequence[Run], out_dir: Path) -> tuple[str, list[Path]]:
    """Markdown table and figure of final error against lr (best mean in bold)."""
    sweeps = lr_sweeps(runs)
    if not sweeps:
        return "", []
    fig, axes = new_figure(6.4, 4.2)
    ax = axes[0, 0]
    lines = ["## Learning-rate sweeps\n"]
    for (model, dataset, schedule, _runtime, preset, algorithm, workers), by_lr in sorted(
        sweeps.items(), key=str
    ):
        rows, means, stds, lrs = [], [], [], sorted(by_lr)
        for lr in lrs:
            errors = np.array([run.final_test_error for run in by_lr[lr]])
            means.append(errors.mean())
            stds.append(errors.std(ddof=1) if len(errors) > 1 else 0.0)
            diverged = sum(run.diverged for run in by_lr[lr])
            rows.append((lr, means[-1], stds[-1], len(errors), diverged))
        best = int(np.argmin(means))
        label = f"{algorithm_label(algorithm)}, N = {workers}"
        lines.append(f"{model} on {dataset}, {schedule} [{preset}], {label}:\n")
        table = []
        for k, (lr, mean, std, n, diverged) in enumerate(rows):
            text = f"{mean:.2f} ± {std:.2f}" + (f" ({diverged} div.)" if diverged else "")
            table.append((f"{lr:g}", f"**{text}**" if k == best else text, str(n)))
        lines.append(_markdown_table(("lr", "final test error (%)", "runs"), table, "rrr"))
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
    ax.set_ylabel("final test error (%)")
    ax.set_title("Learning-rate sweep (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    paths = save_figure(fig, out_dir / "lr_sweep")
    lines.append(_figure_markdown("learning-rate sweep", paths))
    return "\n".join(lines), paths


def write_report(
    results_dir: Path, out_dir: Path | None = None, *, warn: Warn = _print_warning
) -> list[Path]:
    """Write figures (PNG + SVG), markdown tables and ``report.md`` for a results folder.

    Args:
        results_dir: folder searched recursively for ``result.json`` files.
        out_dir: where to write; default ``<results_dir>/report``.
        warn: receives one ``warning: ...`` line per skipped file or suspicious group
            (default: printed to stderr).

    Returns:
        Every path written, ``report.md`` last.

    Raises:
        DanaError: no ``result.json`` below ``results_dir``, none of them a finished run,
            or the output folder cannot be written.
    """
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir / "report"
    loaded = load_results(results_dir, warn=warn, exclude=out_dir)
    if not loaded.runs:
        raise DanaError(
            f"no finished run among the {loaded.files} result.json file(s) under {results_dir}: "
            "let the runs finish or run `dana sweep` again"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DanaError(f"cannot create {out_dir}: {exc.strerror}; choose another --out") from None

    written: list[Path] = []
    lr_section, written = _lr_sweep_section(loaded.runs, out_dir)
    sections = [lr_section] if lr_section else []
    for group in group_runs(loaded.runs, warn=warn):
        if lr_section and not group.runs:
            continue  # baseline-only groups of an lr sweep: its section says it all
        section, paths = _report_group(group, out_dir, warn)
        sections.append(section)
        written += paths
    report = "\n".join(
        ["# DANA experiment report\n", _summary(loaded, results_dir), _SCALES_NOTE, *sections]
    )
    written.append(_write_text(out_dir / "report.md", report))
    return written
