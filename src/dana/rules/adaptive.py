"""Adam-family rules: a shared Adam or NAdam at the master, and DANA for NAdam.

Notation: β₁ is ``momentum`` (the config's γ, 0.9 by default as Adam's), β₂, ε and NAdam's
momentum decay ψ are options (``beta2``, ``eps``, ``momentum_decay``; torch's defaults
0.999, 1e-8, 4e-3). ``t`` counts the optimizer's steps. NAdam's momentum schedule
(Dozat 2016, as ``torch.optim.NAdam``): ``μₜ = β₁(1 − ½·0.96^(tψ))``, ``Πₜ = μ₁⋯μₜ``.
The derivation of ``dana-nadam`` is in docs/design.md ("DANA for NAdam").

All three are elementwise on the flat buffer (the bias corrections are scalars of the
step count, the same on every shard), so they shard unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dana.errors import DanaError
from dana.rules.algorithms import DANA
from dana.rules.base import MasterState, Rule, WorkerState, zeros_like_flat

_ADAM_OPTIONS = {"beta2": 0.999, "eps": 1e-8}
_NADAM_OPTIONS = {**_ADAM_OPTIONS, "momentum_decay": 4e-3}


def nadam_mu(beta1: float, momentum_decay: float, t: int) -> tuple[float, float]:
    """``(μₜ, μₜ₊₁)`` of NAdam's momentum schedule, with torch's arithmetic."""
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * momentum_decay)))
    return mu, mu_next


class _AdamOptions(Rule):
    def __init__(self, momentum: float = 0.9, weight_decay: float = 0.0, **options: float):
        super().__init__(momentum, weight_decay, **options)
        o = self.option
        if not 0.0 <= o["beta2"] < 1.0:
            raise DanaError(f"option beta2 of {self.name} must be in [0, 1), got {o['beta2']}")
        if not o["eps"] > 0.0:
            raise DanaError(f"option eps of {self.name} must be > 0, got {o['eps']}")
        if o.get("momentum_decay", 0.0) < 0.0:
            raise DanaError(f"option momentum_decay of {self.name} must be >= 0")


class AdamASGD(_AdamOptions):
    """One shared Adam at the master (Kingma & Ba 2015), ``nag-asgd``-style.

    worker: send ``g``.  master: ``t ← t + 1;  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
    θ ← θ − η/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)``; reply ``θ``. m is
    :attr:`MasterState.velocity`, v :attr:`MasterState.exp_avg_sq`. With N = 1 this is
    ``torch.optim.Adam(betas=(γ, β₂), eps=ε)`` (L2 weight decay, as torch's).
    """

    name = "adam-asgd"
    options = _ADAM_OPTIONS

    def init_master(self, params: Tensor, workers: int) -> MasterState:
        state = super().init_master(params, workers)
        state.velocity = zeros_like_flat(state.params)
        state.exp_avg_sq = zeros_like_flat(state.params)
        return state

    def _moments(self, state: MasterState, g: Tensor) -> int:
        state.steps += 1
        beta2 = self.option["beta2"]
        state.velocity.lerp_(g, 1.0 - self.momentum)
        state.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        return state.steps

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        self._count(state, worker)
        t = self._moments(state, message)
        correction2 = math.sqrt(1.0 - self.option["beta2"] ** t)
        denom = state.exp_avg_sq.sqrt().div_(correction2).add_(self.option["eps"])
        state.params.addcdiv_(state.velocity, denom, value=-lr / (1.0 - self.momentum**t))
        return state.params


class NAdamASGD(AdamASGD):
    """One shared NAdam at the master: ``dana-nadam``'s ``nag-asgd``-style counterpart.

    master: the moments as :class:`AdamASGD`, ``Πₜ = Πₜ₋₁μₜ``, ``d = √(v/(1−β₂ᵗ)) + ε``;
    ``θ ← θ − η(1−μₜ)/(1−Πₜ) · g/d − ημₜ₊₁/(1−Πₜμₜ₊₁) · m/d``; reply ``θ``. With N = 1 this
    is ``torch.optim.NAdam(betas=(γ, β₂), eps=ε, momentum_decay=ψ)``.
    """

    name = "nadam-asgd"
    options = _NADAM_OPTIONS

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        self._count(state, worker)
        t = self._moments(state, message)
        mu, mu_next = nadam_mu(self.momentum, self.option["momentum_decay"], t)
        state.mu_product *= mu
        denom = state.exp_avg_sq.div(1.0 - self.option["beta2"] ** t)
        denom.sqrt_().add_(self.option["eps"])
        state.params.addcdiv_(message, denom, value=-lr * (1.0 - mu) / (1.0 - state.mu_product))
        state.params.addcdiv_(
            state.velocity, denom, value=-lr * mu_next / (1.0 - state.mu_product * mu_next)
        )
        return state.params


class DANANAdam(_AdamOptions, DANA):
    """DANA for NAdam: each worker runs NAdam on its own gradients and sends its step; the
    master is plain ASGD (DANA's Algorithm 4 with NAdam in place of Nesterov SGD).

    worker i (its own t, m, v, Π, weight decay added first):
    ``d = √(v/(1−β₂ᵗ)) + ε;  Lᵢ = μₜ₊₁/(1−Πₜμₜ₊₁) · m/d``; send
    ``(1−μₜ)/(1−Πₜ) · g/d + Lᵢ``.  master: ``Θ ← Θ − η·msg``; reply ``Θ``.

    Lᵢ is worker i's look-ahead: the part of its next step its momentum already commits
    to. Every message adds its sender's look-ahead to Θ, so Θ = θ − η Σⱼ Lⱼ (θ the
    parameters without look-ahead), as DANA's Θ = θ − ηγΣⱼvⱼ: each worker computes its
    gradient where all N workers' momenta are about to take the master. The master does
    ASGD's work and keeps no per-worker state. With N = 1 the parameters are exactly
    ``torch.optim.NAdam``'s. ``WorkerState.velocity`` holds Lᵢ (the simulator sums it for
    the gap's θ form), ``exp_avg``/``exp_avg_sq`` the moments.
    """

    name = "dana-nadam"
    options = _NADAM_OPTIONS

    def init_worker(self, params: Tensor) -> WorkerState:
        zeros = zeros_like_flat
        return WorkerState(velocity=zeros(params), exp_avg=zeros(params), exp_avg_sq=zeros(params))

    def worker_step(self, state: WorkerState, params: Tensor, grad: Tensor) -> Tensor:
        g = self._decayed(params, grad)
        beta2 = self.option["beta2"]
        state.steps += 1
        t = state.steps
        mu, mu_next = nadam_mu(self.momentum, self.option["momentum_decay"], t)
        state.mu_product *= mu
        state.exp_avg.lerp_(g, 1.0 - self.momentum)
        state.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = state.exp_avg_sq.div(1.0 - beta2**t).sqrt_().add_(self.option["eps"])
        lookahead = torch.div(state.exp_avg, denom, out=state.velocity)
        lookahead.mul_(mu_next / (1.0 - state.mu_product * mu_next))
        return g.div_(denom).mul_((1.0 - mu) / (1.0 - state.mu_product)).add_(lookahead)

    def lookahead_scale(self, lr: float) -> float:
        # θ = Θ + ηΣⱼLⱼ: the look-aheads Lⱼ already hold the momentum factor.
        return lr
