"""Staleness mitigations DANA is compared with (SPEC "Beyond the paper"), as rule pairs.

Notation as in :mod:`dana.rules.algorithms`; ``τ`` is the lag of the message being
applied: the master updates since the master replied to worker i. The master counts it
itself (:attr:`MasterState.replies`, :attr:`MasterState.replied_at`), so it is the lag the
simulator logs and the Ray server measures, with no change to how they call the rules.
``θᵢ`` is what the master last sent to worker i (the gradient was computed there); the
rules that need it keep it in :attr:`MasterState.sent` (O(N·model) memory, as DC-ASGD
does). Unless said otherwise the step after the correction is ``nag-asgd``'s (one shared
velocity), so γ = 0 gives the original momentum-free method.

Every rule here is elementwise on the flat buffer, and τ and the step counts are the same
on every shard (every shard applies every message), so they shard unchanged. The workers
only add weight decay and send ``g`` (``dana-dc`` too: its compensation is at the master).
Work per update is O(model) with at most two temporaries.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from dana.errors import DanaError
from dana.rules.algorithms import ASGD, NAGASGD, DANAZero
from dana.rules.base import MasterState, Rule, nesterov_step, zeros_like_flat


class _Lagged(Rule):
    """A master that counts its replies (τ) and, if :attr:`keeps_sent`, keeps each θᵢ."""

    #: Keep what was last sent to each worker (``(N, P)``, in :attr:`MasterState.sent`).
    keeps_sent = True

    def __init__(self, momentum: float = 0.9, weight_decay: float = 0.0, **options: float):
        super().__init__(momentum, weight_decay, **options)
        for key, value in self.option.items():  # λ, λ₀: a compensation, never a negative one
            if value < 0.0:
                raise DanaError(f"option {key} of {self.name} must be >= 0, got {value}")

    def init_master(self, params: Tensor, workers: int) -> MasterState:
        state = super().init_master(params, workers)
        state.replied_at = [0] * workers  # the initial parameters count as sent before update 1
        if state.scratch is None:
            state.scratch = zeros_like_flat(state.params)
        if self.keeps_sent:
            state.sent = state.params.expand(workers, -1).clone()
        return state

    @staticmethod
    def lag(state: MasterState, worker: int) -> int:
        """τ of the message of ``worker`` being applied: master updates since its reply."""
        return state.replies - state.replied_at[worker]

    @staticmethod
    def _replied(state: MasterState, worker: int, reply: Tensor) -> Tensor:
        state.replies += 1
        state.replied_at[worker] = state.replies
        if state.sent is not None:
            state.sent[worker].copy_(reply)
        return reply

    def _compensated(self, state: MasterState, base: Tensor, g: Tensor, worker: int) -> Tensor:
        """``g + λ·g⊙g⊙(base − sent[i])`` into the scratch buffer (Zheng et al.'s DC term)."""
        d = torch.sub(base, state.sent[worker], out=state.scratch)
        return d.mul_(g).mul_(g).mul_(self.option["lam"]).add_(g)


class DCASGD(_Lagged, NAGASGD):
    """DC-ASGD-c (Zheng et al. 2017, "Asynchronous SGD with delay compensation").

    worker: send ``g``.  master: ``g̃ = g + λ·g⊙g⊙(θ − θᵢ)``, then ``nag-asgd``'s step
    ``v ← γv + g̃;  θ ← θ − η(g̃ + γv)``; reply ``θ``. ``g⊙g`` is the paper's cheap
    diagonal approximation of the Hessian. Option ``lam`` = λ (default 0.04). With λ = 0
    it is ``nag-asgd`` bit for bit; with N = 1 (θ = θᵢ) it is torch's Nesterov SGD.
    """

    name = "dc-asgd"
    options: ClassVar[dict[str, float]] = {"lam": 0.04}

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        self._count(state, worker)
        g = self._compensated(state, state.params, message, worker)
        nesterov_step(state.params, state.velocity, g, self.momentum, lr)
        return self._replied(state, worker, state.params)


class DCASGDAdaptive(_Lagged, NAGASGD):
    """DC-ASGD-a (Zheng et al. 2017): the compensation scaled by a mean square of g.

    master: ``ms ← 0.95·ms + 0.05·g⊙g`` (ms starts at 0); ``λₑ = λ₀ / √(ms + 1e-7)``
    elementwise; ``g̃ = g + λₑ⊙g⊙g⊙(θ − θᵢ)``; ``nag-asgd``'s step; reply ``θ``. ms is
    :attr:`MasterState.exp_avg_sq`. Option ``lam0`` = λ₀ (default 2).
    """

    name = "dc-asgd-a"
    options: ClassVar[dict[str, float]] = {"lam0": 2.0}

    def init_master(self, params: Tensor, workers: int) -> MasterState:
        state = super().init_master(params, workers)
        state.exp_avg_sq = zeros_like_flat(state.params)
        return state

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        self._count(state, worker)
        g, ms = message, state.exp_avg_sq
        ms.mul_(0.95).addcmul_(g, g, value=0.05)
        d = torch.sub(state.params, state.sent[worker], out=state.scratch).mul_(g).mul_(g)
        d.div_(ms.add(1e-7).sqrt_()).mul_(self.option["lam0"]).add_(g)
        nesterov_step(state.params, state.velocity, d, self.momentum, lr)
        return self._replied(state, worker, state.params)


class SAASGD(_Lagged, NAGASGD):
    """Staleness-aware ASGD (Zhang et al. 2016, "Staleness-aware async-SGD").

    master: ``g̃ = g / max(1, τ)``, then ``nag-asgd``'s step; reply ``θ``. Under
    round-robin with N ≥ 2 every gradient after the first N is divided by N − 1.
    """

    name = "sa-asgd"
    keeps_sent = False

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        self._count(state, worker)
        tau = self.lag(state, worker)
        g = torch.div(message, tau, out=state.scratch) if tau > 1 else message
        nesterov_step(state.params, state.velocity, g, self.momentum, lr)
        return self._replied(state, worker, state.params)


class GapAware(_Lagged, NAGASGD):
    """Gap-aware damping (after Barkai et al. 2019, "Gap-aware mitigation of gradient
    staleness"): the gradient shrinks with the gap, in units of a typical step.

    master, at update t (t steps done so far):
    ``C = η·(√ŝ + 1e-8)`` with ``ŝ = s / (1 − 0.999ᵗ)`` (``C = ∞``, no penalty, at t = 0);
    ``g̃ = g / (1 + |θ − θᵢ| / C)`` elementwise; ``nag-asgd``'s step; then
    ``s ← 0.999·s + 0.001·v⊙v`` with the new v (s starts at 0, in
    :attr:`MasterState.exp_avg_sq`; t in :attr:`MasterState.steps`); reply ``θ``.
    """

    name = "gap-aware"

    def init_master(self, params: Tensor, workers: int) -> MasterState:
        state = super().init_master(params, workers)
        state.exp_avg_sq = zeros_like_flat(state.params)
        return state

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        self._count(state, worker)
        g, s, t = message, state.exp_avg_sq, state.steps
        if t > 0:
            c = torch.div(s, 1.0 - 0.999**t).sqrt_().add_(1e-8).mul_(lr)
            d = torch.sub(state.params, state.sent[worker], out=state.scratch).abs_()
            d.div_(c).add_(1.0)
            g = torch.div(message, d, out=state.scratch)
        nesterov_step(state.params, state.velocity, g, self.momentum, lr)
        s.mul_(0.999).addcmul_(state.velocity, state.velocity, value=0.001)
        state.steps += 1
        return self._replied(state, worker, state.params)


class DelayAdaptive(_Lagged, ASGD):
    """Delay-adaptive ASGD (after Mishchenko et al. 2022, "Asynchronous SGD beats
    minibatch SGD under arbitrary delays"): momentum-free, the step shrinks past N.

    master: ``θ ← θ − η·min(1, N/τ)·g`` (factor 1 at τ = 0); reply ``θ``. ``momentum`` is
    accepted and ignored, as for ``asgd``. With N = 1 (τ = 0) it is plain SGD.
    """

    name = "delay-adaptive"
    keeps_sent = False

    def init_master(self, params: Tensor, workers: int) -> MasterState:
        state = super().init_master(params, workers)
        state.scratch = None  # no buffer needed
        return state

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        self._count(state, worker)
        tau = self.lag(state, worker)
        factor = state.workers / tau if tau > state.workers else 1.0
        state.params.add_(message, alpha=-lr * factor)
        return self._replied(state, worker, state.params)


class DANADC(_Lagged, DANAZero):
    """DANA-DC: DANA-Zero with a delay-compensated gradient (the paper's suggested
    combination with DC-ASGD).

    master: ``θ̂ = θ − ηγΣⱼvⱼ`` (before the update); ``g̃ = g + λ·g⊙g⊙(θ̂ − θ̂ᵢ)`` with θ̂ᵢ
    the look-ahead last sent to i; then DANA-Zero's ``vᵢ ← γvᵢ + g̃;  θ ← θ − ηvᵢ``; reply
    ``θ − ηγΣⱼvⱼ``. DANA's look-ahead shrinks the gap; the compensation corrects what is
    left. Option ``lam`` = λ (default 0.04). With λ = 0 it is ``dana-zero`` bit for bit.
    """

    name = "dana-dc"
    options: ClassVar[dict[str, float]] = {"lam": 0.04}

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        g = self._compensated(state, self.lookahead(state, lr), message, worker)
        # DANA-Zero's step consumes g (the scratch buffer) before it writes its reply there.
        return self._replied(state, worker, super().master_step(state, g, worker, lr))
