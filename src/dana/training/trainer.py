"""Train a :class:`~dana.tasks.Task` (or any ``nn.Module`` with its data) with N simulated
asynchronous workers.

Data: one shared stream of batches (a fresh seeded permutation per epoch); the k-th
gradient the master applies is computed on the k-th batch, by whichever worker the
scheduler picks. This is the paper's random assignment of data to workers, and it gives
every algorithm and every N the same data order, so comparisons differ only in the
algorithm. An epoch is ``samples // batch_size`` gradients by all workers together.
BatchNorm statistics follow :mod:`dana.training.workers`' policy.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dana.data.streams import Batch
from dana.errors import DanaError
from dana.simulation import Update
from dana.simulation.simulator import check_length
from dana.tasks import Task, chance_error, classification_task
from dana.tasks.task import LossFn, MetricsFn
from dana.training.resources import deterministic_kernels
from dana.training.schedule import LRSchedule
from dana.training.worker_grads import use_waves
from dana.training.workers import SimulatedWorkers, rng_state, set_rng_state

__all__ = ["EpochCallback", "TrainResult", "Trainer", "as_task", "chance_error", "train"]

#: Per-epoch callback: receives the record just logged.
EpochCallback = Callable[[dict[str, Any]], None]
#: The values of the ``waves`` option.
WAVES = ("auto", "on", "off")
#: The sequential loop checks the last this many losses for NaN/inf every this many steps.
_CHECK_EVERY = 16


def resolve_waves(waves: str, device: str | torch.device) -> bool:
    """Whether a run with option ``waves`` on ``device`` runs in waves: ``"auto"`` is
    :func:`~dana.training.worker_grads.use_waves` (not on a CPU, where they measured slower)."""
    if waves not in WAVES:
        raise DanaError(f"waves must be one of {', '.join(WAVES)}, got {waves!r}")
    return use_waves(device) if waves == "auto" else waves == "on"


@dataclass(frozen=True)
class ScalarLoss:
    """A task's ``loss(model, batch)`` checked to return a scalar tensor (equal for equal
    losses, so that runs of one task can share a batched gradient call)."""

    loss: LossFn
    task: str

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        loss = self.loss(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise DanaError(f"task {self.task!r}: loss(model, batch) must return a scalar tensor")
        return loss


class _Epoch:
    """What an epoch accumulates: its updates' losses, lags and gaps, and where it stops."""

    def __init__(self, end: int) -> None:
        self.started = time.perf_counter()
        self.end = end  # the gradient count at which the epoch ends
        self.losses: list[torch.Tensor] = []
        self.steps = 0
        self.lag_sum = 0
        self.gap_sum: torch.Tensor | None = None
        self.gaps = 0  # updates whose gap was measured (see ``gap_every``)
        self.lr = 0.0
        self.stopped = False  # diverged: the sequential loop would have broken off here
        self.checked = 0  # steps whose losses were checked for NaN/inf
        self.first_bad: int | None = None  # the first step with a NaN/inf loss
        self._unchecked = 0  # index in ``losses`` of the first entry not looked at

    def add(self, update: Update, lags: Counter[int]) -> None:
        self.steps += 1
        self.lag_sum += update.lag
        lags[update.lag] += 1
        if update.gap is not None:
            self.gap_sum = update.gap if self.gap_sum is None else self.gap_sum + update.gap
            self.gaps += 1

    def cut(self, losses: torch.Tensor) -> int:
        """How many of a wave's updates (losses ``losses``, from step :attr:`steps` on) to
        apply: the sequential loop checks each block of 16 steps' losses after its last step
        and stops there, so a wave ends at the block holding the first NaN/inf."""
        start, end = self.steps, self.steps + len(losses)
        if self.first_bad is None and end // _CHECK_EVERY > start // _CHECK_EVERY:
            # A check falls inside the wave: look at every loss since the last look.
            fresh = torch.cat([*self.losses[self._unchecked :], losses])
            bad = torch.nonzero(~torch.isfinite(fresh))
            if len(bad):
                self.first_bad = self.checked + int(bad[0])
            self.checked = end
            self._unchecked = len(self.losses) + 1
        if self.first_bad is not None:
            stop = self.first_bad // _CHECK_EVERY * _CHECK_EVERY + _CHECK_EVERY - 1
            if stop < end:
                self.stopped = True
                return stop - start + 1
        return len(losses)


def as_task(
    task_or_model: Task | nn.Module | Callable[[], nn.Module],
    train_data: Any = None,
    eval_data: Any = None,
    *,
    loss: LossFn | None = None,
    metrics: MetricsFn | None = None,
    augment: str = "none",
    name: str | None = None,
) -> Task:
    """``task_or_model`` if it is a :class:`Task`, else a task made of the pieces.

    Without ``loss`` the task is classification (cross-entropy, top-1 error in percent);
    with it, ``metrics`` default to the mean loss on ``eval_data``.
    """
    if isinstance(task_or_model, Task):
        pieces = {
            "train_data": train_data,
            "eval_data": eval_data,
            "loss": loss,
            "metrics": metrics,
        }
        given = [k for k, v in pieces.items() if v is not None]
        if given:
            raise DanaError(f"train() got a Task and {', '.join(given)}: put them in the Task")
        return task_or_model
    if train_data is None:
        raise DanaError("train(model, train_data, ...) needs training data (or pass a dana.Task)")
    label = name or getattr(train_data, "name", None) or "task"
    if loss is None:
        if metrics is not None:
            raise DanaError("metrics without a loss: give loss= too (or neither: classification)")
        return classification_task(label, task_or_model, train_data, eval_data, augment=augment)
    return Task(
        name=label,
        model=task_or_model,
        train_data=train_data,
        loss=loss,
        eval_data=eval_data,
        metrics=metrics,
        augment=augment,
    )


@dataclass
class TrainResult:
    """What :func:`train` returns. ``model`` holds the master's parameters and statistics.

    Attributes:
        metric: the task's primary metric; ``final_metric`` its last value (a diverged run
            records the task's ``diverged_metrics``, the chance error for classification).
        final_metrics: every metric of the last epoch.
        final_test_error: ``final_metrics["test_error"]`` (classification), else ``None``.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    final_test_error: float | None
    diverged: bool
    wall_seconds: float
    metric: str | None = None
    final_metric: float | None = None
    final_metrics: dict[str, float | None] = field(default_factory=dict)


class Trainer:
    """The simulator driving a task's model; one call of :meth:`run_epoch` per epoch.

    Arguments are those of :func:`train`. The trainer's full state (simulator, workers'
    BatchNorm statistics, torch's random state, history) is :meth:`state_dict`: a run
    restored from it ends bit-identical to one that never stopped (with ``waves`` as it
    was; a state saved in waves resumes one at a time, and back, up to float rounding).
    """

    def __init__(
        self,
        task: Task | nn.Module,
        train_data: Any = None,
        eval_data: Any = None,
        *,
        algorithm: str,
        workers: int,
        epochs: int,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 128,
        milestones: tuple[int, ...] = (),
        decay: float = 10.0,
        warmup_epochs: float = 5.0,
        schedule: str = "block-random",
        seed: int = 0,
        augment: str = "none",
        device: str | torch.device = "cpu",
        record_gap: bool = True,
        loss: LossFn | None = None,
        metrics: MetricsFn | None = None,
        rule_options: dict[str, float] | None = None,
        waves: str = "auto",
        gap_every: int = 1,
    ) -> None:
        task = as_task(task, train_data, eval_data, loss=loss, metrics=metrics, augment=augment)
        if not isinstance(epochs, int) or epochs < 1:
            raise DanaError(f"epochs must be an integer >= 1, got {epochs!r}")
        self.task = task
        self.device = torch.device(device)
        deterministic_kernels(self.device)
        #: Whether epochs run in waves (the ``waves`` option resolved for the device).
        self.uses_waves = resolve_waves(waves, self.device)
        self.model = task.build_model(seed).to(self.device)
        self.loader = task.train_stream(batch_size, seed=seed, device=self.device)
        self.epochs = epochs
        self.workers = SimulatedWorkers(
            self.model,
            algorithm=algorithm,
            workers=workers,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            schedule=schedule,
            seed=seed,
            batch_size=batch_size,
            record_gap=record_gap,
            rule_options=rule_options,
            gap_every=gap_every,
        )
        check_length(self.workers.sim.scheduler, epochs * self.loader.batches_per_epoch)
        self.schedule = LRSchedule(
            lr, workers, self.loader.batches_per_epoch, tuple(milestones), decay, warmup_epochs
        )
        self.workers.lr = self.schedule
        self.flat = self.workers.flat
        self.sim = self.workers.sim
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.lags: Counter[int] = Counter()  # updates applied at each lag, over the run
        self.diverged = False
        self.wall_seconds = 0.0
        self._loss: torch.Tensor | None = None
        self._epoch: _Epoch | None = None
        #: The workers' gradients for waves: the task's loss on the stream's batches.
        self.worker_grads = self.workers.gradients_of(ScalarLoss(task.loss, task.name), self._batch)
        self._batches: Any = None  # the current epoch's batch iterator (waves)
        self._fetched: dict[int, Batch] = {}

    def _batch(self, k: int) -> Batch:
        """The batch of gradient number ``k``, from the epoch's iterator (which may collate
        ahead in worker processes); the last few are kept, for a wave computed twice."""
        if k not in self._fetched:
            epoch, index = divmod(k, self.loader.batches_per_epoch)
            if self._batches is None or self._batches[0] != epoch or self._batches[1] > index:
                self._batches = [epoch, 0, iter(self.loader.epoch(epoch))]
                self._fetched.clear()
            while self._batches[1] <= index:
                self._fetched[epoch * self.loader.batches_per_epoch + self._batches[1]] = next(
                    self._batches[2]
                )
                self._batches[1] += 1
            for old in [j for j in self._fetched if j < k - self.workers.workers]:
                del self._fetched[old]
        return self._fetched[k]

    # -- one gradient -------------------------------------------------------------------
    def _gradient(self, batch: Batch) -> None:
        loss = self.task.loss(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise DanaError(
                f"task {self.task.name!r}: loss(model, batch) must return a scalar tensor"
            )
        loss.backward()
        self._loss = loss.detach()

    def step(self, batch: Batch, lr: float) -> Update:
        """One gradient on ``batch`` by the next worker, applied by the master with ``lr``."""
        self.workers.compute(lambda: self._gradient(batch), lr)
        return self.workers.last

    # -- one epoch ----------------------------------------------------------------------
    def run_epoch(self, on_step: Callable[[], None] | None = None) -> dict[str, Any]:
        """Train one epoch and evaluate the master; return (and log) the epoch's record."""
        self.start_epoch()
        if self.uses_waves:
            while wave := self.next_wave():
                grads = self.worker_grads(self.sim.held_by(wave), wave, self.sim.indices(wave))
                self.apply_wave(wave, grads, self.worker_grads.losses, on_step)
        else:
            self._sequential_epoch(on_step)
        return self.end_epoch()

    def _sequential_epoch(self, on_step: Callable[[], None] | None) -> None:
        epoch = self._epoch
        for step, batch in enumerate(self.loader.epoch(self.epoch)):
            epoch.lr = self.schedule(self.sim.gradients)
            update = self.step(batch, epoch.lr)
            epoch.losses.append(self._loss)
            epoch.add(update, self.lags)
            # Checking every step would sync a GPU every step; 16 steps lose little.
            if (
                step % _CHECK_EVERY == _CHECK_EVERY - 1
                and not torch.isfinite(torch.stack(epoch.losses[-_CHECK_EVERY:])).all()
            ):
                epoch.stopped = True
                break
            if on_step is not None:
                on_step()

    # The pieces of a wave epoch, for :func:`dana.training.group.train_group` as well.
    def start_epoch(self) -> None:
        """Begin an epoch (then :meth:`next_wave` / :meth:`apply_wave`, :meth:`end_epoch`)."""
        self.model.train()
        self._epoch = _Epoch((self.epoch + 1) * self.loader.batches_per_epoch)

    def next_wave(self) -> list[int]:
        """The workers of the epoch's next wave; ``[]`` when the epoch is done."""
        epoch = self._epoch
        if epoch.stopped:
            return []
        return self.sim.next_wave(epoch.end - self.sim.gradients)

    def apply_wave(
        self,
        workers: list[int],
        grads: torch.Tensor,
        losses: torch.Tensor,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        """Apply the wave ``workers``' gradients (their losses: ``losses``) in order, up to
        where the sequential loop would have stopped on a NaN/inf loss."""
        epoch = self._epoch
        keep = epoch.cut(losses)
        for update in self.workers.apply_wave(workers[:keep], grads[:keep]):
            epoch.add(update, self.lags)
            if on_step is not None:
                on_step()
        epoch.losses.append(losses[:keep])
        epoch.lr = self.schedule(self.sim.gradients - 1)

    def end_epoch(self) -> dict[str, Any]:
        """End the epoch: ``ssgd``'s last round after the last epoch, the evaluation of the
        master (or the divergence), the record (returned and logged)."""
        epoch, self._epoch = self._epoch, None
        self.diverged = self.diverged or epoch.stopped
        lr = epoch.lr
        if self.epoch + 1 == self.epochs and not self.diverged:
            self.sim.finish(lr)
        steps = epoch.steps
        train_loss = torch.cat([x.reshape(-1) for x in epoch.losses]).double().mean().item()
        # The loss only sees parameters before the last step; the master may be NaN already.
        finite = math.isfinite(train_loss) and bool(torch.isfinite(self.sim.params).all())
        self.diverged = self.diverged or not finite
        metrics = self.diverged_metrics() if self.diverged else self.evaluate()
        self.epoch += 1
        seconds = time.perf_counter() - epoch.started
        self.wall_seconds += seconds
        gap_sum = epoch.gap_sum
        gap_mean = (gap_sum.item() / epoch.gaps) if gap_sum is not None else None
        record = {
            "epoch": self.epoch,
            "train_loss": train_loss if math.isfinite(train_loss) else None,
            **metrics,
            "lr": lr,
            "gap_mean": gap_mean if gap_mean is not None and math.isfinite(gap_mean) else None,
            "lag_mean": epoch.lag_sum / steps,
            "seconds": seconds,
        }
        self.history.append(record)
        return record

    @torch.no_grad()
    def evaluate(self, data: Any = None) -> dict[str, float]:
        """The task's metrics of the master's parameters and BatchNorm statistics (on
        ``data``, default the task's evaluation data)."""
        self.load_master_into_model()
        if data is not None:
            return replace(self.task, eval_data=data).evaluate(self.model, self.device)
        return self.task.evaluate(self.model, self.device)

    def diverged_metrics(self) -> dict[str, float | None]:
        """What a diverged epoch records: the task's ``diverged_metrics``, else nulls."""
        if self.task.diverged_metrics is not None:
            return dict(self.task.diverged_metrics)
        names = [k for k in (self.history[-1] if self.history else {}) if k not in _LOG_KEYS]
        primary = self.task.primary_metric
        if primary and primary != "train_loss" and primary not in names:
            names.insert(0, primary)
        return dict.fromkeys(names)

    def load_master_into_model(self) -> nn.Module:
        """Put the master's parameters and statistics into ``self.model``; return it."""
        return self.workers.load_master()

    @property
    def worker_buffers(self) -> list[list[torch.Tensor]] | None:
        return self.workers.worker_buffers

    @property
    def last_worker(self) -> int:
        return self.workers.last_worker

    @property
    def finished(self) -> bool:
        return self.diverged or self.epoch >= self.epochs

    @property
    def metric(self) -> str | None:
        """The primary metric's name."""
        return self.task.primary_metric

    @property
    def final_metrics(self) -> dict[str, float | None]:
        if self.diverged:
            return self.diverged_metrics()
        if not self.history:
            return {}
        last = self.history[-1]
        if self.task.eval_data is None:
            return {"train_loss": last["train_loss"]}
        return {k: v for k, v in last.items() if k not in _LOG_KEYS}

    @property
    def final_metric(self) -> float | None:
        return self.final_metrics.get(self.metric) if self.metric else None

    @property
    def final_test_error(self) -> float | None:
        """The final top-1 error (%) of a classification task; ``nan`` before any epoch."""
        if not self.history and not self.diverged:
            return float("nan")
        return self.final_metrics.get("test_error")

    def result(self) -> TrainResult:
        """The :class:`TrainResult` so far (the model loaded with the master)."""
        self.load_master_into_model()
        return TrainResult(
            self.model,
            self.history,
            self.final_test_error,
            self.diverged,
            self.wall_seconds,
            self.metric,
            self.final_metric,
            self.final_metrics,
        )

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.workers.state_dict(),
            "rng": rng_state(self.device),
            "epoch": self.epoch,
            "history": self.history,
            "lags": dict(self.lags),
            "diverged": self.diverged,
            "wall_seconds": self.wall_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.workers.load_state_dict(state)
        if "rng" in state:
            set_rng_state(state["rng"], self.device)
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        self.lags = Counter(state.get("lags", {}))
        self.diverged = state["diverged"]
        self.wall_seconds = state["wall_seconds"]


#: Keys of an epoch record that are not metrics.
_LOG_KEYS = ("epoch", "train_loss", "lr", "gap_mean", "lag_mean", "seconds")


def train(
    task_or_model: Task | nn.Module | Callable[[], nn.Module],
    train_data: Any = None,
    eval_data: Any = None,
    *,
    loss: LossFn | None = None,
    metrics: MetricsFn | None = None,
    algorithm: str = "dana",
    workers: int = 1,
    epochs: int = 1,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    milestones: tuple[int, ...] = (),
    decay: float = 10.0,
    warmup_epochs: float = 5.0,
    schedule: str = "block-random",
    seed: int = 0,
    augment: str = "none",
    device: str | torch.device = "cpu",
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    rule_options: dict[str, float] | None = None,
    waves: str = "auto",
    gap_every: int = 1,
) -> TrainResult:
    """Train with ``workers`` simulated asynchronous workers; every epoch is evaluated.

    Give a :class:`~dana.tasks.Task`, or a model with its data (and optionally ``loss``
    and ``metrics``; without ``loss``: classification, cross-entropy and top-1 error). The
    model is trained in place (a factory's model is built seeded); at the end it holds the
    master's parameters and BatchNorm statistics. A NaN/inf loss ends training early with
    ``diverged=True``.

    Args:
        task_or_model: a Task, an ``nn.Module``, or a function returning one.
        train_data, eval_data: any data :class:`~dana.tasks.Task` takes (a map-style
            Dataset, a DataLoader, tensors, a :class:`dana.data.Dataset`).
        loss: ``loss(model, batch) -> Tensor``; metrics: ``metrics(model, batch) -> dict``
            of sums over the batch (see :class:`~dana.tasks.Task`).
        algorithm, workers, schedule, seed: as in :func:`dana.simulate`.
        lr, milestones, decay, warmup_epochs: the single-worker schedule and the warm-up
            (see :class:`dana.training.schedule.LRSchedule`); unchanged for any N.
        momentum, weight_decay, batch_size: the single-worker hyperparameters.
        augment: ``"none"`` or ``"crop-flip"`` (CIFAR's crop and flip; image Datasets only).
        device: where the model, data and the simulator's buffers live.
        on_epoch: called with each epoch's record.
        progress: a progress bar with ETA on stderr.
        out: a folder for ``result.json``, ``metrics.csv``, the checkpoint and ``model.pt``
            (as ``dana run`` writes them); training resumes from its checkpoint, and a
            finished run there is returned without training.
        rule_options: the rule's extra hyperparameters, as in :func:`dana.simulate`.
        waves: ``"on"``: compute every wave of ready gradients in one batched call
            (``torch.func.vmap``; the same run up to float rounding), ``"off"``: one at a
            time, ``"auto"``: waves except on a CPU, where they measured slower.
        gap_every: measure the gap on every k-th gradient only (each epoch's ``gap_mean``
            is the mean of those): the gap is most of the simulator's cost on a cheap model.

    Example:
        >>> import torch, dana
        >>> X = torch.randn(512, 8); Y = X @ torch.randn(8, 1)
        >>> r = dana.train(torch.nn.Linear(8, 1), (X, Y), (X, Y), workers=4, epochs=3,
        ...                loss=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
        ...                batch_size=32, lr=0.05, warmup_epochs=0, progress=False)
        >>> r.metric, r.final_metric < 0.05
        ('loss', True)
    """
    task = as_task(
        task_or_model, train_data, eval_data, loss=loss, metrics=metrics, augment=augment
    )
    hyper = {
        "algorithm": algorithm,
        "workers": workers,
        "epochs": epochs,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "milestones": tuple(milestones),
        "decay": decay,
        "warmup_epochs": warmup_epochs,
        "schedule": schedule,
        "seed": seed,
        "device": str(device),
        "rule_options": dict(rule_options or {}),
        "waves": waves,
        "gap_every": gap_every,
    }
    if out is not None:
        return _train_into(task, Path(out), hyper, progress=progress, on_epoch=on_epoch)
    trainer = Trainer(task, **hyper)
    bar = tqdm(
        total=epochs * trainer.loader.batches_per_epoch,
        unit="batch",
        desc=f"{algorithm} N={workers}",
        dynamic_ncols=True,
        leave=False,
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        while not trainer.finished:
            record = trainer.run_epoch(on_step=bar.update)
            if on_epoch is not None:
                on_epoch(record)
    trainer.load_master_into_model()
    return trainer.result()


def _train_into(
    task: Task,
    out: Path,
    hyper: dict[str, Any],
    *,
    progress: bool,
    on_epoch: EpochCallback | None,
) -> TrainResult:
    """:func:`train` with files: ``dana run``'s folder, resumable; the model from its
    ``model.pt`` when the run there had finished."""
    from dana.training.config import RunConfig
    from dana.training.run import MODEL, run_experiment

    config = RunConfig.for_task(task, **hyper)
    result = run_experiment(config, out, task=task, progress=progress, on_epoch=on_epoch)
    model = task.build_model(config.seed).to(config.device)  # as train() without a folder
    if (out / MODEL).exists():
        model.load_state_dict(
            torch.load(out / MODEL, map_location=config.device, weights_only=True)
        )
    finals = (
        {}
        if not result["epochs"]
        else {k: v for k, v in result["epochs"][-1].items() if k not in _LOG_KEYS}
    )
    return TrainResult(
        model,
        result["epochs"],
        result["final_test_error"],
        result["diverged"],
        result["wall_seconds"],
        result["metric"],
        result["final_metric"],
        finals,
    )
