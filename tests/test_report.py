"""`dana report` on a synthetic results folder: figures, tables, skipped and diverged runs."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import pytest
from click.testing import CliRunner

from dana.errors import DanaError
from dana.experiments import write_report
from dana.experiments.commands import report_command
from dana.experiments.report import (
    Cell,
    algorithm_colour,
    error_axis_limits,
    group_runs,
    lag_figure,
    learning_curves_figure,
    load_results,
)
from dana.experiments.report.curves import BASELINE_OVERLAY_LABEL

GROUP = "resnet20_cifar10_block-random"
LAUNCH_GROUP = "resnet20_cifar10_gamma_ray"
ALGORITHM_OFFSET = {"baseline": 0.0, "asgd": 2.5, "nag-asgd": 0.6, "dana": 0.1, "ssgd": 0.9}
EPOCHS = 6
GAP_SCALE = {"baseline": 0.0, "asgd": 0.01, "nag-asgd": 0.05, "dana": 0.012, "ssgd": 0.0}


def final_error(algorithm: str, workers: int, seed: int) -> float:
    """A deterministic, distinct final error per run (percent)."""
    return round(8.3 + ALGORITHM_OFFSET[algorithm] + 0.05 * workers + 0.13 * seed, 4)


def train_loss(workers: int, seed: int, epoch: int) -> float:
    """A distinct train loss per run and epoch, so that seeds have a spread."""
    return (2.0 + 0.3 * seed + 0.1 * workers) / epoch


def result(
    algorithm: str,
    workers: int,
    seed: int,
    *,
    schedule: str = "block-random",
    error: float | None = None,
    diverged: bool = False,
    finished: bool = True,
    throughput: float | None = None,
) -> dict:
    """A result.json document following the schema `dana run` writes."""
    final = final_error(algorithm, workers, seed) if error is None else error
    has_gap = algorithm not in ("baseline", "ssgd") and workers > 1
    epochs = [
        {
            "epoch": epoch,
            "train_loss": train_loss(workers, seed, epoch),
            "test_error": final + 60.0 / epoch**2,
            "lr": 0.1,
            "gap_mean": GAP_SCALE[algorithm] * workers * (1 + seed) / epoch if has_gap else 0.0,
            "lag_mean": workers - 1.0,
            "seconds": 1.0,
        }
        for epoch in range(1, EPOCHS + 1)
    ]
    document = {
        "config": {
            "preset": "resnet20-cifar10",
            "model": "resnet20",
            "dataset": "cifar10",
            "algorithm": algorithm,
            "workers": workers,
            "schedule": schedule,
            "epochs": EPOCHS,
            "seed": seed,
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "batch_size": 128,
            "train_samples": None,
        },
        "epochs": epochs,
        "final_test_error": final,
        "diverged": diverged,
        "wall_seconds": 6.0,
        "finished": finished,
        "num_classes": 10,
    }
    if throughput is not None:
        document.update(runtime="ray", throughput=throughput, lag_histogram={"0": 10})
    return document


def write(root: Path, name: str, document: dict | str) -> Path:
    path = root / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A sweep folder; returns it and the final errors each (algorithm, N) should count."""
    root = tmp_path_factory.mktemp("results")
    expected: dict[tuple[str, int], list[float]] = {}

    def add(algorithm: str, workers: int, seed: int, **kwargs) -> None:
        document = result(algorithm, workers, seed, **kwargs)
        write(root / "sim", f"{algorithm}-n{workers}-s{seed}", document)
        expected.setdefault((algorithm, workers), []).append(document["final_test_error"])

    for seed in range(3):
        add("baseline", 1, seed)
        add("dana", 1, seed)
        for workers in (2, 4, 8):
            for algorithm in ("asgd", "dana", "ssgd"):
                diverged = algorithm == "ssgd" and workers == 8 and seed == 1
                add(algorithm, workers, seed, diverged=diverged, error=90.0 if diverged else None)
    for seed in range(2):  # two seeds only, both diverged at N = 8
        for workers in (2, 4, 8):
            diverged = workers == 8
            add("nag-asgd", workers, seed, diverged=diverged, error=90.0 if diverged else None)

    # Excluded: an unfinished run (its error would move the DANA N = 8 mean) and bad JSON.
    write(root / "sim", "dana-n8-s3", result("dana", 8, 3, error=50.0, finished=False))
    write(root / "sim", "broken", '{"config": {"model": ')

    # A `dana launch` group with measured throughput (paper Figure 4).
    for workers, throughput in ((1, 1000.0), (2, 1900.0), (4, 3600.0)):
        for seed in range(2):
            document = result(
                "dana", workers, seed, schedule="gamma", throughput=throughput + 10 * seed
            )
            write(root / "launch", f"dana-n{workers}-s{seed}", document)
    return root, expected


@pytest.fixture(scope="module")
def report(results: tuple[Path, dict]) -> tuple[list[Path], list[str]]:
    root, _ = results
    warnings: list[str] = []
    paths = write_report(root, warn=warnings.append)
    return paths, warnings


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    """The body rows of the first markdown table whose header starts with ``header_start``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_writes_every_figure_and_table(report: tuple[list[Path], list[str]], results) -> None:
    paths, _ = report
    root, _ = results
    names = {path.name for path in paths}
    for group in (GROUP, LAUNCH_GROUP):
        for stem in ("error_vs_workers", "gap", "learning_curves"):
            assert {f"{stem}_{group}.png", f"{stem}_{group}.svg"} <= names
        assert f"tables_{group}.md" in names
    assert {f"speedup_{LAUNCH_GROUP}.png", f"speedup_{LAUNCH_GROUP}.svg"} <= names
    assert f"speedup_{GROUP}.png" not in names  # simulator results measure no throughput
    assert {f"lags_{LAUNCH_GROUP}.png", f"lags_{LAUNCH_GROUP}.svg"} <= names
    assert f"lags_{GROUP}.png" not in names  # no lag_histogram in these results
    assert paths[-1] == root / "report" / "report.md"
    assert all(path.parent == root / "report" and path.stat().st_size > 0 for path in paths)


def test_pngs_are_readable_images(report: tuple[list[Path], list[str]]) -> None:
    paths, _ = report
    pngs = [path for path in paths if path.suffix == ".png"]
    assert len(pngs) == 8
    for path in pngs:
        image = matplotlib.image.imread(path)
        height, width, channels = image.shape
        assert 500 <= width <= 3000 and 400 <= height <= 2500, (path.name, image.shape)
        assert channels in (3, 4)
        assert image[..., :3].std() > 0.05  # not a blank canvas
    for path in paths:
        if path.suffix == ".svg":
            assert path.read_text().lstrip().startswith("<?xml")


def test_appendix_table_matches_the_runs(report, results) -> None:
    paths, _ = report
    _, expected = results
    tables = next(path for path in paths if path.name == f"tables_{GROUP}.md").read_text()
    rows = table_rows(tables, "| N | algorithm |")
    labels = {
        "baseline": "Baseline",
        "asgd": "ASGD",
        "nag-asgd": "NAG-ASGD",
        "dana": "DANA",
        "ssgd": "SSGD",
    }
    assert rows[0][:2] == ["1", "Baseline"]
    assert len(rows) == len(expected)
    by_key = {(row[0], row[1]): row for row in rows}
    for (algorithm, workers), errors in expected.items():
        row = by_key[(str(workers), labels[algorithm])]
        assert float(row[2].split()[0]) == pytest.approx(statistics.fmean(errors), abs=0.005)
        assert float(row[3]) == pytest.approx(statistics.stdev(errors), abs=0.005)
        assert row[4] == str(len(errors))
    assert by_key[("8", "NAG-ASGD")][2] == "90.00 (div.)"
    assert by_key[("8", "SSGD")][2].endswith("(1/3 div.)")
    assert "div." not in by_key[("8", "ASGD")][2]
    # The unfinished run (error 50) is excluded: three DANA runs at N = 8, not four.
    assert by_key[("8", "DANA")][4] == "3"


def test_pivot_table(report, results) -> None:
    paths, _ = report
    _, expected = results
    tables = next(path for path in paths if path.name == f"tables_{GROUP}.md").read_text()
    rows = table_rows(tables, "| N | Baseline |")
    header = tables.splitlines()[
        [line.startswith("| N | Baseline") for line in tables.splitlines()].index(True)
    ]
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "N",
        "Baseline",
        "ASGD",
        "NAG-ASGD",
        "DANA",
        "SSGD",
    ]
    assert [row[0] for row in rows] == ["1", "2", "4", "8"]
    errors = expected[("dana", 4)]
    assert rows[2][4] == f"{statistics.fmean(errors):.2f} ± {statistics.stdev(errors):.2f}"
    assert rows[0][2] == ""  # no ASGD run with one worker
    assert rows[3][3] == "90.00 ± 0.00 (div.)"


def test_report_markdown_links_every_figure(report) -> None:
    paths, _ = report
    markdown = paths[-1].read_text()
    for path in paths[:-1]:
        assert f"({path.name})" in markdown
    assert "1 unfinished run(s) excluded, 1 file(s) skipped" in markdown
    assert "sim/dana-n8-s3/result.json" in markdown
    assert "sim/broken/result.json" in markdown
    assert "| 8 | DANA |" in markdown


def test_corrupt_json_warns_with_the_file_name(report) -> None:
    _, warnings = report
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: skipping ")
    assert "broken/result.json" in warnings[0]
    assert "not valid JSON" in warnings[0]


def test_launch_speedup_table(report) -> None:
    paths, _ = report
    tables = next(path for path in paths if path.name == f"tables_{LAUNCH_GROUP}.md").read_text()
    rows = table_rows(tables, "| N | algorithm | throughput")
    speedups = {row[0]: float(row[3]) for row in rows}
    assert speedups == pytest.approx({"1": 1.0, "2": 1905 / 1005, "4": 3605 / 1005}, abs=0.005)


def test_error_axis_clips_diverged_means() -> None:
    cells = [
        Cell("dana", 4, (8.4, 8.6), 0),
        Cell("asgd", 4, (11.0, 11.4), 0),
        Cell("nag-asgd", 8, (90.0, 90.0), 2),
    ]
    bottom, top = error_axis_limits(cells)
    assert 0 < bottom < 8.4 and 11.4 < top < 20  # the 90% mean is off-scale
    bottom, top = error_axis_limits(cells[:2])
    assert 11.2 + cells[1].std < top < 12  # nothing clipped: the top band fits
    assert bottom < 8.5 - cells[0].std


def test_command_prints_paths(tmp_path: Path) -> None:
    results = tmp_path / "results"
    write(results, "baseline", result("baseline", 1, 0))
    write(results, "dana", result("dana", 2, 0))
    write(results, "broken", "{")
    out = tmp_path / "out"
    outcome = CliRunner().invoke(report_command, [str(results), "--out", str(out)])
    assert outcome.exit_code == 0, outcome.output
    printed = [Path(line) for line in outcome.stdout.splitlines()]
    assert printed[-1] == out / "report.md"
    assert all(path.is_file() and path.parent == out for path in printed)
    assert len(printed) == 8  # tables, 3 figures × (PNG, SVG), report.md
    assert "broken/result.json" in outcome.stderr


def test_empty_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DanaError, match=re.escape("run `dana sweep` first")):
        write_report(tmp_path)
    with pytest.raises(DanaError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_only_unusable_results_is_a_user_error(tmp_path: Path) -> None:
    write(tmp_path, "broken", "not json")
    write(tmp_path, "running", result("dana", 4, 0, finished=False))
    warnings: list[str] = []
    with pytest.raises(DanaError, match="no finished run"):
        write_report(tmp_path, warn=warnings.append)
    assert len(warnings) == 1 and "broken" in warnings[0]


def test_groups_borrow_the_single_worker_baseline(tmp_path: Path) -> None:
    # The sweep ran the baseline once (round-robin); with one worker every schedule is
    # the same, so the block-random and gamma groups use it.
    write(tmp_path, "baseline", result("baseline", 1, 0, schedule="round-robin"))
    write(tmp_path, "dana-br", result("dana", 2, 0, schedule="block-random"))
    write(tmp_path, "dana-gamma", result("dana", 2, 0, schedule="gamma"))
    other_preset = result("dana", 2, 0, schedule="gamma")
    other_preset["config"]["preset"] = "short"
    write(tmp_path, "dana-gamma-short", other_preset)
    warnings: list[str] = []
    groups = group_runs(load_results(tmp_path).runs, warn=warnings.append)
    assert sorted(group.slug for group in groups) == [
        "resnet20_cifar10_block-random",
        "resnet20_cifar10_gamma_resnet20-cifar10",
        "resnet20_cifar10_gamma_short",
    ]
    by_slug = {group.slug: group for group in groups}
    assert [run.algorithm for run in by_slug["resnet20_cifar10_block-random"].baseline] == [
        "baseline"
    ]
    assert by_slug["resnet20_cifar10_gamma_short"].baseline == []
    assert warnings == []


def test_duplicate_seed_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, "a", result("dana", 2, 0))
    write(tmp_path, "b", result("dana", 2, 0, error=20.0))
    warnings: list[str] = []
    loaded = load_results(tmp_path, warn=warnings.append)
    assert [run.final_metric for run in loaded.runs] == [final_error("dana", 2, 0)]
    assert len(warnings) == 1 and "b/result.json" in warnings[0] and "a/result.json" in warnings[0]


def test_learning_rate_sweep_section(tmp_path: Path) -> None:
    # Baseline runs that differ only in lr: one lr table (best mean in bold) and figure,
    # and no per-lr group sections repeating it.
    errors = {0.01: (11.0, 11.4), 0.02: (10.6, 10.8), 0.05: (13.0, 90.0)}
    for lr, per_seed in errors.items():
        for seed, error in enumerate(per_seed):
            document = result("baseline", 1, seed, error=error, diverged=error == 90.0)
            document["config"]["lr"] = lr
            write(tmp_path / "runs", f"baseline-s{seed}-lr{lr:g}", document)
    written = write_report(tmp_path / "runs", tmp_path / "out", warn=lambda _: None)
    names = sorted(p.name for p in written)
    assert names == ["lr_sweep.png", "lr_sweep.svg", "report.md"]
    text = (tmp_path / "out" / "report.md").read_text()
    rows = table_rows(text, "| lr |")
    assert rows == [
        ["0.01", "11.20 ± 0.28", "2"],
        ["0.02", "**10.70 ± 0.14**", "2"],
        ["0.05", "51.50 ± 54.45 (1 div.)", "2"],
    ]
    assert "best: lr = 0.02" in text


def panel(fig, title: str):
    """The axes of ``fig`` titled ``title`` (exactly one)."""
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def line(ax, label: str):
    """The line of ``ax`` labelled ``label`` (exactly one)."""
    (found,) = [line for line in ax.get_lines() if line.get_label() == label]
    return found


def band_edges(ax, colour: str) -> dict[float, tuple[float, float]]:
    """Per epoch, the (lower, upper) edge of the fill_between band drawn in ``colour``."""
    rgb = matplotlib.colors.to_rgb(colour)
    (band,) = [c for c in ax.collections if tuple(c.get_facecolor()[0][:3]) == rgb]
    edges: dict[float, list[float]] = {}
    for x, y in band.get_paths()[0].vertices:
        edges.setdefault(round(float(x), 6), []).append(float(y))
    return {x: (min(ys), max(ys)) for x, ys in edges.items()}


@pytest.fixture(scope="module")
def block_random_group(results):
    root, _ = results
    groups = group_runs(load_results(root / "sim", warn=lambda _: None).runs)
    (group,) = [g for g in groups if g.slug == GROUP]
    return group


def test_learning_curves_plot_train_loss_mean_and_std_over_seeds(block_random_group) -> None:
    fig = learning_curves_figure(block_random_group)
    epochs = list(range(1, EPOCHS + 1))
    for workers in (2, 4, 8):
        ax = panel(fig, f"N = {workers}, train loss")
        assert ax.get_yscale() == "log"
        mean_line = line(ax, "DANA")
        assert list(mean_line.get_xdata()) == epochs
        losses = [[train_loss(workers, seed, e) for seed in range(3)] for e in epochs]
        assert mean_line.get_ydata() == pytest.approx([statistics.fmean(v) for v in losses])
        edges = band_edges(ax, algorithm_colour("dana"))
        for epoch, values in zip(epochs, losses, strict=True):
            mean, std = statistics.fmean(values), statistics.stdev(values)
            assert edges[epoch] == pytest.approx((mean - std, mean + std))
    # The test-error panels keep their curves: mean over seeds of the per-epoch error.
    errors = line(panel(fig, "N = 4"), "ASGD").get_ydata()
    expected = [
        statistics.fmean(final_error("asgd", 4, s) + 60 / e**2 for s in range(3)) for e in epochs
    ]
    assert errors == pytest.approx(expected)
    assert panel(fig, "N = 1").get_ylabel() == "test error (%)"
    assert panel(fig, "N = 1, train loss").get_ylabel() == "train loss"


def test_learning_curves_overlay_the_baseline_on_every_multi_worker_panel(
    block_random_group,
) -> None:
    fig = learning_curves_figure(block_random_group)
    baseline_loss = [statistics.fmean(train_loss(1, s, e) for s in range(3)) for e in range(1, 7)]
    baseline_error = [
        statistics.fmean(final_error("baseline", 1, s) + 60 / e**2 for s in range(3))
        for e in range(1, 7)
    ]
    for workers in (2, 4, 8):
        for title, expected in (
            (f"N = {workers}", baseline_error),
            (f"N = {workers}, train loss", baseline_loss),
        ):
            overlay = line(panel(fig, title), BASELINE_OVERLAY_LABEL)
            assert overlay.get_linestyle() == "--"
            assert matplotlib.colors.to_rgb(overlay.get_color()) == matplotlib.colors.to_rgb("0.45")
            assert overlay.get_ydata() == pytest.approx(expected)
    for title in ("N = 1", "N = 1, train loss"):  # there it is the black baseline line itself
        labels = [line.get_label() for line in panel(fig, title).get_lines()]
        assert BASELINE_OVERLAY_LABEL not in labels and "Baseline" in labels


def test_learning_curves_without_train_loss(tmp_path: Path) -> None:
    for workers in (1, 2):
        document = result("dana", workers, 0)
        for record in document["epochs"]:
            del record["train_loss"]
        write(tmp_path, f"n{workers}", document)
    (group,) = group_runs(load_results(tmp_path).runs)
    fig = learning_curves_figure(group)
    ax = panel(fig, "N = 2, train loss")
    assert ax.get_lines() == [] and [text.get_text() for text in ax.texts] == ["not recorded"]
    assert len(line(panel(fig, "N = 2"), "DANA").get_ydata()) == EPOCHS


def test_a_single_seed_has_no_band(tmp_path: Path) -> None:
    write(tmp_path, "baseline", result("baseline", 1, 0))
    write(tmp_path, "dana-s0", result("dana", 2, 0))
    write(tmp_path, "dana-s1", result("dana", 2, 1))
    write(tmp_path, "asgd-s0", result("asgd", 2, 0))
    (group,) = group_runs(load_results(tmp_path).runs)
    ax = panel(learning_curves_figure(group), "N = 2, train loss")
    colours = {tuple(c.get_facecolor()[0][:3]) for c in ax.collections}
    assert colours == {matplotlib.colors.to_rgb(algorithm_colour("dana"))}  # ASGD: one seed


def regression_result(workers: int, seed: int, *, final: float | None = None) -> dict:
    """A result.json of a task whose primary metric is the mse (no test error)."""
    document = result("dana" if workers > 1 else "baseline", workers, seed)
    for record in document["epochs"]:
        record["mse"] = 0.5 / record["epoch"] + 0.01 * seed
        del record["test_error"]
    document.update(metric="mse", lower_is_better=True, final_test_error=None)
    del document["num_classes"]
    if final is not None:
        document["final_mse"] = final
    return document


def test_a_task_metric_replaces_the_test_error(tmp_path: Path) -> None:
    write(tmp_path / "runs", "baseline", regression_result(1, 0))
    write(tmp_path / "runs", "dana-s0", regression_result(2, 0, final=0.0625))
    write(tmp_path / "runs", "dana-s1", regression_result(2, 1))
    warnings: list[str] = []
    written = write_report(tmp_path / "runs", tmp_path / "out", warn=warnings.append)
    assert warnings == []
    runs = {run.path.parent.name: run for run in load_results(tmp_path / "runs").runs}
    assert runs["dana-s0"].metric == "mse" and runs["dana-s0"].final_metric == 0.0625
    # No final_mse: the last epoch's value.
    assert runs["dana-s1"].final_metric == pytest.approx(0.5 / EPOCHS + 0.01)
    tables = next(p for p in written if p.name.startswith("tables_")).read_text()
    assert "| N | algorithm | mean mse | std | runs |" in tables
    rows = table_rows(tables, "| N | algorithm |")
    mean = statistics.fmean([0.0625, 0.5 / EPOCHS + 0.01])
    assert rows[1][:3] == ["2", "DANA", f"{mean:.4g}"]
    assert "%" not in tables
    (group,) = group_runs(load_results(tmp_path / "runs").runs)
    assert group.metric == "mse"
    fig = learning_curves_figure(group)
    assert panel(fig, "N = 1").get_ylabel() == "mse"
    mse = line(panel(fig, "N = 2"), "DANA").get_ydata()
    assert mse == pytest.approx([0.5 / e + 0.005 for e in range(1, EPOCHS + 1)])
    assert "Final mse vs workers" in (tmp_path / "out" / "report.md").read_text()


def test_a_metric_that_goes_negative_is_drawn_linear(tmp_path: Path) -> None:
    for workers in (1, 2):
        document = regression_result(workers, 0)
        for record in document["epochs"]:
            record["mse"] -= 0.2  # a log-likelihood-like metric crosses 0
        document["metric"] = "nll"
        for record in document["epochs"]:
            record["nll"] = record.pop("mse")
        write(tmp_path, f"n{workers}", document)
    (group,) = group_runs(load_results(tmp_path).runs)
    fig = learning_curves_figure(group)
    assert panel(fig, "N = 2").get_yscale() == "linear"
    assert len(line(panel(fig, "N = 2"), "DANA").get_ydata()) == EPOCHS  # negatives kept
    assert panel(fig, "N = 2, train loss").get_yscale() == "log"


def test_a_task_run_without_any_metric_value_is_skipped(tmp_path: Path) -> None:
    document = regression_result(2, 0)
    for record in document["epochs"]:
        record["mse"] = None
    write(tmp_path, "empty", document)
    write(tmp_path, "ok", regression_result(2, 1))
    warnings: list[str] = []
    loaded = load_results(tmp_path, warn=warnings.append)
    assert [run.path.parent.name for run in loaded.runs] == ["ok"]
    assert len(warnings) == 1 and "final_mse" in warnings[0] and "empty" in warnings[0]


def test_higher_is_better_picks_the_highest_mean_in_an_lr_sweep(tmp_path: Path) -> None:
    for lr, value in ((0.01, 0.7), (0.1, 0.9)):
        document = regression_result(1, 0, final=value)
        document.update(metric="mse", lower_is_better=False)
        document["config"]["lr"] = lr
        write(tmp_path / "runs", f"lr{lr}", document)
    write_report(tmp_path / "runs", tmp_path / "out", warn=lambda _: None)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "best: lr = 0.1" in text and "**0.9 ± 0**" in text


def test_results_without_a_metric_use_the_test_error(results) -> None:
    root, _ = results
    runs = load_results(root / "sim", warn=lambda _: None).runs
    assert {run.metric for run in runs} == {"test_error"}
    assert all(run.lower_is_better for run in runs)


def lag_result(algorithm: str, workers: int, seed: int, histogram: dict | None) -> dict:
    document = result(algorithm, workers, seed, schedule="gamma")
    if histogram is not None:
        document["lag_histogram"] = histogram
    return document


def test_lag_distribution_per_algorithm_and_n(tmp_path: Path) -> None:
    histograms = {
        ("dana", 4, 0): {"0": 10, "1": 200, "3": 90},
        ("dana", 4, 1): {"1": 300, "2": 100},
        ("asgd", 4, 0): {"2": 5000, "7": 1},  # a 5000:1 span: log counts
        ("dana", 2, 0): {"0": 6, "1": 294},
    }
    for (algorithm, workers, seed), histogram in histograms.items():
        write(
            tmp_path / "runs",
            f"{algorithm}-{workers}-{seed}",
            lag_result(algorithm, workers, seed, histogram),
        )
    write(tmp_path / "runs", "dana-2-1", lag_result("dana", 2, 1, None))  # no histogram: left out
    write(tmp_path / "runs", "baseline", lag_result("baseline", 1, 0, None))
    (group,) = group_runs(load_results(tmp_path / "runs").runs)
    fig = lag_figure(group)
    assert [ax.get_title() for ax in fig.axes if ax.axison] == ["N = 2", "N = 4"]
    steps = {p.get_label(): p.get_data() for p in panel(fig, "N = 4").patches}
    dana = steps["DANA (mean τ 1.39)"]
    assert list(dana.values) == [5.0, 250.0, 50.0, 45.0]  # mean over the two seeds
    assert list(dana.edges) == [-0.5, 0.5, 1.5, 2.5, 3.5]
    mean_lag = (1 * 250 + 2 * 50 + 3 * 45) / 350
    assert f"{mean_lag:.2f}" == "1.39"
    assert list(steps["ASGD (mean τ 2.00)"].values) == [0, 0, 5000, 0, 0, 0, 0, 1]
    assert panel(fig, "N = 4").get_yscale() == "log"
    assert list(panel(fig, "N = 2").patches[0].get_data().values) == [6.0, 294.0]
    # write_report writes and links it: test_writes_every_figure_and_table (the launch group)


def test_lag_counts_within_two_decades_are_linear(tmp_path: Path) -> None:
    write(tmp_path, "a", lag_result("dana", 2, 0, {"0": 10, "1": 290}))
    (group,) = group_runs(load_results(tmp_path).runs)
    assert panel(lag_figure(group), "N = 2").get_yscale() == "linear"


def test_no_lag_histogram_no_lag_figure(tmp_path: Path) -> None:
    write(tmp_path, "a", lag_result("dana", 2, 0, None))
    (group,) = group_runs(load_results(tmp_path).runs)
    assert lag_figure(group) is None  # and write_report writes none: the block-random group


def test_a_malformed_lag_histogram_skips_the_file(tmp_path: Path) -> None:
    write(tmp_path, "bad", lag_result("dana", 2, 0, {"-1": 3}))
    write(tmp_path, "good", lag_result("dana", 2, 1, {"1": 3}))
    warnings: list[str] = []
    loaded = load_results(tmp_path, warn=warnings.append)
    assert [run.path.parent.name for run in loaded.runs] == ["good"]
    assert len(warnings) == 1 and "lag_histogram" in warnings[0]


def test_demo_runs_its_three_runs_and_writes_the_report(tmp_path):
    from dana.experiments.demo import DEMO_RUNS, run_demo

    table = run_demo(
        tmp_path, progress=False, epochs=1, train_samples=256, test_samples=128, batch_size=32
    )
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1:3] for r in rows[1:]] == [
        [f" {algorithm} ", f" {workers} "] for algorithm, workers in DEMO_RUNS
    ]
    assert "| baseline | 1 |" in rows[1] and "+0.00" in rows[1]
    assert (tmp_path / "report" / "report.md").is_file()
    assert list((tmp_path / "report").glob("learning_curves_*.png"))


def test_every_algorithm_has_its_own_colour():
    from dana.rules import ALGORITHMS

    colours = [matplotlib.colors.to_rgb(algorithm_colour(name)) for name in ALGORITHMS]
    assert len(set(colours)) == len(ALGORITHMS)
