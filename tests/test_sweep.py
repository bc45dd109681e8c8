"""``dana sweep``: the grid, skipping finished runs, resuming after kill -9, divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dana.errors import DanaError
from dana.experiments.sweep import SweepSpec, run_sweep

TINY = {
    "train_samples": 512,
    "test_samples": 200,
    "epochs": 2,
    "batch_size": 64,
    "milestones": [1],
    "warmup_epochs": 0.5,
}


def spec(**changes) -> SweepSpec:
    values = {
        "preset": "cnn-fashion-mnist",
        "algorithms": ("baseline", "dana"),
        "workers": (2, 4),
        "seeds": (0,),
        "overrides": dict(TINY),
    } | changes
    return SweepSpec.from_values(**values)


def results_by_run(root: Path) -> dict[str, dict]:
    return {
        str(p.parent.relative_to(root)): json.loads(p.read_text())
        for p in sorted(root.rglob("result.json"))
    }


def test_grid_runs_baseline_once_at_one_worker():
    names = [c.run_name for c in spec(seeds=(0, 1)).configs()]
    assert names == [
        "cnn-fashion-mnist/baseline-n1-block-random-s0",
        "cnn-fashion-mnist/dana-n2-block-random-s0",
        "cnn-fashion-mnist/dana-n4-block-random-s0",
        "cnn-fashion-mnist/baseline-n1-block-random-s1",
        "cnn-fashion-mnist/dana-n2-block-random-s1",
        "cnn-fashion-mnist/dana-n4-block-random-s1",
    ]
    with pytest.raises(DanaError, match="unknown algorithm 'adamw'"):
        spec(algorithms=("adamw",)).configs()


def test_toml_file_and_bad_files(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(
        'preset = "cnn-fashion-mnist"\nalgorithms = ["asgd"]\nworkers = [3]\n'
        'seeds = [4]\nschedules = ["gamma"]\n[overrides]\nepochs = 2\n'
    )
    (config,) = SweepSpec.from_toml(path).configs()
    assert (config.algorithm, config.workers, config.seed, config.schedule, config.epochs) == (
        "asgd",
        3,
        4,
        "gamma",
        2,
    )
    (config,) = SweepSpec.from_toml(path, workers=(5,)).configs()
    assert config.workers == 5
    path.write_text("preset = [")
    with pytest.raises(DanaError, match="not valid TOML"):
        SweepSpec.from_toml(path)
    path.write_text('preset = "cnn-fashion-mnist"\nalgos = ["dana"]\n')
    with pytest.raises(DanaError, match="unknown keys"):
        SweepSpec.from_toml(path)


def test_finished_runs_are_skipped_and_divergence_is_recorded(tmp_path):
    first = run_sweep(spec(workers=(2,)), tmp_path, jobs=2, threads_per_job=1, progress=False)
    assert len(first.finished) == 2 and not first.failed and not first.skipped
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")}
    again = run_sweep(spec(workers=(2,)), tmp_path, progress=False)
    assert len(again.skipped) == 2 and not again.finished
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")}
    # A learning rate far too large: every run diverges, each is recorded, none fails.
    wild = spec(algorithms=("nag-asgd",), workers=(4,), overrides=TINY | {"lr": 1e12})
    summary = run_sweep(wild, tmp_path / "wild", progress=False)
    assert len(summary.diverged) == 1 and not summary.failed
    (result,) = results_by_run(tmp_path / "wild").values()
    assert result["diverged"] and result["finished"] and result["final_test_error"] == 90.0


def _sweep_command(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dana.cli",
        "sweep",
        "--preset",
        "cnn-fashion-mnist",
        "--algorithms",
        "dana,nag-asgd",
        "--workers",
        "4",
        "--seeds",
        "0",
        "--epochs",
        "3",
        "--train-samples",
        "2560",
        "--test-samples",
        "300",
        "--out",
        str(out),
        "--threads",
        "1",
        "--no-progress",
    ]


def test_kill_9_then_rerun_ends_identical_to_an_uninterrupted_sweep(tmp_path):
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    subprocess.run(
        _sweep_command(tmp_path / "whole"), check=True, env=env, capture_output=True, timeout=300
    )
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _sweep_command(killed),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    # Kill the whole process group (pool workers too) once the first epoch is on disk.
    while time.time() < deadline:
        results = results_by_run(killed) if killed.exists() else {}
        if any(len(r["epochs"]) >= 1 and not r["finished"] for r in results.values()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = results_by_run(killed)  # every result.json on disk parses: none half-written
    assert left and not all(r["finished"] for r in left.values())
    subprocess.run(_sweep_command(killed), check=True, env=env, capture_output=True, timeout=300)

    def comparable(results):
        return {
            name: [{k: v for k, v in e.items() if k != "seconds"} for e in r["epochs"]]
            for name, r in results.items()
        }

    assert comparable(results_by_run(killed)) == comparable(results_by_run(tmp_path / "whole"))


def test_bad_sweep_values_are_one_line_errors(tmp_path):
    with pytest.raises(DanaError, match="unknown config keys"):
        spec(overrides={"epoch": 3}).configs()
    with pytest.raises(DanaError, match="workers must be a list"):
        SweepSpec.from_values(preset="cnn-fashion-mnist", algorithms=["dana"], workers=4)
    with pytest.raises(DanaError, match="--threads"):
        run_sweep(spec(), tmp_path, threads_per_job=0)
    assert spec(workers=(4, 4, 8)).workers == (4, 8)


def test_the_reduced_preset_lr_is_the_best_of_its_committed_n1_sweep():
    # The reduced protocol's whole point: lr is the single-worker optimum, kept for every N.
    from dana.training import preset_config

    preset = preset_config("lenet-fashion-mnist")
    runs = Path(__file__).parent.parent / "docs/results/reduced-lr/runs/lenet-fashion-mnist"
    errors: dict[float, list[float]] = {}
    for path in runs.glob("*/result.json"):
        result = json.loads(path.read_text())
        config = result["config"]
        assert result["finished"] and config["algorithm"] == "baseline"
        # Everything but the lr is the preset's recipe.
        same = {k: v for k, v in preset.to_dict().items() if k not in ("lr", "seed", "algorithm")}
        assert {k: config[k] for k in same} == same
        errors.setdefault(config["lr"], []).append(result["final_test_error"])
    assert len(errors) >= 3 and all(len(v) == 3 for v in errors.values())
    means = {lr: sum(v) / len(v) for lr, v in errors.items()}
    assert min(means, key=means.get) == preset.lr
    assert min(means) < preset.lr < max(means)  # bracketed on both sides


# --- configuration defects of the open-API trial (issue 9), each pinned ----------------


def write_sweep(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def test_overrides_cannot_relabel_the_preset_or_the_grid(tmp_path):
    # Before: `[overrides] preset = ...` trained one preset under another's name.
    base = 'preset = "cnn-fashion-mnist"\nalgorithms = ["dana"]\nworkers = [2]\n[overrides]\n'
    for line, word in [
        ('preset = "lenet-fashion-mnist"', "cannot set preset"),
        ("workers = 8", "cannot set workers"),
        ('algorithm = "asgd"', "cannot set algorithm"),
        ("seed = 3", "cannot set seed"),
    ]:
        with pytest.raises(DanaError, match=word):
            SweepSpec.from_toml(write_sweep(tmp_path, base + line + "\n"))


def test_an_empty_list_is_an_error_not_a_silently_smaller_grid(tmp_path):
    # Before: `workers = []` dropped every N > 1 algorithm without a word.
    for key in ("workers", "algorithms", "seeds", "schedules"):
        with pytest.raises(DanaError, match=f"{key} is empty"):
            spec(**{key: ()})


def test_bad_override_values_fail_before_anything_runs():
    # Before: these passed --dry-run and failed every run later.
    for overrides, word in [
        ({"model": "nope"}, "unknown model"),
        ({"device": "gpu"}, "unknown device"),
        ({"augment": "mixup"}, "unknown augmentation"),
        ({"dataset": "imagenet"}, "unknown dataset"),
    ]:
        with pytest.raises(DanaError, match=word):
            spec(overrides={**TINY, **overrides}).configs()


def test_sweep_cli_sets_the_recipe_and_a_failed_sweep_does_not_say_next(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from dana.cli import main

    args = ["sweep", "--preset", "cnn-fashion-mnist", "--algorithms", "dana", "--workers", "2"]
    recipe = [
        "--momentum",
        "0.5",
        "--batch-size",
        "32",
        "--weight-decay",
        "0.001",
        "--warmup-epochs",
        "0.5",
        "--milestones",
        "1",
        "--decay",
        "4",
        "--epochs",
        "2",
    ]
    out = tmp_path / "runs"
    dry = CliRunner().invoke(main, [*args, *recipe, "--out", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    configs = spec(algorithms=("dana",), workers=(2,)).configs()
    assert configs  # the same grid; now its recipe comes from the command line:
    import dana.experiments.sweep as sweep_module

    seen = {}

    def fake_run_sweep(spec, results, **kwargs):
        seen["config"] = spec.configs()[0]
        return sweep_module.SweepSummary(failed={Path(results) / "x": "boom"})

    monkeypatch.setattr(sweep_module, "run_sweep", fake_run_sweep)
    result = CliRunner().invoke(main, [*args, *recipe, "--out", str(out)])
    c = seen["config"]
    assert (c.momentum, c.batch_size, c.weight_decay) == (0.5, 32, 0.001)
    assert (c.warmup_epochs, c.milestones, c.decay, c.epochs) == (0.5, (1,), 4.0, 2)
    assert result.exit_code == 2 and "next: dana report" not in result.output
    assert "1 of 1 runs failed" in result.output
