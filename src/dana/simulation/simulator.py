"""N asynchronous workers and one master, simulated faithfully on one device.

Event model (SPEC): every worker starts holding the master's initial parameters; the
scheduler says whose message reaches the master next; that worker's gradient is computed
at exactly the parameters it holds (computing it when the message is applied gives the
same value, since those parameters do not change meanwhile); the master applies the
message and replies to that worker only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from dana.errors import DanaError
from dana.rules import MasterState, Rule, WorkerState, make_rule
from dana.simulation.scheduling import Scheduler, check_schedule, make_scheduler

#: A learning rate: a constant, or a function of the number of gradients done so far.
LearningRate = float | Callable[[int], float]
#: ``grad_fn(params, worker) -> grad`` on flat buffers.
FlatGradFn = Callable[[Tensor, int], Tensor]


class Gap:
    """``G(Δθ) = Σ over layers ψ of ‖ψ‖/√m`` (paper Section 3), on a flat buffer.

    Args:
        layer_sizes: the number of elements of each layer (each parameter tensor is a
            layer), in flat order.
    """

    def __init__(self, layer_sizes: Sequence[int]) -> None:
        if not layer_sizes or min(layer_sizes) < 1:
            raise DanaError("the gap needs layers of at least one element each")
        self.layer_sizes = list(layer_sizes)
        self._views: list[Tensor] = []
        self._views_of = -1
        self._scale = torch.tensor(
            [1.0 / math.sqrt(m) for m in self.layer_sizes], dtype=torch.float64
        )

    def __call__(self, delta: Tensor) -> Tensor:
        """The gap of ``delta`` as a 0-d float64 tensor, left on its device (no sync)."""
        if self._scale.device != delta.device:
            self._scale = self._scale.to(delta.device)
        if delta.data_ptr() != self._views_of:  # the simulator passes one buffer: split once
            self._views = list(delta.split(self.layer_sizes))
            self._views_of = delta.data_ptr()
        # One fused norm per layer: clip_grad_norm_ uses the same kernel.
        norms = torch._foreach_norm(self._views)
        return torch.stack(norms).to(torch.float64) @ self._scale


@dataclass
class Update:
    """What the master logged for one gradient."""

    worker: int
    lag: int
    gap: Tensor | None


class Simulation:
    """The simulator's state and its one-gradient step, on flat parameter buffers.

    Args:
        rule: the algorithm (see :mod:`dana.rules`).
        params: initial parameters, flat; copied.
        workers: N ≥ 1.
        scheduler: who updates next (:func:`dana.simulation.scheduling.make_scheduler`).
        layer_sizes: sizes of the layers in ``params``, for the gap; ``None`` skips the gap.
        gap_every: measure the gap on every k-th gradient only (gradient numbers 0, k, 2k,
            …; the others log ``None``). The gap is O(model) memory traffic per update
            (for ``dana`` also the running Σⱼvⱼ, then computed only when measured): on a
            cheap model it is most of the simulator's cost over a plain training loop.

    Memory: N copies of the parameters (what each worker holds), plus the rule's state.
    """

    def __init__(
        self,
        rule: Rule,
        params: Tensor,
        *,
        workers: int,
        scheduler: Scheduler,
        layer_sizes: Sequence[int] | None = None,
        gap_every: int = 1,
    ) -> None:
        if params.dim() != 1:
            raise DanaError("Simulation works on a flat (1-D) parameter buffer")
        check_gap_every(gap_every)
        self.gap_every = gap_every
        self.rule = rule
        self.workers = workers
        self.scheduler = scheduler
        self.master: MasterState = rule.init_master(params, workers)
        self.worker_states: list[WorkerState] = [rule.init_worker(params) for _ in range(workers)]
        self.held = params.detach().expand(workers, -1).clone()
        self.received_at = [0] * workers
        self.updates = 0
        self.gradients = 0
        #: Workers drawn from the scheduler ahead of their update (see :meth:`peek`).
        self.upcoming: list[int] = []
        self.gap = Gap(layer_sizes) if layer_sizes is not None else None
        self._delta = torch.empty_like(params) if self.gap is not None else None
        # Σⱼ vⱼ over the workers, for dana's θ form: kept up to date when every update's gap
        # is measured, summed when needed otherwise (N reads every k updates, not 2 each).
        self.velocity_sum = torch.zeros_like(params) if self._keeps_velocity_sum() else None
        self._velocity_scratch: Tensor | None = None

    def step(self, grad_fn: FlatGradFn, lr: float) -> Update:
        """Let the next worker send one gradient and the master apply it with ``lr``."""
        worker = self.next_worker()
        params = self.held[worker]
        return self.apply(worker, grad_fn(params, worker), lr)

    def next_worker(self) -> int:
        """The worker of the next update: the first drawn ahead, else a fresh draw."""
        return self.upcoming.pop(0) if self.upcoming else self.scheduler.next_worker()

    def peek(self, count: int) -> list[int]:
        """The workers of the next ``count`` updates, drawn ahead without consuming them.

        The schedule does not depend on the gradients, so drawing early changes nothing:
        the draws wait in :attr:`upcoming` (checkpointed with the scheduler) and
        :meth:`next_worker` hands them out in order.
        """
        while len(self.upcoming) < count:
            self.upcoming.append(self.scheduler.next_worker())
        return self.upcoming[:count]

    def apply(self, worker: int, grad: Tensor, lr: float) -> Update:
        """The master applies ``grad``, computed by ``worker`` at ``self.held[worker]``.

        ``grad`` is overwritten (see :meth:`Rule.worker_step`).
        """
        lag = self.updates - self.received_at[worker]
        params = self.held[worker]
        gap = None
        if self.gap is not None and self.gradients % self.gap_every == 0:
            gap = self.gap(
                self.rule.gap_delta(
                    self.master, params, lr, self._current_velocity_sum(), out=self._delta
                )
            )
        state = self.worker_states[worker]
        if self.velocity_sum is not None:
            self.velocity_sum.sub_(state.velocity)
        message = self.rule.worker_step(state, params, grad)
        if self.velocity_sum is not None:
            self.velocity_sum.add_(state.velocity)
        reply = self.rule.master_step(self.master, message, worker, lr)
        self.gradients += 1
        if reply is not None:
            self._deliver(reply, worker)
        return Update(worker, lag, gap)

    def _keeps_velocity_sum(self) -> bool:
        return self.rule.worker_momentum and self.gap is not None and self.gap_every == 1

    def _current_velocity_sum(self) -> Tensor | None:
        """Σⱼ vⱼ of the workers' velocities (``dana``'s θ form), ``None`` for other rules:
        the running sum when it is kept, else :meth:`_summed_velocities`."""
        if self.velocity_sum is not None or not self.rule.worker_momentum:
            return self.velocity_sum
        return self._summed_velocities()

    def _summed_velocities(self) -> Tensor:
        """Σⱼ vⱼ summed now, into a scratch buffer (overwritten by the next call)."""
        if self._velocity_scratch is None:
            self._velocity_scratch = torch.empty_like(self.master.params)
        total = self._velocity_scratch.zero_()
        for state in self.worker_states:
            total.add_(state.velocity)
        return total

    def finish(self, lr: float) -> None:
        """Apply what the master still holds back (``ssgd``: an incomplete last round)."""
        reply = self.rule.flush(self.master, lr)
        if reply is not None:
            self._deliver(reply, None)

    def _deliver(self, reply: Tensor, worker: int | None) -> None:
        self.updates += 1
        if self.rule.synchronous or worker is None:
            self.held.copy_(reply.expand_as(self.held))
            self.received_at = [self.updates] * self.workers
        else:
            self.held[worker].copy_(reply)
            self.received_at[worker] = self.updates

    @property
    def params(self) -> Tensor:
        """What the master holds (θ, or Θ for ``dana``): evaluate and report this."""
        return self.rule.params(self.master)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit for bit (tensors and plain values only)."""
        return {
            "master": {f.name: getattr(self.master, f.name) for f in fields(self.master)},
            "workers": [
                {f.name: getattr(ws, f.name) for f in fields(ws)} for ws in self.worker_states
            ],
            "held": self.held,
            "received_at": list(self.received_at),
            "updates": self.updates,
            "gradients": self.gradients,
            # Saved whatever gap_every (summed if not kept): a checkpoint has one layout and
            # resumes under any k.
            "velocity_sum": self._saved_velocity_sum(),
            "scheduler": self.scheduler.state_dict(),
            "upcoming": list(self.upcoming),
        }

    def _saved_velocity_sum(self) -> Tensor | None:
        if self.gap is None or not self.rule.worker_momentum:
            return self.velocity_sum
        total = self._current_velocity_sum()
        return total if total is self.velocity_sum else total.clone()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.master = MasterState(**state["master"])
        self.worker_states = [
            WorkerState(**w) if isinstance(w, dict) else WorkerState(velocity=w)  # older files
            for w in state["workers"]
        ]
        self.held.copy_(state["held"])  # in place: views of it (a model's) stay valid
        self.received_at = list(state["received_at"])
        self.updates = state["updates"]
        self.gradients = state["gradients"]
        saved = state["velocity_sum"]
        if not self._keeps_velocity_sum():
            self.velocity_sum = None
        else:  # a state without it (the gap was not recorded): sum the velocities
            self.velocity_sum = saved if saved is not None else self._summed_velocities().clone()
        self.scheduler.load_state_dict(state["scheduler"])
        self.upcoming = list(state.get("upcoming", []))  # absent in older checkpoints


@dataclass
class SimulationResult:
    """What :func:`simulate` returns.

    Attributes:
        params: the parameters the master holds at the end, one tensor per input layer,
            with the input dtype (θ for ``dana-zero``, Θ for ``dana``).
        order: the worker of each update, in the order the master applied them.
        lag: τ of each update.
        gap: G of each update (θ form for ``dana``, so it logs the gaps ``dana-zero`` logs).
    """

    params: list[Tensor]
    order: list[int]
    lag: list[int]
    gap: list[float]


def simulate(
    params: Tensor | Sequence[Tensor],
    grad_fn: Callable[[list[Tensor], int], Sequence[Tensor] | Tensor],
    *,
    algorithm: str,
    workers: int,
    steps: int,
    lr: LearningRate,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "round-robin",
    seed: int = 0,
    batch_size: int = 128,
    options: dict[str, float] | None = None,
    batched: bool = False,
) -> SimulationResult:
    """Run ``algorithm`` with ``workers`` simulated asynchronous workers for ``steps`` gradients.

    Args:
        params: a tensor or a list of tensors (each one a layer for the gap); not modified.
        grad_fn: ``grad_fn(params, worker)`` returns the gradient (one tensor per layer) at
            ``params``, the list of tensors worker ``worker`` holds. It must not modify them.
        algorithm: one of :data:`dana.rules.ALGORITHMS`.
        workers: N ≥ 1.
        steps: gradients computed in total, by all workers.
        lr: a float used as is for every update, or ``lr(gradients_done) -> float``.
        momentum: γ in [0, 1) (ignored by ``asgd``).
        weight_decay: λ ≥ 0, added to each gradient on the worker.
        schedule: ``round-robin``, ``block-random``, ``gamma`` (SPEC's), a delay model
            (``gamma:slow=0.25x2``, ``lognormal``, ``pareto``, ``replay:PATH``; see
            :mod:`dana.simulation.scheduling`).
        seed: seeds the scheduler; the same seed gives bit-identical results.
        batch_size: B, only the mean of the gamma model's batch times.
        options: the rule's extra hyperparameters (e.g. ``{"lam": 0.1}`` for ``dc-asgd``;
            ``make_rule(algorithm).options`` lists them with their defaults).
        batched: run in waves (:mod:`dana.simulation.wave`): ``grad_fn(params, workers)``
            then gets, per layer, the parameters of several workers stacked along a new
            first dimension (``workers`` lists them) and returns their gradients stacked
            the same way. Same result as the one-at-a-time run up to float rounding.

    Example:
        >>> import torch, dana
        >>> target = torch.tensor([1.0, -2.0])
        >>> r = dana.simulate(torch.zeros(2), lambda p, w: [p[0] - target],
        ...                   algorithm="dana", workers=4, steps=200, lr=0.1)
        >>> torch.allclose(r.params[0], target, atol=1e-3)
        True
    """
    layers = [params] if isinstance(params, Tensor) else list(params)
    check_simulation_args(workers=workers, steps=steps, lr=lr, batch_size=batch_size)
    check_schedule(schedule, workers)
    if not layers or len({p.dtype for p in layers}) != 1 or not layers[0].is_floating_point():
        raise DanaError(
            "params must be one floating-point tensor or a non-empty list of them, one dtype"
        )
    if any(p.numel() == 0 for p in layers):
        raise DanaError("params holds an empty tensor: every layer needs at least one element")
    shapes = [p.shape for p in layers]
    sizes = [p.numel() for p in layers]
    flat = torch.cat([p.detach().reshape(-1) for p in layers])
    rule = make_rule(algorithm, momentum=momentum, weight_decay=weight_decay, **(options or {}))
    scheduler = make_scheduler(
        schedule, workers, seed=seed, batch_size=batch_size, synchronous=rule.synchronous
    )
    check_length(scheduler, steps)
    if batched:
        from dana.simulation.wave import WaveSimulation  # wave imports this module

        sim = WaveSimulation(rule, flat, workers=workers, scheduler=scheduler, layer_sizes=sizes)
    else:
        sim = Simulation(rule, flat, workers=workers, scheduler=scheduler, layer_sizes=sizes)
    grad_buffer = torch.empty_like(flat)

    def check(grads: Sequence[Tensor] | Tensor, rows: int = 1) -> list[Tensor]:
        grads = [grads] if isinstance(grads, Tensor) else list(grads)
        if [g.numel() for g in grads] != [rows * size for size in sizes]:
            raise DanaError("grad_fn must return one gradient per parameter tensor, same shapes")
        return grads

    def flat_grad_fn(worker_params: Tensor, worker: int) -> Tensor:
        views = [v.view(s) for v, s in zip(worker_params.split(sizes), shapes, strict=True)]
        grads = check(grad_fn(views, worker))
        return torch.cat([g.detach().reshape(-1) for g in grads], out=grad_buffer)

    def batched_grad_fn(stacked: Tensor, wave: list[int], _: list[int]) -> Tensor:
        w = len(wave)
        views = [v.view(w, *s) for v, s in zip(stacked.split(sizes, dim=1), shapes, strict=True)]
        grads = check(grad_fn(views, wave), w)
        return torch.cat([g.detach().reshape(w, -1) for g in grads], dim=1)

    rate = lr if callable(lr) else (lambda _: lr)
    updates: list[Update] = []
    while len(updates) < steps:
        if batched:
            updates += sim.step_wave(batched_grad_fn, rate, steps - len(updates))
        else:
            updates.append(sim.step(flat_grad_fn, float(rate(len(updates)))))
    order = [u.worker for u in updates]
    lags = [u.lag for u in updates]
    gaps = [u.gap for u in updates]
    if steps:
        sim.finish(float(rate(steps - 1)))
    out = [v.view(s).clone() for v, s in zip(sim.params.split(sizes), shapes, strict=True)]
    return SimulationResult(out, order, lags, [float(g) for g in gaps])


def check_gap_every(gap_every: object) -> None:
    """A one-line :class:`DanaError` unless ``gap_every`` is an integer ≥ 1."""
    if not isinstance(gap_every, int) or isinstance(gap_every, bool) or gap_every < 1:
        raise DanaError(f"gap_every must be an integer >= 1, got {gap_every!r}")


def check_length(scheduler: Scheduler, steps: int) -> None:
    """A one-line error when a replayed order is shorter than the run."""
    if scheduler.length is not None and scheduler.length < steps:
        raise DanaError(
            f"the replayed order holds {scheduler.length} updates but the run needs {steps}: "
            "replay a longer run, or train for fewer steps or epochs"
        )


def check_simulation_args(
    *, workers: int, steps: int = 0, lr: LearningRate = 1.0, batch_size: int = 1
) -> None:
    """One-line :class:`DanaError` for the mistakes :func:`simulate` can see up front."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise DanaError(f"workers must be an integer >= 1, got {workers!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise DanaError(f"steps must be an integer >= 0, got {steps!r}")
    if not callable(lr) and not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise DanaError(f"lr must be a positive number or a callable, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DanaError(f"batch_size must be an integer >= 1, got {batch_size!r}")
