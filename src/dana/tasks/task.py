"""What to train: a model, its data, the loss of a batch and the evaluation metrics.

A :class:`Task` is the user's code; dana supplies the loop (the simulator's N workers, or
the Ray parameter server). The built-in presets are tasks too
(:func:`dana.tasks.classification_task`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dana.data.streams import (
    Batch,
    batch_size_of,
    eval_stream,
    sample_count,
    train_stream,
    unwrap_loader,
)
from dana.errors import DanaError

#: ``loss(model, batch) -> Tensor``: the scalar to minimise (a mean over the batch).
LossFn = Callable[[nn.Module, Batch], Tensor]
#: ``metrics(model, batch) -> {name: Tensor}``: SUMS over the batch's samples.
MetricsFn = Callable[[nn.Module, Batch], Mapping[str, Tensor | float]]


def mean_loss_metric(loss: LossFn, name: str = "loss") -> MetricsFn:
    """Metrics that report the task's own loss, averaged over the evaluation samples."""

    def metrics(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return {name: loss(model, batch).detach().double() * batch_size_of(batch)}

    return metrics


@dataclass
class Task:
    """A model, its training and evaluation data, a loss and metrics.

    Args:
        name: names results and run folders.
        model: an ``nn.Module`` (trained in place by :func:`dana.train`), or a function
            returning a fresh one; dana seeds torch's generator with the run's seed before it
            calls the function, so every worker and every resume starts from the same model.
        train_data: a map-style ``torch.utils.data.Dataset``, a ``DataLoader`` (its dataset
            and collate function are used, its sampler replaced by dana's seeded one), tensors
            (a tuple or dict sharing a leading sample dimension, or a ``TensorDataset``), or a
            :class:`dana.data.Dataset` of uint8 images. In-memory tensors are gathered by
            index on the device; other datasets are collated per batch.
        loss: ``loss(model, batch) -> Tensor``, the scalar to minimise. ``batch`` is what the
            data yields (a tuple ``(x, y)`` for tensor pairs, a dict for dict data, the
            collated samples otherwise), already on the run's device.
        eval_data: evaluated after every epoch (any kind ``train_data`` takes); ``None``:
            no evaluation, the metric is the epoch's mean training loss.
        metrics: ``metrics(model, batch) -> {name: value}`` with each value a SUM over the
            batch's samples; dana adds them up over ``eval_data`` and divides by its number
            of samples (so a per-sample mean comes out). Evaluated in ``model.eval()`` mode
            under ``torch.no_grad()``. Default: the mean loss, as ``"loss"``.
        metric: the primary metric (a key of ``metrics``): what ``final_metric`` reports
            and sweeps compare. Default: the first key ``metrics`` returns.
        lower_is_better: whether a lower ``metric`` is better (error, loss) or not (accuracy).
        diverged_metrics: what a diverged run records for its metrics (the paper records
            the chance error for classification); ``None``: null values.
        collate: how samples become a batch, for map-style data [default: torch's
            ``default_collate``].
        augment: ``"none"`` or ``"crop-flip"``, for :class:`dana.data.Dataset` images only.
        num_workers: DataLoader processes that collate batches ahead (map-style data only).
        eval_batch_size: batch size of the evaluation.
        defaults: hyperparameters of the task's own single-worker recipe (``epochs``, ``lr``,
            ``batch_size``, ``milestones``, ``decay``, ``weight_decay``, ``momentum``,
            ``warmup_epochs``), used by ``dana run --task`` where the command line is silent.
        num_classes: for classification, the number of classes (results record it).
    """

    name: str
    model: nn.Module | Callable[[], nn.Module]
    train_data: Any
    loss: LossFn
    eval_data: Any = None
    metrics: MetricsFn | None = None
    metric: str | None = None
    lower_is_better: bool = True
    diverged_metrics: Mapping[str, float] | None = None
    collate: Callable[[list[Any]], Batch] | None = None
    augment: str = "none"
    num_workers: int = 0
    eval_batch_size: int = 1000
    defaults: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DanaError("a task needs a non-empty name")
        if "/" in self.name or self.name.startswith("."):
            raise DanaError(f"task name {self.name!r} names a folder: no '/' or leading '.'")
        if not (isinstance(self.model, nn.Module) or callable(self.model)):
            raise DanaError("task.model must be an nn.Module or a function returning one")
        if not callable(self.loss):
            raise DanaError("task.loss must be a function loss(model, batch) -> Tensor")
        if self.metrics is not None and not callable(self.metrics):
            raise DanaError("task.metrics must be a function metrics(model, batch) -> dict")
        # A DataLoader brings its dataset and collate function; dana samples it itself.
        self.train_data, self.collate = unwrap_loader(self.train_data, self.collate)
        if self.eval_data is not None:
            self.eval_data, _ = unwrap_loader(self.eval_data, None)
        if self.eval_data is not None and self.metrics is None:
            self.metrics = mean_loss_metric(self.loss)
            self.metric = self.metric or "loss"
        from dana.training.config import RECIPE_KEYS

        unknown = sorted(set(self.defaults) - set(RECIPE_KEYS))
        if unknown:
            raise DanaError(
                f"task {self.name!r}: unknown defaults {unknown}: "
                f"valid keys are {list(RECIPE_KEYS)}"
            )

    # -- the pieces a trainer or a worker builds ------------------------------------------
    def build_model(self, seed: int) -> nn.Module:
        """The model to train: the given module, or the factory's, built after
        ``torch.manual_seed(seed)``."""
        if isinstance(self.model, nn.Module):
            return self.model
        torch.manual_seed(seed)
        model = self.model()
        if not isinstance(model, nn.Module):
            raise DanaError(
                f"task {self.name!r}: model() returned a {type(model).__name__}, not an nn.Module"
            )
        return model

    def fresh_model(self, seed: int) -> nn.Module:
        """Like :meth:`build_model`, but a copy when the task holds a module (for replicas)."""
        model = self.build_model(seed)
        return copy.deepcopy(model) if model is self.model else model

    def train_stream(
        self, batch_size: int, *, seed: int, device: torch.device | str, data: Any = None
    ) -> Any:
        """The seeded stream of training batches (of ``data``, default the training data)."""
        return train_stream(
            self.train_data if data is None else data,
            batch_size,
            seed=seed,
            device=device,
            augment=self.augment,
            collate=self.collate,
            num_workers=self.num_workers,
        )

    @property
    def train_samples(self) -> int:
        return sample_count(self.train_data)

    @property
    def primary_metric(self) -> str | None:
        """The name of the primary metric: ``metric``, else the first key ``metrics``
        returned (``None`` before the first evaluation), ``"train_loss"`` without eval data."""
        if self.eval_data is None:
            return "train_loss"
        if self.metric is not None:
            return self.metric
        names = getattr(self, "_metric_names", None)
        return names[0] if names else None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        """The metrics of ``model`` on the evaluation data: totals over the samples, divided
        by their number. The model is put in eval mode and back in train mode."""
        if self.eval_data is None:
            return {}
        was_training = model.training
        model.eval()
        totals: dict[str, Any] = {}
        samples = 0
        try:
            for batch in eval_stream(
                self.eval_data, self.eval_batch_size, device=device, collate=self.collate
            ):
                values = self.metrics(model, batch)
                if not isinstance(values, Mapping) or not values:
                    raise DanaError(
                        f"task {self.name!r}: metrics() must return a non-empty dict of sums"
                    )
                for key, value in values.items():
                    value = torch.as_tensor(value).detach()
                    if value.is_floating_point():
                        value = value.double()
                    totals[key] = totals[key] + value if key in totals else value
                samples += batch_size_of(batch)
        finally:
            model.train(was_training)
        if samples == 0:
            raise DanaError(f"task {self.name!r}: the evaluation data is empty")
        self._metric_names = list(totals)
        if self.metric is not None and self.metric not in totals:
            raise DanaError(
                f"task {self.name!r}: metric {self.metric!r} is not one of {list(totals)}"
            )
        # int / int: the exact quotient, rounded once (the presets' error is 100·wrong / n).
        return {key: value.item() / samples for key, value in totals.items()}


def load_task(spec: str, data_dir: Any = None) -> Task:
    """The task of ``"package.module:function"``: the function's return value.

    The function is called with no arguments, or with ``data_dir=`` (the resolved data
    directory) when it takes a parameter of that name.
    """
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise DanaError(
            f"--task {spec!r}: write it as package.module:function (a function returning a Task)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DanaError(
            f"--task {spec!r}: cannot import {module_name} ({err}); is it on PYTHONPATH?"
        ) from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise DanaError(f"--task {spec!r}: {module_name} has no attribute {attr}")
    if isinstance(factory, Task):
        return factory
    if not callable(factory):
        raise DanaError(f"--task {spec!r}: {attr} is neither a Task nor a function")
    wants_dir = "data_dir" in inspect.signature(factory).parameters
    task = factory(data_dir=data_dir) if wants_dir else factory()
    if not isinstance(task, Task):
        raise DanaError(
            f"--task {spec!r}: {attr}() returned a {type(task).__name__}, not a dana.Task"
        )
    return task
