"""The algorithms of the DANA paper as worker/master rule pairs (SPEC "The algorithms").

Notation: η learning rate, γ momentum, g the (weight-decayed) gradient a worker computed,
i the sending worker, N workers. Velocities are in gradient units: the step is η·v.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dana.errors import DanaError
from dana.rules.base import (
    MasterState,
    Rule,
    WorkerState,
    descend,
    nesterov_step,
    zeros_like_flat,
)


class ASGD(Rule):
    """Asynchronous SGD without momentum (paper Algorithms 1–2).

    worker: send ``g``.  master: ``θ ← θ − η g``; reply ``θ``.
    ``momentum`` is accepted and ignored (the paper runs ASGD with γ = 0).
    """

    name = "asgd"

    def master_step(
        self, state: MasterState, message: Tensor, worker: int, lr: float, out: Tensor | None = None
    ) -> Tensor:
        self._count(state, worker)
        return descend(state, message, lr, out)


class NAGASGD(Rule):
    """ASGD with one shared Nesterov momentum at the master.

    worker: send ``g``.  master: ``v ← γv + g;  θ ← θ − η(g + γv)``; reply ``θ``.
    With N = 1 this is exactly ``torch.optim.SGD(momentum=γ, nesterov=True)``.
    """

    name = "nag-asgd"

    def init_master(self, params: Tensor, workers: int) -> MasterState:
        state = super().init_master(params, workers)
        state.velocity = zeros_like_flat(state.params)
        return state

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        self._count(state, worker)
        nesterov_step(state.params, state.velocity, message, self.momentum, lr)
        return state.params


class Baseline(NAGASGD):
    """The single-worker baseline: ``torch.optim.SGD(nesterov=True)`` semantics, N = 1 only."""

    name = "baseline"

    def init_master(self, params: Tensor, workers: int) -> MasterState:
        if workers != 1:
            raise DanaError(
                f"baseline is the single-worker run: use --workers 1 (got {workers}), "
                "or pick an asynchronous algorithm"
            )
        return super().init_master(params, workers)


class MultiASGD(Rule):
    """A Nesterov optimizer per worker, each looking ahead by its own velocity only.

    worker: send ``g``.  master: ``vᵢ ← γvᵢ + g;  θ ← θ − η vᵢ``; reply ``θ − ηγ vᵢ``.

    The paper's Multi-ASGD ablation, "a separate NAG optimizer for each worker", in
    Sutskever's form (SPEC's decision of 2026-12-01). It is :class:`DANAZero` with the
    look-ahead over worker i's velocity instead of all N: the N − 1 other velocities keep
    moving θ after worker i received its parameters, and nothing anticipates them. With
    N = 1 it is NAG (θ̂ is what ``torch.optim.SGD(nesterov=True)`` holds), as DANA-Zero is.
    """

    name = "multi-asgd"

    def init_master(self, params: Tensor, workers: int) -> MasterState:
        state = super().init_master(params, workers)
        state.velocities = zeros_like_flat(state.params, rows=workers)
        state.scratch = zeros_like_flat(state.params)
        return state

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        self._count(state, worker)
        v = state.velocities[worker]
        v.mul_(self.momentum).add_(message)
        state.params.add_(v, alpha=-lr)
        return state.scratch.copy_(state.params).add_(v, alpha=-lr * self.momentum)


class DANAZero(Rule):
    """DANA-Zero (paper Algorithm 3): per-worker momentum at the master, look-ahead reply.

    worker: send ``g``.  master: ``vᵢ ← γvᵢ + g;  θ ← θ − η vᵢ``; reply
    ``θ̂ = θ − ηγ Σⱼ vⱼ``. ``Σⱼ vⱼ`` is a running sum, so a step is O(model), never
    O(N·model). The master holds θ; the gap is measured against θ.
    """

    name = "dana-zero"

    def init_master(self, params: Tensor, workers: int) -> MasterState:
        state = super().init_master(params, workers)
        state.velocities = zeros_like_flat(state.params, rows=workers)
        state.velocity_sum = zeros_like_flat(state.params)
        state.scratch = zeros_like_flat(state.params)
        return state

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        self._count(state, worker)
        v = state.velocities[worker]
        state.velocity_sum.sub_(v)
        v.mul_(self.momentum).add_(message)
        state.velocity_sum.add_(v)
        state.params.add_(v, alpha=-lr)
        return self.lookahead(state, lr)

    def lookahead(self, state: MasterState, lr: float) -> Tensor:
        """``θ̂ = θ − ηγ Σⱼ vⱼ`` into the state's scratch buffer."""
        return state.scratch.copy_(state.params).add_(state.velocity_sum, alpha=-lr * self.momentum)


class DANA(Rule):
    """DANA (paper Algorithm 4): the momentum moves to the worker; the master is plain ASGD.

    worker i: ``vᵢ ← γvᵢ + g``; send ``γvᵢ + g``.  master: ``Θ ← Θ − η·msg``; reply ``Θ``.
    The master holds Θ = θ − ηγ Σⱼ vⱼ (Bengio–Nesterov form, paper Equation 8) and has no
    per-worker state, so it does exactly ASGD's work. For constant η it sends the same
    parameters as :class:`DANAZero` for any N and any order (Equations 8–9).
    """

    name = "dana"
    worker_momentum = True

    def init_worker(self, params: Tensor) -> WorkerState:
        return WorkerState(velocity=zeros_like_flat(params))

    def worker_step(self, state: WorkerState, params: Tensor, grad: Tensor) -> Tensor:
        grad = self._decayed(params, grad)
        state.velocity.mul_(self.momentum).add_(grad)
        # Same arithmetic as torch's nesterov ``g + γ·buf``: N = 1 matches it bit for bit.
        return grad.add_(state.velocity, alpha=self.momentum)

    def master_step(
        self, state: MasterState, message: Tensor, worker: int, lr: float, out: Tensor | None = None
    ) -> Tensor:
        self._count(state, worker)
        return descend(state, message, lr, out)

    def gap_delta(
        self,
        state: MasterState,
        params: Tensor,
        lr: float,
        worker_velocity_sum: Tensor | None,
        *,
        out: Tensor,
    ) -> Tensor:
        # θ = Θ + ηγΣⱼvⱼ, so params − θ = params − Θ − ηγΣⱼvⱼ.
        if worker_velocity_sum is None:
            raise DanaError(f"{self.name}'s θ form needs the sum of the workers' velocities")
        torch.sub(params, state.params, out=out)
        return out.sub_(worker_velocity_sum, alpha=self.lookahead_scale(lr))

    def lookahead_scale(self, lr: float) -> float:
        """Θ = θ − scale·Σⱼ(worker state ``velocity``): ηγ for DANA's velocities."""
        return lr * self.momentum


class SSGD(NAGASGD):
    """Synchronous SGD: wait for all N gradients, average, one NAG step with η·N.

    The learning rate is multiplied by N (the linear scaling rule of Goyal et al.), so
    a schedule written for one worker ramps SSGD from η to η·N during warm-up. The
    reply is ``None`` until the round is complete; then every worker gets ``θ``.
    """

    name = "ssgd"
    synchronous = True

    def init_master(self, params: Tensor, workers: int) -> MasterState:
        state = super().init_master(params, workers)
        state.scratch = zeros_like_flat(state.params)
        return state

    def master_step(
        self, state: MasterState, message: Tensor, worker: int, lr: float
    ) -> Tensor | None:
        self._count(state, worker)
        state.scratch.add_(message)
        state.pending += 1
        if state.pending < state.workers:
            return None
        return self.flush(state, lr)

    def flush(self, state: MasterState, lr: float) -> Tensor | None:
        """Apply the round's average now, even if incomplete (end of training)."""
        # lr·n: the linear scaling rule for the n gradients that did arrive.
        if state.pending == 0:
            return None
        n = state.pending
        mean = state.scratch.div_(n)
        nesterov_step(state.params, state.velocity, mean, self.momentum, lr * n)
        state.scratch.zero_()
        state.pending = 0
        return state.params
