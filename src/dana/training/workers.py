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
evaluates with them. With one worker this is exactly plain training. The workers' statistics
live in one store, :attr:`SimulatedWorkers.buffers` (row i is worker i's), which both the
one-gradient step and the wave step (:meth:`SimulatedWorkers.step_wave`) read and update.

Waves: when dana computes the gradients itself (``loss_fn(model, batch)`` and the batch of
each gradient's number), :meth:`~SimulatedWorkers.step_wave` computes every gradient of a
wave (:mod:`dana.simulation.wave`) in one batched call (:class:`WorkerGradients`); the
updates are those of the same number of :meth:`~SimulatedWorkers.step` calls, up to float
rounding. The two kinds of step can be mixed, and a checkpoint of either resumes in the
other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from dana.rules import make_rule
from dana.simulation import Update, make_scheduler
from dana.simulation.simulator import LearningRate, check_simulation_args
from dana.simulation.wave import WaveSimulation
from dana.training.flat import FlatModel
from dana.training.worker_grads import BatchFn, LossFn, WorkerGradients, stack_rows


class SimulatedWorkers:
    """``workers`` simulated asynchronous workers training ``model`` with ``algorithm``.

    Args:
        model: the module to train; its parameters are re-pointed at one flat buffer, so
            keep using the module itself (not copies of its parameters). Trained in place.
        algorithm, workers, momentum, weight_decay, schedule, seed, batch_size: as in
            :func:`dana.simulate` (``batch_size``: the mean batch time of ``gamma``).
        lr: a float used as is, or ``lr(gradients_done) -> float``; ``step(lr=…)`` overrides.
        record_gap: log the gap of the updates (``Update.gap``).
        gap_every: log it on every k-th gradient only (``None`` for the others); see
            :class:`dana.simulation.Simulation`.
        rule_options: the rule's extra hyperparameters, as in :func:`dana.simulate`.

    Attributes:
        sim: the :class:`~dana.simulation.wave.WaveSimulation` (master, workers' parameters).
        flat: the model's flat parameter and gradient buffers.
        buffers: the workers' BatchNorm statistics (all the model's buffers): per buffer a
            ``(N, *shape)`` tensor whose row i is worker i's.
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
        gap_every: int = 1,
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
        self.sim = WaveSimulation(
            rule,
            self.flat.params,
            workers=workers,
            scheduler=scheduler,
            layer_sizes=self.flat.sizes if record_gap else None,
            gap_every=gap_every,
        )
        self.lr = lr
        self.buffers = stack_rows(self.flat.buffers, workers)
        self.last_worker = 0
        self.last: Update | None = None
        self._gradients: WorkerGradients | None = None
        # Each worker's row of sim.held as per-parameter views (held is only ever updated
        # in place, checkpoint loads included, so they stay valid).
        self._held_views = [self.flat.views(row) for row in self.sim.held]

    @property
    def workers(self) -> int:
        return self.sim.workers

    @property
    def gradients(self) -> int:
        """Gradients applied so far, by all workers."""
        return self.sim.gradients

    @property
    def worker_buffers(self) -> list[list[Tensor]] | None:
        """Worker i's buffers (views of :attr:`buffers`), per worker; ``None`` for N = 1."""
        if self.workers == 1:
            return None
        return [[b[i] for b in self.buffers] for i in range(self.workers)]

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

        Inside the block the model's parameters are the worker's own row of ``sim.held``
        (re-pointed, not copied): the block must not change them in place. Outside, the
        model is back on its own buffer, whose values between steps are unspecified; use
        :meth:`finish` or :meth:`load_master` to look at the master's.
        """
        worker = self._enter()
        try:
            yield worker
        except BaseException:
            self.flat.point_home()
            raise
        self._exit(worker, self.current_lr() if lr is None else lr)

    def compute(self, gradient: Callable[[], Any], lr: float) -> Any:
        """The callback form of :meth:`step`: ``gradient()`` runs forward and backward at the
        next worker's parameters; returns what it returns."""
        worker = self._enter()
        try:
            out = gradient()
        except BaseException:
            self.flat.point_home()
            raise
        self._exit(worker, lr)
        return out

    def _enter(self) -> int:
        worker = self.sim.next_worker()
        flat = self.flat
        flat.point_at(self._held_views[worker])  # no copy: the model computes at the row
        flat.load_buffers([b[worker] for b in self.buffers])
        flat.zero_grad()
        return worker

    def _exit(self, worker: int, lr: float) -> None:
        flat = self.flat
        flat.gather_grad()
        # Off the held row before the master replies into it: between steps, nothing done
        # to the model (load_state_dict, an init) can reach a worker's parameters.
        flat.point_home()
        flat.save_buffers([b[worker] for b in self.buffers])
        self.last_worker = worker
        self.last = self.sim.apply(worker, flat.grad, lr)

    # -- a wave of gradients ----------------------------------------------------------------
    def gradients_of(self, loss_fn: LossFn, batch_of: BatchFn) -> WorkerGradients:
        """The workers' gradient functions for ``loss_fn(model, batch)`` on ``batch_of(k)``,
        the batch of gradient number k; they update :attr:`buffers` (kept per pair)."""
        grads = self._gradients
        if grads is None or grads.loss_fn != loss_fn or grads.batch_fn != batch_of:
            grads = WorkerGradients(
                self.flat, loss_fn, self.workers, batch_of, buffers=self.buffers
            )
            self._gradients = grads
        return grads

    def step_wave(
        self, loss_fn: LossFn, batch_of: BatchFn, limit: int, lr: LearningRate | None = None
    ) -> list[Update]:
        """The next wave's gradients (at most ``limit``, ≥ 1), computed in one batched call
        of ``loss_fn(model, batch)`` on ``batch_of(k)`` (gradient number k, counted from 0
        over the run), and applied in the schedule's order with ``lr`` (default: the
        constructor's, evaluated per update). A model that ``torch.func.vmap`` cannot batch
        is computed one worker at a time after a one-line notice. Returns the updates."""
        grads = self.gradients_of(loss_fn, batch_of)
        wave = self.sim.next_wave(limit)
        if not wave:
            return []
        return self.apply_wave(
            wave, grads(self.sim.held_by(wave), wave, self.sim.indices(wave)), lr
        )

    def apply_wave(
        self, workers: list[int], grads: Tensor, lr: LearningRate | None = None
    ) -> list[Update]:
        """Apply the gradients ``grads`` (``(W, P)``) of the next ``workers`` in order
        (:meth:`WaveSimulation.apply_wave`): a prefix of a wave is allowed."""
        updates = self.sim.apply_wave(workers, grads, self.lr if lr is None else lr)
        if updates:
            self.last_worker = updates[-1].worker
            self.last = updates[-1]
        return updates

    def finish(self, lr: float | None = None) -> nn.Module:
        """Apply what the master still holds back (``ssgd``'s incomplete round) and load the
        master into the model; return the model."""
        self.sim.finish(self.current_lr() if lr is None else lr)
        return self.load_master()

    def load_master(self) -> nn.Module:
        """Put the master's parameters and statistics into the model; return it."""
        self.flat.load(self.sim.params)
        self.flat.load_buffers([b[self.last_worker] for b in self.buffers])
        return self.model

    @property
    def params(self) -> Tensor:
        """What the master holds, flat (θ, or Θ for ``dana``)."""
        return self.sim.params

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The layout checkpoints have always had: ``worker_buffers`` one list per worker
        (``None`` for N = 1, whose statistics are the model's, ``model_buffers``)."""
        rows = self.worker_buffers
        return {
            "sim": self.sim.state_dict(),
            "worker_buffers": None if rows is None else [[b.clone() for b in r] for r in rows],
            "model_buffers": (
                self.flat.copy_buffers()
                if rows is not None
                else [b[0].clone() for b in self.buffers]
            ),
            "last_worker": self.last_worker,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sim.load_state_dict(state["sim"])
        rows = state["worker_buffers"]
        if rows is None:
            rows = [state["model_buffers"]] * self.workers
        if len(rows) != self.workers:
            raise ValueError(f"a state of {len(rows)} workers, not {self.workers}")
        for i, row in enumerate(rows):
            for own, saved in zip(self.buffers, row, strict=True):
                own[i].copy_(saved)
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
