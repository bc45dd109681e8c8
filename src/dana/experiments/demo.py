"""The embedded default experiment (``dana demo``): a few minutes on 2 CPU cores.

The CPU preset (``cnn-fashion-mnist``: a small CNN, the first 12,800 images of the shipped
Fashion-MNIST, 12 epochs) three times: the single-worker baseline, then NAG-ASGD and DANA
with 8 simulated workers and the baseline's hyperparameters unchanged (seed 0 of the
reduced protocol in docs/experiments.md). It prints a comparison table and writes the
report of :mod:`.report` (learning curves, gap, error against N) under ``OUT/report``.
"""

from __future__ import annotations

from pathlib import Path

from dana.experiments.report import write_report
from dana.training import preset_config, run_experiment

#: (algorithm, workers) of the demo's runs.
DEMO_RUNS = (("baseline", 1), ("nag-asgd", 8), ("dana", 8))


def run_demo(out: Path, *, data_dir: str | Path | None = None, progress: bool | None = None) -> str:
    """Run the demo into ``out``; return the comparison table (markdown)."""
    base = preset_config("cnn-fashion-mnist")
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
