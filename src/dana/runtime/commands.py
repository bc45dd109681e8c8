"""The click command ``dana launch`` (wired into the ``dana`` group by cli.py).

Importing this module does not import Ray; :func:`dana.runtime.launch` does, and says how
to install it when it is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dana.errors import DanaError


@click.command("launch")
@click.option(
    "--preset",
    default="cnn-fashion-mnist",
    show_default=True,
    help="Model, dataset and single-worker recipe (see `dana presets`).",
)
@click.option("--model", default=None, help="Override the preset's model (see dana.models).")
@click.option(
    "--algorithm",
    "-a",
    default="dana",
    show_default=True,
    help="baseline, asgd, nag-asgd, multi-asgd, dana-zero, dana or ssgd.",
)
@click.option(
    "--workers", "-n", type=int, default=2, show_default=True, help="Number of worker actors N."
)
@click.option("--epochs", type=int, default=None, help="Epochs (all workers together).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lr", type=float, default=None, help="Single-worker learning rate η.")
@click.option("--momentum", type=float, default=None, help="Momentum γ.")
@click.option("--weight-decay", type=float, default=None, help="Weight decay λ.")
@click.option("--batch-size", type=int, default=None, help="Batch size B per worker.")
@click.option(
    "--train-samples", type=int, default=None, help="Train on the first K training images only."
)
@click.option(
    "--test-samples", type=int, default=None, help="Evaluate on the first K test images only."
)
@click.option("--device", default=None, help="Workers' device: cpu, cuda [default: cpu].")
@click.option(
    "--servers", "-k", type=int, default=1, show_default=True, help="Parameter-server shards K."
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster to join (auto, ray://HOST:10001) [default: start a local one].",
)
@click.option(
    "--cpus-per-worker", type=float, default=1.0, show_default=True, help="Ray CPUs per worker."
)
@click.option(
    "--gpus-per-worker", type=float, default=0.0, show_default=True, help="Ray GPUs per worker."
)
@click.option(
    "--threads", type=int, default=None, help="PyTorch threads per worker [default: its CPUs]."
)
@click.option(
    "--deterministic",
    is_flag=True,
    help="Impose the simulator's order of updates (--schedule) and data: "
    "reproduces `dana run` with the same options.",
)
@click.option(
    "--schedule",
    default=None,
    help="Order of updates under --deterministic [default: block-random].",
)
@click.option(
    "--max-restarts",
    type=int,
    default=3,
    show_default=True,
    help="Restarts allowed per failed worker.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Dataset folder, on every node [default: $DANA_DATA, ../shared/data, ~/.cache/dana].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Result folder [default: runs/launch/PRESET/ALGORITHM-nN-kK-sSEED].",
)
@click.option("--quiet", is_flag=True, help="No per-epoch lines on stderr.")
def launch_command(
    preset: str,
    servers: int,
    address: str | None,
    cpus_per_worker: float,
    gpus_per_worker: float,
    threads: int | None,
    deterministic: bool,
    max_restarts: int,
    data_dir: str | None,
    out: str | None,
    quiet: bool,
    **fields: Any,
) -> None:
    """Train with a real parameter server and N workers on Ray; write OUT/result.json.

    Re-running the same command resumes from OUT/checkpoint.pt (written every epoch).
    """
    from dana.runtime.driver import launch
    from dana.training import preset_config

    config = preset_config(preset).replace(**fields)
    out_dir = (
        Path(out)
        if out is not None
        else Path("runs")
        / "launch"
        / config.preset
        / (f"{config.algorithm}-n{config.workers}-k{servers}-s{config.seed}")
    )
    if fields.get("schedule") is not None and not deterministic:
        raise DanaError("--schedule only applies with --deterministic: a free run's order is real")
    result = launch(
        config,
        out_dir,
        servers=servers,
        address=address,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        data_dir=data_dir,
        deterministic=deterministic,
        threads=threads,
        max_restarts=max_restarts,
        log=not quiet,
    )
    status = "DIVERGED" if result["diverged"] else "finished"
    click.echo(
        f"{status}: {config.algorithm} N={config.workers} K={servers} final test error "
        f"{result['final_test_error']:.2f}% at {result['throughput'] or 0:.0f} images/s "
        f"-> {out_dir / 'result.json'}"
    )
