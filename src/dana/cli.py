"""The ``dana`` command: ``run``, ``demo`` and the experiment and runtime commands.

A :class:`DanaError` (a user mistake) is printed as one line and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from dana.data.loader import AUGMENTATIONS
from dana.errors import DanaError
from dana.options import (
    config_from_options,
    config_options,
    parse_milestones,
    ray_logs_option,
)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DanaError as err:
            click.echo(f"dana: error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("dana: interrupted: run the same command again to resume", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dana")
def main() -> None:
    """DANA: asynchronous distributed training that scales without retuning."""


def _threads(threads: int | None) -> None:
    if threads is not None:
        from dana.training.resources import check_threads

        check_threads(threads)
        import torch

        torch.set_num_threads(threads)


# ``dana run``'s options: the config's fields (dana.options), then where data and threads are.
_RUN_EXTRA_OPTIONS = [
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Dataset folder [default: $DANA_DATA, ../shared/data, ~/.cache/dana].",
    ),
    click.option("--download", is_flag=True, help="Fetch the dataset from its home page first."),
    click.option("--threads", type=int, default=None, help="CPU threads for PyTorch."),
]

_WAVES_HELP = (
    "on: compute each wave of ready gradients (N workers) in one batched call "
    "(torch.func.vmap; the same run up to float rounding); off: one gradient at a time; "
    "auto: on except on a CPU, where waves measured slower (docs/performance.md)."
)


def waves_option(func: Any) -> Any:
    return click.option(
        "--waves",
        type=click.Choice(["auto", "on", "off"]),
        default=None,
        help=_WAVES_HELP + " [default: auto]",
    )(func)


def gap_every_option(func: Any) -> Any:
    return click.option(
        "--gap-every",
        type=int,
        default=None,
        metavar="K",
        help="Measure the gap on every K-th gradient only (gap_mean: their mean); the gap "
        "is most of the simulator's cost on a cheap model [default: 1, every update].",
    )(func)


def run_options(func: Any) -> Any:
    for option in reversed(_RUN_EXTRA_OPTIONS):
        func = option(func)
    return config_options()(func)


@main.command()
@run_options
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Result folder [default: runs/PRESET/ALGORITHM-nN-SCHEDULE-sSEED].",
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar [default: on a terminal only]."
)
@click.option(
    "--tensorboard", is_flag=True, help="Also log each epoch to OUT/tensorboard (TensorBoard)."
)
@waves_option
@gap_every_option
def run(
    preset: str | None,
    task: str | None,
    out: str | None,
    data_dir: str | None,
    download: bool,
    threads: int | None,
    progress: bool | None,
    tensorboard: bool,
    waves: str | None,
    gap_every: int | None,
    **options: Any,
) -> None:
    """Train one model with N simulated workers; write OUT/result.json.

    Re-running the same command resumes from OUT/checkpoint.pt.
    """
    from dana.training import run_experiment
    from dana.training.folder import check_out

    _threads(threads)
    config, loaded = config_from_options(preset, task, data_dir, **options)
    config = config.replace(waves=waves, gap_every=gap_every)
    out_dir = check_out(out) if out is not None else Path("runs") / config.run_name
    result = run_experiment(
        config,
        out_dir,
        task=loaded,
        data_dir=data_dir,
        download_data=download,
        progress=progress,
        tensorboard=tensorboard,
    )
    click.echo(
        f"{final_line(config, result)} in {result['wall_seconds']:.0f}s "
        f"-> {out_dir / 'result.json'}"
    )


def final_line(config: Any, result: dict[str, Any]) -> str:
    """``finished: dana N=4 final test error 9.88%`` (or the task's primary metric)."""
    status = "DIVERGED" if result["diverged"] else "finished"
    metric, value = result.get("metric") or "test_error", result.get("final_metric")
    if metric == "test_error":
        value = result["final_test_error"]
        shown = f"final test error {value:.2f}%"
    else:
        shown = f"final {metric} {'-' if value is None else f'{value:.4g}'}"
    return f"{status}: {config.algorithm} N={config.workers} {shown}"


@main.command()
def presets() -> None:
    """List the presets and their hyperparameters."""
    from dana.training import PRESETS

    width = max(map(len, PRESETS))
    for name, c in PRESETS.items():
        train = "all" if c.train_samples is None else f"first {c.train_samples}"
        click.echo(
            f"{name:{width}}  {c.model} on {c.dataset} ({train} training images): "
            f"{c.epochs} epochs, lr {c.lr} "
            f"÷{c.decay:g} at {list(c.milestones)}, B={c.batch_size}, γ={c.momentum}, "
            f"λ={c.weight_decay:g}, warm-up {c.warmup_epochs:g} epochs, augment {c.augment}"
        )


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--threads", type=int, default=None)
@click.option("--progress/--no-progress", default=None)
def demo(out: str, data_dir: str | None, threads: int | None, progress: bool | None) -> None:
    """The embedded default experiment: DANA vs NAG-ASGD vs the baseline, a few minutes on CPU."""
    from dana.experiments.demo import run_demo
    from dana.training.folder import check_out

    _threads(threads)
    click.echo(run_demo(check_out(out), data_dir=data_dir, progress=progress))


@main.command()
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False))
@click.option("--preset", default=None, help="Preset of every run (or `preset` in SPEC_FILE).")
@click.option(
    "--task",
    default=None,
    metavar="MODULE:FUNCTION",
    help="Your own task instead of a preset (or `task` in SPEC_FILE).",
)
@click.option("--algorithms", default=None, help="Comma list, e.g. baseline,nag-asgd,dana.")
@click.option("--workers", default=None, help="Comma list of N, e.g. 2,4,8,16.")
@click.option("--schedules", default=None, help="Comma list [default: block-random].")
@click.option("--seeds", default=None, help="Comma list [default: 0].")
@click.option("--lrs", default=None, help="Comma list of learning rates (an lr axis).")
@click.option("--epochs", type=int, default=None)
@click.option("--train-samples", type=int, default=None)
@click.option("--test-samples", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--momentum", type=float, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option("--warmup-epochs", type=float, default=None)
@click.option(
    "--milestones",
    default=None,
    callback=lambda ctx, param, value: parse_milestones(value),
    help="e.g. 80,120 (none: no decay).",
)
@click.option("--decay", type=float, default=None)
@click.option("--augment", type=click.Choice(AUGMENTATIONS), default=None)
@click.option("--device", default=None)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="runs/sweep",
    show_default=True,
    help="Results folder (one sub-folder per run).",
)
@click.option(
    "--jobs",
    "-j",
    type=int,
    default=1,
    show_default=True,
    help="Runs in parallel, each in its own process.",
)
@click.option(
    "--threads",
    type=int,
    default=None,
    help="PyTorch threads per job [default: cores // jobs; on Ray: --cpus-per-run].",
)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option(
    "--address",
    default=None,
    help="Run on Ray, each run a Ray task with its own resources, the files shipped back to "
    "--out: auto, HOST:PORT, ray://HOST:10001, or local (a local Ray instance) "
    "[default: a local pool of --jobs processes].",
)
@click.option(
    "--cpus-per-run", type=float, default=1.0, show_default=True, help="Ray CPUs per run."
)
@click.option(
    "--gpus-per-run", type=float, default=0.0, show_default=True, help="Ray GPUs per run."
)
@click.option(
    "--max-requeues",
    type=int,
    default=3,
    show_default=True,
    help="On Ray: times a run whose task died is requeued (it resumes from its last epoch).",
)
@ray_logs_option
@click.option("--dry-run", is_flag=True, help="List the runs and exit.")
@click.option("--progress/--no-progress", default=None)
@waves_option
@gap_every_option
@click.option(
    "--batch-runs",
    type=int,
    default=None,
    metavar="K",
    help="Train compatible runs (one model, dataset, N, epochs, batch size, device) K at a "
    "time in one batched computation, each still writing its own folder as alone "
    "(or `batch_runs` in SPEC_FILE) [default: 1]. For GPUs: on a CPU it is exact but "
    "slower than running them apart.",
)
def sweep(
    spec_file: str | None,
    preset: str | None,
    task: str | None,
    algorithms: str | None,
    workers: str | None,
    schedules: str | None,
    seeds: str | None,
    lrs: str | None,
    epochs: int | None,
    train_samples: int | None,
    test_samples: int | None,
    lr: float | None,
    momentum: float | None,
    batch_size: int | None,
    weight_decay: float | None,
    warmup_epochs: float | None,
    milestones: tuple[int, ...] | None,
    decay: float | None,
    augment: str | None,
    device: str | None,
    out: str,
    jobs: int,
    threads: int | None,
    data_dir: str | None,
    address: str | None,
    cpus_per_run: float,
    gpus_per_run: float,
    max_requeues: int,
    ray_logs: bool,
    dry_run: bool,
    progress: bool | None,
    waves: str | None,
    gap_every: int | None,
    batch_runs: int | None,
) -> None:
    """Run a grid of algorithms × N × schedules × seeds (SPEC_FILE: a TOML sweep file).

    Finished runs are skipped and interrupted ones resume: run the same command again.
    """
    from dana.experiments.sweep import SweepSpec, parse_list, run_folder, run_sweep
    from dana.training.folder import check_out

    check_out(out)
    lists = {
        "preset": preset,
        "task": task,
        "algorithms": parse_list(algorithms),
        "workers": parse_list(workers, int),
        "schedules": parse_list(schedules),
        "seeds": parse_list(seeds, int),
        "lrs": parse_list(lrs, float),
        "waves": waves,
        "batch_runs": batch_runs,
    }
    overrides = {
        "epochs": epochs,
        "train_samples": train_samples,
        "test_samples": test_samples,
        "lr": lr,
        "momentum": momentum,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs,
        "milestones": milestones,
        "decay": decay,
        "augment": augment,
        "device": device,
        "gap_every": gap_every,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if spec_file is not None:
        spec = SweepSpec.from_toml(spec_file, **lists)
        spec = SweepSpec.from_values(
            **{**spec.__dict__, "overrides": {**spec.overrides, **overrides}}
        )
    else:
        spec = SweepSpec.from_values(
            **{k: v for k, v in lists.items() if v is not None}, overrides=overrides
        )
    configs = spec.configs()
    if dry_run:
        click.echo(
            "\n".join(str(run_folder(Path(out), c, with_lr=bool(spec.lrs))) for c in configs)
        )
        return
    cluster = None
    if address is not None:
        from dana.experiments.cluster import ClusterOptions

        if jobs != 1:
            raise DanaError(
                "--jobs is the local pool's: on Ray the runs share the cluster by their "
                "--cpus-per-run and --gpus-per-run"
            )

        if spec.batch_runs > 1:
            raise DanaError(
                "--batch-runs is the local pool's: on Ray every run is its own task; "
                "leave it out with --address"
            )
        cluster = ClusterOptions(address, cpus_per_run, gpus_per_run, None, max_requeues, ray_logs)
        where = f"as Ray tasks on {address}"
    else:
        together = f", {spec.batch_runs} runs at a time together" if spec.batch_runs > 1 else ""
        where = f"with {jobs} job(s){together}"
    click.echo(f"sweep: {len(configs)} runs into {out} {where}", err=True)
    summary = run_sweep(
        spec,
        out,
        jobs=jobs,
        threads_per_job=threads,
        data_dir=data_dir,
        progress=progress,
        cluster=cluster,
    )
    for line in summary.lines():
        click.echo(line)
    if summary.failed:
        path, why = next(iter(summary.failed.items()))
        raise DanaError(
            f"{len(summary.failed)} of {len(configs)} runs failed (first: {path}: {why}); "
            "fix the cause and run the same command again to finish them"
        )
    click.echo(f"next: dana report {out}")


def _register_optional_commands() -> None:
    """Commands of the experiments and runtime packages (imported lazily by click)."""
    from dana.experiments.commands import report_command, speedup_command
    from dana.runtime.commands import launch_command  # Ray itself is imported on launch

    main.add_command(report_command, "report")
    main.add_command(speedup_command, "speedup")
    main.add_command(launch_command, "launch")


_register_optional_commands()


if __name__ == "__main__":
    main()
