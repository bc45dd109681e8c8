"""One experiment from a :class:`RunConfig` to ``OUT/result.json``, resumable.

``OUT/checkpoint.pt`` is written atomically after every epoch; running the same config
with the same ``OUT`` again resumes from it and ends with the same result as a run that
never stopped (at most the interrupted epoch is recomputed). ``OUT/result.json`` is
rewritten after every epoch (``finished: false``) and once at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dana.data import Dataset, download, load_dataset, resolve_data_dir
from dana.errors import DanaError
from dana.models import build_model
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
from dana.training.io import load_checkpoint, save_checkpoint, write_json
from dana.training.resources import check_memory
from dana.training.trainer import Trainer

RUNTIME = "simulator"  # this module's kind of run folder (``dana launch``'s is "ray")


def load_train_set(config: RunConfig, root: str | Path) -> Dataset:
    """The training set of ``config`` (its first ``train_samples`` when set)."""
    train_set = load_dataset(config.dataset, root, train=True)
    return train_set if config.train_samples is None else train_set.subset(config.train_samples)


def load_test_set(config: RunConfig, root: str | Path) -> Dataset:
    """The test set of ``config`` (its first ``test_samples`` when set)."""
    test_set = load_dataset(config.dataset, root, train=False)
    return test_set if config.test_samples is None else test_set.subset(config.test_samples)


def seeded_model(config: RunConfig, dataset: Dataset) -> nn.Module:
    """The model of ``config``, initialised from ``config.seed`` (simulator and runtime alike)."""
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        num_classes=dataset.num_classes,
        in_channels=dataset.images.shape[1],
        image_size=dataset.images.shape[-1],
    )
    if config.batch_size < 2 and any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        # BatchNorm over a batch of one vector has no statistics: torch raises mid-step.
        raise DanaError(f"{config.model} has BatchNorm layers: use a batch size of at least 2")
    return model


def build_trainer(
    config: RunConfig, data_dir: str | Path | None = None, *, download_data: bool = False
) -> Trainer:
    """Load the data, build the model (seeded) and the trainer for ``config``."""
    check_device(config.device)
    root = resolve_data_dir(data_dir)
    if download_data:
        download(config.dataset, root)
    train_set = load_train_set(config, root)
    test_set = load_test_set(config, root)
    model = seeded_model(config, train_set)
    check_memory(config, model)
    return Trainer(
        model,
        train_set,
        test_set,
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
        augment=config.augment,
        device=config.device,
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
        "epochs": trainer.history,
        "final_test_error": trainer.final_test_error if trainer.history else None,
        "diverged": trainer.diverged,
        "wall_seconds": trainer.wall_seconds,
        "finished": trainer.finished,
        "num_classes": trainer.num_classes,
        "runtime": RUNTIME,
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
    data_dir: str | Path | None = None,
    download_data: bool = False,
    progress: bool | None = None,
    log: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume, or skip if finished) ``config`` in folder ``out``; return the result.

    Args:
        progress: a progress bar with ETA; ``None`` shows it only on a terminal.
        log: print one line per epoch to stderr.
        on_epoch: called with each epoch's record, after it is saved.
    """
    config = config.validated()
    out = claim_folder(out)
    done = finished_result(out, config)
    if done is not None:
        release_folder(out)
        return done
    trainer = build_trainer(config, data_dir, download_data=download_data)
    checkpoint = out / CHECKPOINT
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, trainer.device)
        checked_state(state, checkpoint, config.to_dict(), RUNTIME)
        restore(trainer.load_state_dict, state.get("trainer"), checkpoint, trainer.state_dict())
    steps = trainer.loader.batches_per_epoch
    bar = tqdm(
        total=config.epochs * steps,
        initial=trainer.epoch * steps,
        unit="batch",
        desc=f"{config.algorithm} N={config.workers}",
        dynamic_ncols=True,
        leave=False,
        disable=(not sys.stderr.isatty()) if progress is None else not progress,
    )
    with bar:
        while not trainer.finished:
            record = trainer.run_epoch(on_step=bar.update)
            save_checkpoint(
                checkpoint,
                {"config": config.to_dict(), "runtime": RUNTIME, "trainer": trainer.state_dict()},
            )
            write_json(out / RESULT, result_record(config, trainer))
            if log:
                bar.write(_epoch_line(config, record, trainer.diverged), file=sys.stderr)
            if on_epoch is not None:
                on_epoch(record)
    result = result_record(config, trainer)
    write_json(out / RESULT, result)
    checkpoint.unlink(missing_ok=True)  # the result is the record; N copies of a model are not
    release_folder(out)
    return result


def _epoch_line(config: RunConfig, record: dict[str, Any], diverged: bool) -> str:
    loss = record["train_loss"]
    text = (
        f"[{config.algorithm} N={config.workers} seed={config.seed}] "
        f"epoch {record['epoch']}/{config.epochs}  "
        f"loss {'nan' if loss is None else f'{loss:.4f}'}  "
        f"test error {record['test_error']:.2f}%  lr {record['lr']:.4g}  "
        f"lag {record['lag_mean']:.1f}  {record['seconds']:.1f}s"
    )
    return text + ("  DIVERGED" if diverged else "")
