"""N simulated asynchronous workers around one ``nn.Module``, for any training loop.

:class:`SimulatedWorkers` is the optimizer-style face of the simulator: the user's loop
computes each gradient, dana decides whose parameters it is computed at and what the
master does with it::

    workers = dana.SimulatedWorkers(model, algorithm="dana", workers=8, lr=0.1)
    for x, y in loader:
        with workers.step():                      # the model holds the next worker's params
            F.cross_entropy(model(x), y).backward()   # its gradient goes to the master
    workers.finish()                              # the model holds the master's params

Update for update it is :func:`dana.simulate` (the same scheduler, rules, lags and gaps).

BatchNorm running statistics (a policy a real parameter server can follow): they are not
trained by gradients, so they never go through the rules. Each worker keeps its own
(updated by its own forward passes, at the parameters it holds), and sends them with each
message; the master keeps those of the last message it applied ("last writer wins") and
evaluates with them. With one worker this is exactly plain training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from dana.rules import make_rule
from dana.simulation import Simulation, Update, make_scheduler
from dana.simulation.simulator import LearningRate, check_simulation_args
from dana.training.flat import FlatModel


class SimulatedWorkers:
    """``workers`` simulated asynchronous workers training ``model`` with ``algorithm``.

    Args:
        model: the module to train; its parameters are re-pointed at one flat buffer, so
            keep using the module itself (not copies of its parameters). Trained in place.
        algorithm, workers, momentum, weight_decay, schedule, seed, batch_size: as in
            :func:`dana.simulate` (``batch_size``: the mean batch time of ``gamma``).
        lr: a float used as is, or ``lr(gradients_done) -> float``; ``step(lr=…)`` overrides.
        record_gap: log the gap of every update (``Update.gap``).
        rule_options: the rule's extra hyperparameters, as in :func:`dana.simulate`.

    Attributes:
        sim: the :class:`~dana.simulation.Simulation` (master, workers' parameters, log).
        flat: the model's flat parameter and gradient buffers.
        last: the :class:`~dana.simulation.Update` of the last step.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        algorithm: str = "dana",
        workers: int = 1,
        lr: LearningRate = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        schedule: str = "block-random",
        seed: int = 0,
        batch_size: int = 128,
        record_gap: bool = True,
        rule_options: dict[str, float] | None = None,
    ) -> None:
        check_simulation_args(workers=workers, lr=lr, batch_size=batch_size)
        self.model = model
        self.flat = FlatModel(model)
        rule = make_rule(
            algorithm, momentum=momentum, weight_decay=weight_decay, **(rule_options or {})
        )
        scheduler = make_scheduler(
            schedule, workers, seed=seed, batch_size=batch_size, synchronous=rule.synchronous
        )
        self.sim = Simulation(
            rule,
            self.flat.params,
            workers=workers,
            scheduler=scheduler,
            layer_sizes=self.flat.sizes if record_gap else None,
        )
        self.lr = lr
        # With one worker the model's own buffers are the worker's and the master's.
        self.worker_buffers = (
            [self.flat.copy_buffers() for _ in range(workers)] if workers > 1 else None
        )
        self.last_worker = 0
        self.last: Update | None = None

    @property
    def workers(self) -> int:
        return self.sim.workers

    @property
    def gradients(self) -> int:
        """Gradients applied so far, by all workers."""
        return self.sim.gradients

    def current_lr(self) -> float:
        """The learning rate the next update gets (``lr`` at the gradients done)."""
        return float(self.lr(self.sim.gradients) if callable(self.lr) else self.lr)

    # -- one gradient ---------------------------------------------------------------------
    @contextmanager
    def step(self, lr: float | None = None) -> Iterator[int]:
        """Compute the next worker's gradient inside the block; it is applied on exit.

        On entry the model holds the parameters (and BatchNorm statistics) of the worker
        whose message the master applies next, and its gradients are zero; the block runs
        forward and ``backward``; on exit the gradient goes through the worker's and the
        master's rules with ``lr`` (default: the constructor's). Yields the worker's index;
        :attr:`last` then holds its :class:`~dana.simulation.Update`. An exception inside
        the block applies nothing (the update is lost, as a crashed worker's would be).
        """
        worker = self._enter()
        yield worker
        self._exit(worker, self.current_lr() if lr is None else lr)

    def compute(self, gradient: Callable[[], Any], lr: float) -> Any:
        """The callback form of :meth:`step`: ``gradient()`` runs forward and backward at the
        next worker's parameters; returns what it returns."""
        worker = self._enter()
        out = gradient()
        self._exit(worker, lr)
        return out

    def _enter(self) -> int:
        worker = self.sim.next_worker()
        flat = self.flat
        flat.load(self.sim.held[worker])
        if self.worker_buffers is not None:
            flat.load_buffers(self.worker_buffers[worker])
        flat.zero_grad()
        return worker

    def _exit(self, worker: int, lr: float) -> None:
        flat = self.flat
        flat.gather_grad()
        if self.worker_buffers is not None:
            flat.save_buffers(self.worker_buffers[worker])
        self.last_worker = worker
        self.last = self.sim.apply(worker, flat.grad, lr)

    def finish(self, lr: float | None = None) -> nn.Module:
        """Apply what the master still holds back (``ssgd``'s incomplete round) and load the
        master into the model; return the model."""
        self.sim.finish(self.current_lr() if lr is None else lr)
        return self.load_master()

    def load_master(self) -> nn.Module:
        """Put the master's parameters and statistics into the model; return it."""
        self.flat.load(self.sim.params)
        if self.worker_buffers is not None:
            self.flat.load_buffers(self.worker_buffers[self.last_worker])
        return self.model

    @property
    def params(self) -> Tensor:
        """What the master holds, flat (θ, or Θ for ``dana``)."""
        return self.sim.params

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "sim": self.sim.state_dict(),
            "worker_buffers": self.worker_buffers,
            "model_buffers": self.flat.copy_buffers(),
            "last_worker": self.last_worker,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sim.load_state_dict(state["sim"])
        self.worker_buffers = state["worker_buffers"]
        self.flat.load_buffers(state["model_buffers"])
        self.last_worker = state["last_worker"]


def rng_state(device: torch.device) -> dict[str, Any]:
    """Torch's global random state (CPU, and the device's when it is a GPU): dropout and
    other random layers draw from it, so a resumed run restores it."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
