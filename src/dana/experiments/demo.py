"""The embedded default experiment (``dana demo``): a few minutes on 2 CPU cores.

The CPU preset on a slice of the shipped Fashion-MNIST: the single-worker baseline, then
NAG-ASGD and DANA with many simulated workers and the baseline's hyperparameters
unchanged. It prints a comparison table and writes the report of :mod:`.report`
(learning curves, gap, error against N) under ``OUT/report``.
"""

from __future__ import annotations

from pathlib import Path

from dana.experiments.report import write_report
from dana.training import preset_config, run_experiment

#: (algorithm, workers) of the demo, and the slice of the data it trains on.
DEMO_RUNS = (("baseline", 1), ("nag-asgd", 16), ("dana", 16))
DEMO_OVERRIDES = {"train_samples": 15_000, "epochs": 6, "schedule": "block-random"}
DEMO_MILESTONES = (3, 5)


def run_demo(out: Path, *, data_dir: str | Path | None = None, progress: bool | None = None) -> str:
    """Run the demo into ``out``; return the comparison table (markdown)."""
    base = preset_config("cnn-fashion-mnist").replace(milestones=DEMO_MILESTONES, **DEMO_OVERRIDES)
    rows = []
    for algorithm, workers in DEMO_RUNS:
        config = base.replace(algorithm=algorithm, workers=workers)
        result = run_experiment(
            config, out / f"{algorithm}-n{workers}", data_dir=data_dir, progress=progress
        )
        rows.append((config, result))
    figures = [p for p in write_report(out, out / "report") if p.suffix in (".png", ".md")]
    baseline = rows[0][1]["final_test_error"]
    lines = [
        f"Fashion-MNIST, {base.model}, first {base.train_samples} training images, "
        f"{base.epochs} epochs, lr {base.lr} for every run ({base.schedule} scheduling)",
        "",
        "| algorithm | workers | final test error (%) | vs baseline | gap (last ep.) | time (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for config, result in rows:
        error = result["final_test_error"]
        gap = result["epochs"][-1]["gap_mean"]
        lines.append(
            f"| {config.algorithm} | {config.workers} | {error:.2f}"
            f"{' (diverged)' if result['diverged'] else ''} | {error - baseline:+.2f} | "
            f"{'-' if gap is None else f'{gap:.3g}'} | {result['wall_seconds']:.0f} |"
        )
    lines += ["", "figures and tables:", *(f"  {p}" for p in figures)]
    return "\n".join(lines)
