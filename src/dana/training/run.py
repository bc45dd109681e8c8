"""One experiment from a :class:`RunConfig` to ``OUT/result.json``, resumable.

``OUT/checkpoint.pt`` is written atomically after every epoch; running the same config
with the same ``OUT`` again resumes from it and ends with the same result as a run that
never stopped (at most the interrupted epoch is recomputed). ``OUT/result.json`` is
rewritten after every epoch (``finished: false``) and once at the end.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dana.data import resolve_data_dir
from dana.errors import DanaError
from dana.tasks import Task, load_task, preset_task
from dana.training.config import RunConfig
from dana.training.folder import (
    CHECKPOINT,
    RESULT,
    checked_state,
    claim_folder,
    read_result,
    release_folder,
    restore,
)
from dana.training.io import load_checkpoint, save_checkpoint, save_model, write_csv, write_json
from dana.training.resources import check_memory
from dana.training.trainer import Trainer

METRICS = "metrics.csv"
MODEL = "model.pt"
RUNTIME = "simulator"  # this module's kind of run folder (``dana launch``'s is "ray")


def resolve_task(
    config: RunConfig,
    data_dir: str | Path | None = None,
    *,
    task: Task | None = None,
    download_data: bool = False,
    train: bool = True,
    evaluate: bool = True,
) -> Task:
    """The task a config trains: ``task`` when given, the user's ``module:function`` of
    ``config.task``, else the preset's classification task (``train`` / ``evaluate``: load
    the training / test split of a preset's dataset)."""
    if task is not None:
        return task
    if config.task is None:
        return preset_task(
            config, data_dir, download_data=download_data, train=train, evaluate=evaluate
        )
    if config.task.startswith("python:"):
        raise DanaError(
            f"config task {config.task!r} was a Task object given in Python: pass it again "
            "(task=...), or give it as package.module:function"
        )
    return load_task(config.task, resolve_data_dir(data_dir))


def build_trainer(
    config: RunConfig,
    data_dir: str | Path | None = None,
    *,
    download_data: bool = False,
    task: Task | None = None,
) -> Trainer:
    """The task (see :func:`resolve_task`) and the trainer (model seeded) for ``config``."""
    check_device(config.device)
    task = resolve_task(config, data_dir, task=task, download_data=download_data)
    model = task.build_model(config.seed)
    check_memory(config, model)  # before N copies of it are allocated
    return Trainer(
        replace(task, model=model),
        algorithm=config.algorithm,
        workers=config.workers,
        epochs=config.epochs,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        milestones=config.milestones,
        decay=config.decay,
        warmup_epochs=config.warmup_epochs,
        schedule=config.schedule,
        seed=config.seed,
        device=config.device,
        rule_options=config.rule_options,
        waves=config.waves,
        gap_every=config.gap_every,
    )


def check_device(device: str) -> None:
    """A one-line error for a device this machine does not have."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise DanaError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise DanaError(f"device {device!r} asked for, but CUDA is not available: use --device cpu")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise DanaError(
            f"device {device!r}: only {torch.cuda.device_count()} GPU(s) here: use cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DanaError(f"device {device!r} asked for, but MPS is not available: use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise DanaError(f"device {device!r} is not supported: use cpu or cuda")


def result_record(config: RunConfig, trainer: Trainer, **extra: Any) -> dict[str, Any]:
    """The ``result.json`` document (the schema ``dana report`` reads)."""
    return {
        "config": config.to_dict(),
        "gap_every": config.gap_every,
        "epochs": trainer.history,
        "final_test_error": trainer.final_test_error if trainer.history else None,
        "diverged": trainer.diverged,
        "wall_seconds": trainer.wall_seconds,
        "finished": trainer.finished,
        "num_classes": trainer.task.num_classes,
        "runtime": RUNTIME,
        "metric": trainer.metric,
        "lower_is_better": trainer.task.lower_is_better,
        "final_metric": trainer.final_metric if trainer.history else None,
        "lag_histogram": {str(lag): trainer.lags[lag] for lag in sorted(trainer.lags)},
        **extra,
    }


def finished_result(out: Path, config: RunConfig, runtime: str = RUNTIME) -> dict[str, Any] | None:
    """The result in ``out`` if it is a finished ``runtime`` run of ``config``, else ``None``."""
    path = Path(out) / RESULT
    if not path.exists():
        return None
    result = read_result(path, runtime)
    if result.get("config") != config.to_dict():
        raise DanaError(
            f"{out} holds a run with another config: use another --out, or delete {path} "
            "to replace it"
        )
    return result if result.get("finished") else None


def run_experiment(
    config: RunConfig,
    out: str | Path,
    *,
    task: Task | None = None,
    data_dir: str | Path | None = None,
    download_data: bool = False,
    progress: bool | None = None,
    log: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Run (or resume, or skip if finished) ``config`` in folder ``out``; return the result.

    Writes ``result.json`` and ``metrics.csv`` (one row per epoch) after every epoch, the
    checkpoint after every epoch (deleted at the end), and ``model.pt`` (the master's
    ``state_dict``) at the end of a run that did not diverge.

    Args:
        task: the :class:`~dana.tasks.Task` to train (default: see :func:`resolve_task`).
        progress: a progress bar with ETA; ``None`` shows it only on a terminal.
        log: print one line per epoch (and whether the run resumed or was skipped) to stderr.
        on_epoch: called with each epoch's record, after it is saved.
        tensorboard: also log every epoch's values to ``OUT/tensorboard`` (needs the
            ``tensorboard`` package).
    """
    run = open_run(config, out, task=task, data_dir=data_dir, download_data=download_data, log=log)
    if isinstance(run, dict):
        return run
    trainer = run.trainer
    steps = trainer.loader.batches_per_epoch
    bar = tqdm(
        total=run.config.epochs * steps,
        initial=trainer.epoch * steps,
        unit="batch",
        desc=f"{config.algorithm} N={config.workers}",
        dynamic_ncols=True,
        leave=False,
        disable=(not sys.stderr.isatty()) if progress is None else not progress,
    )
    try:
        if tensorboard:
            run.writer = _tensorboard_writer(run.out)
        with bar:
            while not trainer.finished:
                record = trainer.run_epoch(on_step=bar.update)
                run.save_epoch(record, bar.write)
                if on_epoch is not None:
                    on_epoch(record)
    finally:
        if run.writer is not None:
            run.writer.close()
    return run.close()


class OpenRun:
    """A run folder claimed by this process with its trainer (resumed from the folder's
    checkpoint): :func:`run_experiment`'s steps, which :func:`run_group` shares."""

    def __init__(self, config: RunConfig, out: Path, trainer: Trainer, log: bool) -> None:
        self.config = config
        self.out = out
        self.trainer = trainer
        self.log = log
        self.writer: Any = None

    def save_epoch(self, record: dict[str, Any], write: Callable[..., None] | None = None) -> None:
        """After an epoch: the checkpoint, result.json, metrics.csv (and the epoch line)."""
        config, trainer, out = self.config, self.trainer, self.out
        save_checkpoint(
            out / CHECKPOINT,
            {"config": config.to_dict(), "runtime": RUNTIME, "trainer": trainer.state_dict()},
        )
        write_json(out / RESULT, result_record(config, trainer))
        write_csv(out / METRICS, trainer.history)
        if self.writer is not None:
            _log_scalars(self.writer, record)
        if self.log:
            (write or print)(_epoch_line(config, trainer, record), file=sys.stderr)

    def close(self) -> dict[str, Any]:
        """After the last epoch: ``model.pt``, the final result; the folder released."""
        trainer = self.trainer
        if not trainer.diverged:
            save_model(self.out / MODEL, trainer.load_master_into_model())
        result = result_record(self.config, trainer)
        write_json(self.out / RESULT, result)
        # The result is the record; N copies of a model are not.
        (self.out / CHECKPOINT).unlink(missing_ok=True)
        release_folder(self.out)
        return result


def open_run(
    config: RunConfig,
    out: str | Path,
    *,
    task: Task | None = None,
    data_dir: str | Path | None = None,
    download_data: bool = False,
    log: bool = True,
) -> OpenRun | dict[str, Any]:
    """Claim ``out`` and build (or resume) ``config``'s trainer; the finished result
    instead when ``out`` holds it (the folder then released)."""
    config = config.validated()
    out = claim_folder(out)
    try:
        done = finished_result(out, config)
        if done is not None:
            release_folder(out)
            if log:
                print(f"[{_label(config)}] skipped: {out} holds the finished run", file=sys.stderr)
            return done
        trainer = build_trainer(config, data_dir, download_data=download_data, task=task)
        checkpoint = out / CHECKPOINT
        if checkpoint.exists():
            state = load_checkpoint(checkpoint, trainer.device)
            checked_state(state, checkpoint, config.to_dict(), RUNTIME)
            restore(trainer.load_state_dict, state.get("trainer"), checkpoint, trainer.state_dict())
            if log:
                print(f"[{_label(config)}] resuming from epoch {trainer.epoch}", file=sys.stderr)
    except BaseException:
        release_folder(out)
        raise
    return OpenRun(config, out, trainer, log)


def run_group(
    configs: list[RunConfig],
    outs: list[str | Path],
    *,
    data_dir: str | Path | None = None,
    download_data: bool = False,
    log: bool = True,
) -> dict[Path, dict[str, Any] | Exception]:
    """Several runs of one model trained together (:func:`dana.training.group.train_group`:
    one batched gradient call for all their waves), each in its own folder exactly as
    :func:`run_experiment` would (result, metrics, checkpoint every epoch, model; resumed
    from its checkpoint, skipped if finished).

    The runs must be compatible (:func:`dana.experiments.sweep.group_key`): the task is
    loaded once, from the first config. Returns, per folder, the run's result, or the
    exception that kept it from running (a :class:`~dana.training.folder.FolderBusy`, a
    refused checkpoint, …): the others go on.
    """
    from dana.training.group import train_group

    outcomes: dict[Path, dict[str, Any] | Exception] = {}
    runs: list[OpenRun] = []
    # One task for all (one dataset in memory, one loss function to batch), unless it holds
    # a module rather than a factory: each run then needs its own.
    task = resolve_task(configs[0].validated(), data_dir, download_data=download_data)
    shared = None if isinstance(task.model, torch.nn.Module) else task
    try:  # each run alone is checked when opened; together they must fit as well
        with torch.random.fork_rng(devices=[]):  # building the model seeds torch
            model = task.build_model(configs[0].seed)
        check_memory([c.validated() for c in configs], model)
    except DanaError as err:
        return {Path(out): err for out in outs}
    try:
        for config, out in zip(configs, outs, strict=True):
            try:
                run = open_run(config, out, task=shared, data_dir=data_dir, log=log)
            except (DanaError, OSError) as err:
                outcomes[Path(out)] = err
                continue
            if isinstance(run, dict):
                outcomes[Path(out)] = run
            else:
                runs.append(run)
        by_trainer = {id(run.trainer): run for run in runs}
        train_group(
            [run.trainer for run in runs],
            on_epoch=lambda trainer, record: by_trainer[id(trainer)].save_epoch(record),
        )
        for run in runs:
            outcomes[Path(run.out)] = run.close()
    finally:
        for run in runs:
            release_folder(run.out)
    return outcomes


def _tensorboard_writer(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DanaError("--tensorboard needs TensorBoard: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _log_scalars(writer: Any, record: dict[str, Any]) -> None:
    for key, value in record.items():
        if key != "epoch" and isinstance(value, int | float) and math.isfinite(value):
            writer.add_scalar(key, value, record["epoch"])
    writer.flush()


def _label(config: RunConfig) -> str:
    return f"{config.algorithm} N={config.workers} seed={config.seed}"


def metric_text(metric: str | None, value: float | None) -> str:
    """How an epoch line shows the primary metric: ``test error 9.88%``, ``eval loss 0.04``."""
    if metric is None or metric == "train_loss":
        return ""
    shown = "-" if value is None else f"{value:.2f}%" if metric == "test_error" else f"{value:.4g}"
    label = {"test_error": "test error", "loss": "eval loss"}.get(metric, metric)
    return f"{label} {shown}"


def _epoch_line(config: RunConfig, trainer: Trainer, record: dict[str, Any]) -> str:
    loss, metric = record["train_loss"], trainer.metric
    text = (
        f"[{_label(config)}] epoch {record['epoch']}/{config.epochs}  "
        f"loss {'nan' if loss is None else f'{loss:.4f}'}  "
        f"{metric_text(metric, record.get(metric) if metric else None)}  "
        f"lr {record['lr']:.4g}  lag {record['lag_mean']:.1f}  {record['seconds']:.1f}s"
    )
    return text + ("  DIVERGED" if trainer.diverged else "")
