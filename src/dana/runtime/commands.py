"""The click command ``dana launch`` (wired into the ``dana`` group by cli.py).

Importing this module does not import Ray; :func:`dana.runtime.launch` does, and says how
to install it when it is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dana.errors import DanaError
from dana.options import config_from_options, config_options, ray_logs_option


@click.command("launch")
@config_options(
    workers=2,
    workers_help="Number of worker actors N.",
    schedule_help="Order of updates under --deterministic [default: block-random].",
    device_help="Workers' device: cpu, cuda [default: cpu].",
)
@click.option(
    "--servers", "-k", type=int, default=1, show_default=True, help="Parameter-server shards K."
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster to join (auto, HOST:PORT, ray://HOST:10001); unreachable: an error "
    "within 5 s [default: start a local one].",
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
    "--max-restarts",
    type=int,
    default=3,
    show_default=True,
    help="Restarts allowed per failed worker.",
)
@click.option(
    "--transport",
    type=click.Choice(["direct", "tcp", "ray"]),
    default="direct",
    show_default=True,
    help="Data plane: direct (shared memory on a node, TCP across nodes), tcp or ray.",
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
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress bar of the updates (rate, lag, ETA) [default: on a terminal].",
)
@ray_logs_option
def launch_command(
    preset: str | None,
    task: str | None,
    servers: int,
    address: str | None,
    cpus_per_worker: float,
    gpus_per_worker: float,
    threads: int | None,
    deterministic: bool,
    max_restarts: int,
    transport: str,
    data_dir: str | None,
    out: str | None,
    quiet: bool,
    progress: bool | None,
    ray_logs: bool,
    **fields: Any,
) -> None:
    """Train with a real parameter server and N workers on Ray; write OUT/result.json.

    Re-running the same command resumes from OUT/checkpoint.pt (written every epoch).
    """
    from dana.runtime.driver import launch
    from dana.training.folder import check_out

    config, _ = config_from_options(preset, task, data_dir, **fields)
    out_dir = (
        check_out(out)
        if out is not None
        else Path("runs")
        / "launch"
        / config.preset
        / (f"{config.algorithm}-n{config.workers}-k{servers}-s{config.seed}")
    )
    if fields.get("schedule") is not None and not deterministic:
        raise DanaError("--schedule only applies with --deterministic: a free run's order is real")
    if threads is not None and threads < 1:  # no upper bound: workers may be on bigger nodes
        raise DanaError(f"--threads must be >= 1, got {threads}")
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
        transport=transport,
        log=not quiet,
        progress=progress,
        ray_logs=ray_logs,
    )
    from dana.cli import final_line

    click.echo(
        f"{final_line(config, result)} (K={servers}) at {result['throughput'] or 0:.0f} "
        f"samples/s -> {out_dir / 'result.json'}"
    )
