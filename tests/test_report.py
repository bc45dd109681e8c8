"""`dana report` on a synthetic results folder: figures, tables, skipped and diverged runs."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import matplotlib.image
import pytest
from click.testing import CliRunner

from dana.errors import DanaError
from dana.experiments import write_report
from dana.experiments.commands import report_command
from dana.experiments.report import Cell, error_axis_limits, group_runs, load_results

GROUP = "resnet20_cifar10_block-random"
LAUNCH_GROUP = "resnet20_cifar10_gamma_ray"
ALGORITHM_OFFSET = {"baseline": 0.0, "asgd": 2.5, "nag-asgd": 0.6, "dana": 0.1, "ssgd": 0.9}
EPOCHS = 6
GAP_SCALE = {"baseline": 0.0, "asgd": 0.01, "nag-asgd": 0.05, "dana": 0.012, "ssgd": 0.0}


def final_error(algorithm: str, workers: int, seed: int) -> float:
    """A deterministic, distinct final error per run (percent)."""
    return round(8.3 + ALGORITHM_OFFSET[algorithm] + 0.05 * workers + 0.13 * seed, 4)


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
            "train_loss": 2.0 / epoch,
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
    assert paths[-1] == root / "report" / "report.md"
    assert all(path.parent == root / "report" and path.stat().st_size > 0 for path in paths)


def test_pngs_are_readable_images(report: tuple[list[Path], list[str]]) -> None:
    paths, _ = report
    pngs = [path for path in paths if path.suffix == ".png"]
    assert len(pngs) == 7
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
    assert [run.final_test_error for run in loaded.runs] == [final_error("dana", 2, 0)]
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
