"""The embedded default experiment (``dana demo``): a couple of minutes on 2 CPU cores.

The reduced protocol's preset (``lenet-fashion-mnist``: LeNet-300-100 with BatchNorm on
the shipped Fashion-MNIST, 20 epochs) three times: the single-worker baseline, then
NAG-ASGD and DANA with 16 simulated workers and the baseline's hyperparameters unchanged
(seed 0 of the reduced protocol in docs/experiments.md). It prints a comparison table and
writes the report of :mod:`.report` (learning curves, gap, error against N) under
``OUT/report``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dana.experiments.report import write_report
from dana.training import preset_config, run_experiment

#: (algorithm, workers) of the demo's runs.
DEMO_PRESET = "lenet-fashion-mnist"
DEMO_RUNS = (("baseline", 1), ("nag-asgd", 16), ("dana", 16))


def run_demo(
    out: Path,
    *,
    data_dir: str | Path | None = None,
    progress: bool | None = None,
    **overrides: Any,
) -> str:
    """Run the demo into ``out``; return the comparison table (markdown).

    ``overrides`` change the preset's config (``epochs=1``, ``train_samples=512``: a smoke run).
    """
    base = preset_config(DEMO_PRESET).replace(**overrides)
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
        f"Fashion-MNIST, {base.model}, {base.train_samples or 'all'} training images, "
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
