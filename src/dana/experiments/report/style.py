"""Shared look of the report's figures: algorithm order, labels, colours, canvas, files."""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from dana.errors import DanaError
from dana.experiments.report.load import DEFAULT_METRIC
from dana.rules import ALGORITHMS

ALGORITHM_ORDER: tuple[str, ...] = tuple(ALGORITHMS)
ALGORITHM_LABELS: dict[str, str] = {
    "baseline": "Baseline",
    "asgd": "ASGD",
    "nag-asgd": "NAG-ASGD",
    "multi-asgd": "Multi-ASGD",
    "dana-zero": "DANA-Zero",
    "dana": "DANA",
    "ssgd": "SSGD",
    "dc-asgd": "DC-ASGD",
    "dc-asgd-a": "DC-ASGD-a",
    "sa-asgd": "SA-ASGD",
    "gap-aware": "Gap-Aware",
    "delay-adaptive": "Delay-adaptive",
    "dana-dc": "DANA-DC",
    "adam-asgd": "Adam-ASGD",
    "nadam-asgd": "NAdam-ASGD",
    "dana-nadam": "DANA-NAdam",
}
ALGORITHM_COLOURS: dict[str, str] = {
    "baseline": "black",
    "asgd": "tab:blue",
    "nag-asgd": "tab:orange",
    "multi-asgd": "tab:green",
    "dana-zero": "tab:purple",
    "dana": "tab:red",
    "ssgd": "tab:brown",
    "dc-asgd": "tab:pink",
    "dc-asgd-a": "hotpink",
    "sa-asgd": "tab:gray",
    "gap-aware": "teal",
    "delay-adaptive": "navy",
    "dana-dc": "darkred",
    "adam-asgd": "tab:olive",
    "nadam-asgd": "tab:cyan",
    "dana-nadam": "crimson",
}
_EXTRA_COLOURS = ("gold", "slateblue", "sienna")

_DPI = 150


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


def algorithm_sort_key(algorithm: str) -> tuple[int, str]:
    known = algorithm in ALGORITHM_ORDER
    return (ALGORITHM_ORDER.index(algorithm) if known else len(ALGORITHM_ORDER), algorithm)


def label_log_axis(ax: Axes) -> None:
    """Plain numbers on a log y-axis: decades plus the 2× and 5× minor ticks."""

    def minor(value: float, _position: float) -> str:
        if value <= 0:
            return ""
        leading = round(value / 10 ** math.floor(math.log10(value)))
        return f"{value:g}" if leading in (2, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def metric_label(metric: str) -> str:
    """Axis and column label of a primary metric: its name, "test error (%)" for test_error."""
    return "test error (%)" if metric == DEFAULT_METRIC else metric


def metric_unit(metric: str) -> str:
    """`` (%)`` for the test error, else nothing (a task's metric has no declared unit)."""
    return " (%)" if metric == DEFAULT_METRIC else ""


def format_metric(metric: str, value: float) -> str:
    """A metric value in a table: percent with 2 decimals, other metrics 4 significant digits."""
    return f"{value:.2f}" if metric == DEFAULT_METRIC else f"{value:.4g}"


def grid_columns(panels: int, most: int = 4) -> int:
    """Columns for ``panels`` panels, at most ``most``, rows as evenly filled as possible."""
    rows = math.ceil(panels / most)
    return math.ceil(panels / rows)
