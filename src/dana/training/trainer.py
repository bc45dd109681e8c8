"""Train an ``nn.Module`` with N simulated asynchronous workers.

Data: one shared stream of batches (a fresh seeded permutation per epoch); the k-th
gradient the master applies is computed on the k-th batch, by whichever worker the
scheduler picks. This is the paper's random assignment of data to workers, and it gives
every algorithm and every N the same data order, so comparisons differ only in the
algorithm. An epoch is ``len(train_set) // batch_size`` gradients by all workers together.

BatchNorm running statistics (a policy a real parameter server can follow): they are
not trained by gradients, so they never go through the rules. Each worker keeps its own
(updated by its own forward passes, at the parameters it holds), and sends them with each
message; the master keeps those of the last message it applied ("last writer wins") and
evaluates with them. With one worker this is exactly plain training. The distributed
runtime follows the same policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dana.data import Dataset, TrainLoader, eval_batches
from dana.errors import DanaError
from dana.rules import make_rule
from dana.simulation import Simulation, Update, make_scheduler
from dana.simulation.simulator import check_length, check_simulation_args
from dana.training.flat import FlatModel
from dana.training.schedule import LRSchedule

#: Per-epoch callback: receives the record just logged.
EpochCallback = Callable[[dict[str, Any]], None]


@torch.no_grad()
def test_error(model: nn.Module, dataset: Dataset, device: str | torch.device = "cpu") -> float:
    """Test error (%) of ``model`` on ``dataset``, in eval mode (BatchNorm statistics)."""
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in eval_batches(dataset, 1000, device=device):
        wrong += (model(x).argmax(1) != y).sum()
    model.train()
    return 100.0 * wrong.item() / len(dataset)


def chance_error(num_classes: int) -> float:
    """Test error (%) of a constant guess: what a diverged run is recorded with (paper)."""
    return 100.0 * (1.0 - 1.0 / num_classes)


@dataclass
class TrainResult:
    """What :func:`train` returns. ``model`` holds the master's parameters and statistics."""

    model: nn.Module
    history: list[dict[str, Any]]
    final_test_error: float
    diverged: bool
    wall_seconds: float


class Trainer:
    """The simulator driving a real model; one call of :meth:`run_epoch` per epoch.

    Arguments are those of :func:`train`. The trainer's full state (simulator, workers'
    BatchNorm statistics, history) is :meth:`state_dict`: a run restored from it ends
    bit-identical to one that never stopped.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        test_set: Dataset,
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
        rule_options: dict[str, float] | None = None,
    ) -> None:
        check_simulation_args(workers=workers, lr=lr, batch_size=batch_size)
        if not isinstance(epochs, int) or epochs < 1:
            raise DanaError(f"epochs must be an integer >= 1, got {epochs!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.flat = FlatModel(self.model)
        self.loader = TrainLoader(train_set, batch_size, augment=augment, seed=seed, device=device)
        self.test_set = test_set
        self.num_classes = train_set.num_classes
        self.epochs = epochs
        self.workers = workers
        rule = make_rule(
            algorithm, momentum=momentum, weight_decay=weight_decay, **(rule_options or {})
        )
        scheduler = make_scheduler(
            schedule, workers, seed=seed, batch_size=batch_size, synchronous=rule.synchronous
        )
        check_length(scheduler, epochs * self.loader.batches_per_epoch)
        self.sim = Simulation(
            rule,
            self.flat.params,
            workers=workers,
            scheduler=scheduler,
            layer_sizes=self.flat.sizes if record_gap else None,
        )
        self.schedule = LRSchedule(
            lr, workers, self.loader.batches_per_epoch, tuple(milestones), decay, warmup_epochs
        )
        # With one worker the model's own buffers are the worker's and the master's.
        self.worker_buffers = (
            [self.flat.copy_buffers() for _ in range(workers)] if workers > 1 else None
        )
        self.last_worker = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.diverged = False
        self.wall_seconds = 0.0
        self._batch: tuple[Tensor, Tensor] | None = None
        self._loss: Tensor | None = None

    # -- one gradient -------------------------------------------------------------------
    def _gradient(self, params: Tensor, worker: int) -> Tensor:
        flat = self.flat
        flat.load(params)
        if self.worker_buffers is not None:
            flat.load_buffers(self.worker_buffers[worker])
        flat.zero_grad()
        x, y = self._batch
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.worker_buffers is not None:
            flat.save_buffers(self.worker_buffers[worker])
        self.last_worker = worker
        self._loss = loss.detach()
        return flat.grad

    def step(self, batch: tuple[Tensor, Tensor], lr: float) -> Update:
        """One gradient on ``batch`` by the next worker, applied by the master with ``lr``."""
        self._batch = batch
        return self.sim.step(self._gradient, lr)

    # -- one epoch ----------------------------------------------------------------------
    def run_epoch(self, on_step: Callable[[], None] | None = None) -> dict[str, Any]:
        """Train one epoch and evaluate the master; return (and log) the epoch's record."""
        started = time.perf_counter()
        self.model.train()
        losses, gap_sum, lag_sum, lr = [], None, 0, 0.0
        for step, batch in enumerate(self.loader.epoch(self.epoch)):
            lr = self.schedule(self.sim.gradients)
            update = self.step(batch, lr)
            losses.append(self._loss)
            lag_sum += update.lag
            if update.gap is not None:
                gap_sum = update.gap if gap_sum is None else gap_sum + update.gap
            # Checking every step would sync a GPU every step; 16 steps lose little.
            if step % 16 == 15 and not torch.isfinite(torch.stack(losses[-16:])).all():
                self.diverged = True
                break
            if on_step is not None:
                on_step()
        if self.epoch + 1 == self.epochs and not self.diverged:
            self.sim.finish(lr)
        steps = len(losses)
        train_loss = torch.stack(losses).double().mean().item()
        # The loss only sees parameters before the last step; the master may be NaN already.
        finite = math.isfinite(train_loss) and bool(torch.isfinite(self.sim.params).all())
        self.diverged = self.diverged or not finite
        test_error = chance_error(self.num_classes) if self.diverged else self.evaluate()
        self.epoch += 1
        seconds = time.perf_counter() - started
        self.wall_seconds += seconds
        record = {
            "epoch": self.epoch,
            "train_loss": train_loss if math.isfinite(train_loss) else None,
            "test_error": test_error,
            "lr": lr,
            "gap_mean": (gap_sum.item() / steps) if gap_sum is not None else None,
            "lag_mean": lag_sum / steps,
            "seconds": seconds,
        }
        if record["gap_mean"] is not None and not math.isfinite(record["gap_mean"]):
            record["gap_mean"] = None
        self.history.append(record)
        return record

    @torch.no_grad()
    def evaluate(self, dataset: Dataset | None = None) -> float:
        """Test error (%) of the master's parameters and BatchNorm statistics."""
        self.load_master_into_model()
        return test_error(self.model, dataset or self.test_set, self.device)

    def load_master_into_model(self) -> nn.Module:
        """Put the master's parameters and statistics into ``self.model``; return it."""
        self.flat.load(self.sim.params)
        if self.worker_buffers is not None:
            self.flat.load_buffers(self.worker_buffers[self.last_worker])
        return self.model

    @property
    def finished(self) -> bool:
        return self.diverged or self.epoch >= self.epochs

    @property
    def final_test_error(self) -> float:
        if self.diverged:
            return chance_error(self.num_classes)
        return self.history[-1]["test_error"] if self.history else float("nan")

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "sim": self.sim.state_dict(),
            "worker_buffers": self.worker_buffers,
            "model_buffers": self.flat.copy_buffers(),
            "last_worker": self.last_worker,
            "epoch": self.epoch,
            "history": self.history,
            "diverged": self.diverged,
            "wall_seconds": self.wall_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sim.load_state_dict(state["sim"])
        self.worker_buffers = state["worker_buffers"]
        self.flat.load_buffers(state["model_buffers"])
        self.last_worker = state["last_worker"]
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        self.diverged = state["diverged"]
        self.wall_seconds = state["wall_seconds"]


def train(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    *,
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
    rule_options: dict[str, float] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_set`` with ``workers`` simulated asynchronous workers.

    The model is trained in place; at the end it holds the master's parameters (and
    BatchNorm statistics, see the module docstring). Every epoch is evaluated on
    ``test_set``. A NaN/inf loss ends training early with ``diverged=True`` and the
    chance error as the final error.

    Args:
        model: any ``nn.Module`` taking ``(B, C, H, W)`` float images, returning logits.
        train_set, test_set: :class:`dana.data.Dataset` (uint8 images, int64 labels);
            wrap your own tensors in one to train on them.
        algorithm, workers, schedule, seed: as in :func:`dana.simulate`.
        lr, milestones, decay, warmup_epochs: the single-worker schedule and the warm-up
            (see :class:`dana.training.schedule.LRSchedule`); unchanged for any N.
        momentum, weight_decay, batch_size: the single-worker hyperparameters.
        augment: ``"none"`` or ``"crop-flip"`` (CIFAR's 4-pixel crop and flip).
        device: where the model, data and the simulator's buffers live.
        on_epoch: called with each epoch's record.
        rule_options: the rule's extra hyperparameters, as in :func:`dana.simulate`.

    Example:
        >>> from dana.data import load_dataset
        >>> from dana.models import build_model
        >>> train_set = load_dataset("fashion-mnist", "../shared/data", train=True).subset(2048)
        >>> test_set = load_dataset("fashion-mnist", "../shared/data", train=False)
        >>> model = build_model("cnn", num_classes=10, in_channels=1)
        >>> result = train(model, train_set, test_set, algorithm="dana", workers=8, epochs=2)
        >>> result.final_test_error < 50
        True
    """
    trainer = Trainer(
        model,
        train_set,
        test_set,
        algorithm=algorithm,
        workers=workers,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        milestones=milestones,
        decay=decay,
        warmup_epochs=warmup_epochs,
        schedule=schedule,
        seed=seed,
        augment=augment,
        device=device,
        rule_options=rule_options,
    )
    while not trainer.finished:
        record = trainer.run_epoch()
        if on_epoch is not None:
            on_epoch(record)
    trainer.load_master_into_model()
    return TrainResult(
        trainer.model,
        trainer.history,
        trainer.final_test_error,
        trainer.diverged,
        trainer.wall_seconds,
    )
