"""Image classification as a :class:`~dana.tasks.Task`: the presets, and any labelled set.

Loss: cross-entropy of the logits. Metric: ``test_error``, the top-1 error in percent
(lower is better); a diverged run records the chance error ``100·(1 − 1/C)``, as the paper
does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from dana.data import Dataset, download, load_dataset, resolve_data_dir
from dana.errors import DanaError
from dana.tasks.task import Task


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The classification loss: ``F.cross_entropy(model(x), y)``."""
    x, y = batch[0], batch[1]
    return F.cross_entropy(model(x), y)


def top1_error(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """``{"test_error": 100 × misclassified samples}`` (a sum: dana divides by the count)."""
    x, y = batch[0], batch[1]
    return {"test_error": 100 * (model(x).argmax(1) != y).sum()}


def chance_error(num_classes: int) -> float:
    """Test error (%) of a constant guess: what a diverged run is recorded with (paper)."""
    return 100.0 * (1.0 - 1.0 / num_classes)


def classification_task(
    name: str,
    model: nn.Module | Callable[[], nn.Module],
    train_data: Any,
    eval_data: Any = None,
    *,
    num_classes: int | None = None,
    augment: str = "none",
    **options: Any,
) -> Task:
    """A classification task: cross-entropy loss, top-1 error (%) as its metric.

    ``num_classes`` (taken from a :class:`dana.data.Dataset` when omitted) sets the chance
    error a diverged run records. ``options`` are further :class:`Task` fields.
    """
    if num_classes is None and isinstance(train_data, Dataset):
        num_classes = train_data.num_classes
    diverged = {"test_error": chance_error(num_classes)} if num_classes else None
    return Task(
        name=name,
        model=model,
        train_data=train_data,
        loss=cross_entropy,
        eval_data=eval_data,
        metrics=top1_error if eval_data is not None else None,
        metric="test_error" if eval_data is not None else None,
        lower_is_better=True,
        diverged_metrics=diverged,
        augment=augment,
        num_classes=num_classes,
        **options,
    )


def preset_task(
    config: Any,
    data_dir: str | Path | None = None,
    *,
    download_data: bool = False,
    train: bool = True,
    evaluate: bool = True,
) -> Task:
    """The task of a preset's :class:`~dana.training.RunConfig`: its model (by name), its
    dataset (the first ``train_samples`` / ``test_samples`` when set) and augmentation.

    ``train`` / ``evaluate``: load the training / test split (a worker needs only the first,
    the evaluator only the second).
    """
    from dana.models import build_model

    root = resolve_data_dir(data_dir)
    if download_data:
        download(config.dataset, root)
    train_set = test_set = None
    if train:
        train_set = load_dataset(config.dataset, root, train=True)
        if config.train_samples is not None:
            train_set = train_set.subset(config.train_samples)
    if evaluate:
        test_set = load_dataset(config.dataset, root, train=False)
        if config.test_samples is not None:
            test_set = test_set.subset(config.test_samples)
    shape_of = train_set if train_set is not None else test_set
    num_classes = shape_of.num_classes
    channels, size = shape_of.images.shape[1], shape_of.images.shape[-1]

    def model() -> nn.Module:
        built = build_model(
            config.model, num_classes=num_classes, in_channels=channels, image_size=size
        )
        if config.batch_size < 2 and any(isinstance(m, nn.BatchNorm1d) for m in built.modules()):
            # BatchNorm over a batch of one vector has no statistics: torch raises mid-step.
            raise DanaError(f"{config.model} has BatchNorm layers: use a batch size of at least 2")
        return built

    return classification_task(
        config.preset,
        model,
        train_set,
        test_set,
        num_classes=num_classes,
        augment=config.augment,
    )
