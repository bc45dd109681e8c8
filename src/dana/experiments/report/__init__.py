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
- ``learning_curves_<group>``: test error and train loss per epoch, one column per N,
  mean and ±1 std band over seeds, the N = 1 baseline overlaid on the N > 1 panels;
- ``lags_<group>`` (results with a ``lag_histogram`` only): the lag distribution, one
  panel per N, one line per algorithm;
- ``speedup_<group>`` (results with a measured ``throughput`` only): speedup over one
  worker and final test error against N (paper Figure 4);
- ``tables_<group>.md``: the paper's Appendix A.2 table and a pivot table.

``report.md`` links every figure and holds every table. Figures are written as PNG and
SVG with matplotlib's object-oriented API on an explicit Agg canvas: no display, no
pyplot global state, whatever backend the caller's process has selected.

Results of a task whose primary metric is not the test error (``"metric": NAME,
``"lower_is_better": bool`` at the top level of ``result.json``, the per-epoch value under
NAME) are reported on that metric: axis labels and table headers name it, its values are
given to 4 significant digits, its final-value figure has no broken axis, and a learning
curve is logarithmic only where every value is positive.

Plot scales (also stated in ``report.md``):

- final test error: linear, because the differences that matter are fractions of a
  percent. When a mean lies far above the best one (diverged runs sit at the chance
  error, 90% for 10 classes) the y-axis is broken: the main panel stops at
  ``max(2·best, best + 10)`` percent and a short panel above it shows the high means;
  an × marks a mean that includes diverged runs; the tables give every value;
- gap: logarithmic (it spans decades and drops at each learning-rate decay); a gap of
  exactly 0 (SSGD, one worker) cannot be drawn and is marked "gap = 0" in the legend;
- learning curves: logarithmic test error and train loss, so the late epochs where the
  algorithms differ are not squashed by the first epochs' near-chance errors;
- lag distribution: logarithmic counts when they span more than two decades;
- speedup: linear, with the ideal linear speedup for reference.
"""

from dana.experiments.report.curves import learning_curves_figure, plot_learning_curves
from dana.experiments.report.error_vs_workers import error_axis_limits, plot_error_vs_workers
from dana.experiments.report.gap import plot_gap
from dana.experiments.report.groups import Group, group_runs
from dana.experiments.report.lags import lag_figure, plot_lag_distribution
from dana.experiments.report.load import EpochRecord, LoadedResults, Run, load_results
from dana.experiments.report.lr_sweep import lr_sweeps
from dana.experiments.report.measured_speedup import plot_measured_speedup
from dana.experiments.report.style import (
    ALGORITHM_COLOURS,
    ALGORITHM_LABELS,
    ALGORITHM_ORDER,
    algorithm_colour,
    algorithm_label,
    new_figure,
    save_figure,
)
from dana.experiments.report.tables import (
    Cell,
    error_table,
    measured_speedup_table,
    pivot_table,
    summarise,
)
from dana.experiments.report.write import write_report

__all__ = [
    "ALGORITHM_COLOURS",
    "ALGORITHM_LABELS",
    "ALGORITHM_ORDER",
    "Cell",
    "EpochRecord",
    "Group",
    "LoadedResults",
    "Run",
    "algorithm_colour",
    "algorithm_label",
    "error_axis_limits",
    "error_table",
    "group_runs",
    "lag_figure",
    "learning_curves_figure",
    "load_results",
    "lr_sweeps",
    "measured_speedup_table",
    "new_figure",
    "pivot_table",
    "plot_error_vs_workers",
    "plot_gap",
    "plot_lag_distribution",
    "plot_learning_curves",
    "plot_measured_speedup",
    "save_figure",
    "summarise",
    "write_report",
]
