"""The embedded default experiment (``dana demo``): a few minutes on 2 CPU cores.

The CPU preset on a slice of the shipped Fashion-MNIST: the single-worker baseline, then
NAG-ASGD and DANA with many simulated workers and the baseline's hyperparameters
unchanged. It prints a comparison table and plots the learning curves.
"""

from __future__ import annotations

from pathlib import Path

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
    figure = plot_learning_curves(rows, out / "demo.png")
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
    lines += ["", f"learning curves: {figure}", f"results: {out}/*/result.json"]
    return "\n".join(lines)


def plot_learning_curves(rows: list, path: Path) -> Path:
    """Test error per epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for config, result in rows:
        epochs = [e["epoch"] for e in result["epochs"]]
        errors = [e["test_error"] for e in result["epochs"]]
        ax.plot(epochs, errors, marker="o", label=f"{config.algorithm} (N={config.workers})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_yscale("log")
    ax.set_title("dana demo: Fashion-MNIST, same hyperparameters for every N")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
