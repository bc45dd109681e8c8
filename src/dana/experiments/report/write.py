"""``write_report``: every group's figures and tables, and ``report.md`` linking them."""

from __future__ import annotations

from pathlib import Path

from dana.errors import DanaError
from dana.experiments.report.curves import plot_learning_curves
from dana.experiments.report.error_vs_workers import plot_error_vs_workers
from dana.experiments.report.gap import plot_gap
from dana.experiments.report.groups import Group, group_runs
from dana.experiments.report.lags import plot_lag_distribution
from dana.experiments.report.load import LoadedResults, Warn, load_results, print_warning
from dana.experiments.report.lr_sweep import lr_sweep_section
from dana.experiments.report.measured_speedup import plot_measured_speedup
from dana.experiments.report.style import metric_label, metric_unit
from dana.experiments.report.tables import (
    error_table,
    figure_markdown,
    measured_speedup_table,
    pivot_table,
    speedup_points,
    summarise,
)

_SCALES_NOTE = """\
Plot scales: final test error is linear; when a mean is far above the best one (a
diverged run sits at the chance error) the y-axis is broken: the main panel stops at
max(2·best, best + 10) percent and a short panel above shows the high means. An ×
marks a mean that includes diverged runs.
Gaps and learning curves (test error above, train loss below, the N = 1 baseline dashed
grey on the N > 1 panels) use a logarithmic y-axis; a gap of exactly 0 (SSGD, one worker)
cannot be drawn and is listed as "gap = 0". Bands and "std" are the sample standard
deviation over seeds (ddof = 1; "–" for a single run). "(div.)" marks a mean whose runs
all diverged, "(k/n div.)" one where k of n did; a diverged run counts with the chance
error the runner recorded.
"""


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

    name, unit = metric_label(group.metric), metric_unit(group.metric)
    tables = [
        f"Final {name}, {len(group.runs) + len(group.baseline)} runs.\n",
        error_table(cells, baseline),
        f"Mean ± std{unit}:\n",
        pivot_table(cells, baseline),
    ]
    reference, points = speedup_points(group)
    if points:
        tables += ["Measured speedup:\n", measured_speedup_table(reference, points, group.metric)]
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
    heading = f"### Final {name.removesuffix(unit)} vs workers\n\n"
    section.append(heading + figure_markdown("error", paths))
    section += [f"### Tables ([{table_path.name}]({table_path.name}))\n", *tables]
    paths = plot_gap(group, out_dir / f"gap_{group.slug}")
    if paths:
        written += paths
        section.append("### Gap over training\n\n" + figure_markdown("gap", paths))
    paths = plot_learning_curves(group, out_dir / f"learning_curves_{group.slug}")
    written += paths
    section.append("### Learning curves\n\n" + figure_markdown("learning curves", paths))
    paths = plot_lag_distribution(group, out_dir / f"lags_{group.slug}")
    if paths:
        written += paths
        section.append("### Lag distribution\n\n" + figure_markdown("lag distribution", paths))
    if points:
        paths = plot_measured_speedup(group, points, out_dir / f"speedup_{group.slug}")
        written += paths
        section.append("### Measured speedup\n\n" + figure_markdown("speedup", paths))
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


def write_report(
    results_dir: Path, out_dir: Path | None = None, *, warn: Warn = print_warning
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
    lr_section, written = lr_sweep_section(loaded.runs, out_dir)
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
