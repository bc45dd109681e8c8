"""Wave execution: every gradient that is already determined, computed in one call.

The schedule never depends on the gradients, so the workers of the next updates can be
drawn ahead (:meth:`Simulation.peek`). A worker's gradient depends only on the parameters
it holds and its batch, and what it holds changes only when the master replies to it. So
in a run of upcoming updates in which no worker appears twice, every worker still holds,
when its update comes, what it held at the start of the run: all their gradients can be
computed together, at the start, and then applied one by one in the schedule's order with
the sequential arithmetic. That run is a *wave*. A synchronous rule (``ssgd``) replies to
every worker when a round completes, so its waves also end with the round.

Exact: the order, lags, gaps, learning rates, batches and the rule arithmetic are those
of :meth:`Simulation.step`; only the gradient kernels differ (batched), by float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dana.simulation.simulator import LearningRate, Simulation, Update

#: ``grad_fn(stacked_params, workers, update_indices) -> stacked_grads``, both ``(W, P)``:
#: row i is the gradient of worker ``workers[i]`` at row i of ``stacked_params`` on the data
#: of gradient number ``update_indices[i]`` (counted from 0 over the whole run).
BatchedGradFn = Callable[[Tensor, list[int], list[int]], Tensor]


class WaveSimulation(Simulation):
    """:class:`Simulation` plus :meth:`step_wave`; the two kinds of step can be mixed.

    Same arguments, state and checkpoints as :class:`Simulation`: a state saved from either
    resumes in the other with the same result (the workers drawn ahead are part of it).
    """

    def next_wave(self, limit: int) -> list[int]:
        """The workers of the next wave, at most ``limit`` of them (nothing is consumed).

        The longest run of upcoming updates with no worker twice and, for a synchronous
        rule, none past the end of the current round. At most one worker beyond the wave
        is drawn ahead (the one that ends it).
        """
        if self.rule.synchronous:
            limit = min(limit, self.workers - self.master.pending)
        wave: list[int] = []
        while len(wave) < limit:
            worker = self.peek(len(wave) + 1)[-1]
            if worker in wave:
                break
            wave.append(worker)
        return wave

    def step_wave(self, grad_fn: BatchedGradFn, lr: LearningRate, limit: int) -> list[Update]:
        """Compute the next wave's gradients in one call of ``grad_fn`` and apply them.

        Args:
            grad_fn: see :data:`BatchedGradFn`; it must not modify the parameters it gets.
            lr: a float, or ``lr(gradients_done) -> float`` as in :func:`dana.simulate`,
                evaluated for each update as the sequential loop does.
            limit: at most this many gradients (≥ 1), e.g. what is left of an epoch.

        Returns:
            One :class:`Update` per gradient, in the order the master applied them.
        """
        workers = self.next_wave(limit)
        if not workers:
            return []
        stacked = self.held_by(workers)
        grads = grad_fn(stacked, workers, self.indices(workers))
        return self.apply_wave(workers, grads, lr)

    def held_by(self, workers: list[int]) -> Tensor:
        """The parameters ``workers`` hold, stacked ``(W, P)``; grad functions only read it."""
        if workers == list(range(self.workers)):
            return self.held  # round-robin's waves: no gather
        return self.held.index_select(
            0, torch.tensor(workers, dtype=torch.long, device=self.held.device)
        )

    def indices(self, workers: list[int]) -> list[int]:
        """The numbers of the wave's gradients, counted from 0 over the run."""
        return list(range(self.gradients, self.gradients + len(workers)))

    def apply_wave(self, workers: list[int], grads: Tensor, lr: LearningRate) -> list[Update]:
        """Apply the gradients of the wave ``workers`` (from :meth:`next_wave`) in order."""
        if grads.shape != (len(workers), self.held.shape[1]):
            raise ValueError(
                f"grad_fn returned shape {tuple(grads.shape)} for {len(workers)} workers"
            )
        rate = lr if callable(lr) else (lambda _: lr)
        updates = []
        for worker, grad in zip(workers, grads, strict=True):
            self.next_worker()  # consume the draw
            updates.append(self.apply(worker, grad, float(rate(self.gradients))))
        return updates


#: ``grad_fn(stacked, workers, indices)`` for several runs at once: one list entry per run,
#: each as in :data:`BatchedGradFn`; returns one ``(Wᵣ, P)`` tensor per run.
MultiBatchedGradFn = Callable[[list[Tensor], list[list[int]], list[list[int]]], list[Tensor]]


def step_waves(
    sims: Sequence[WaveSimulation],
    grad_fn: MultiBatchedGradFn,
    lrs: Sequence[LearningRate],
    limits: Sequence[int],
) -> list[list[Update]]:
    """The next wave of each of several independent runs, all gradients in one call.

    Each run keeps its own rule state, scheduler, data and learning rates; only the
    gradient computation is shared. Run r's updates are exactly those of
    ``sims[r].step_wave(..., lrs[r], limits[r])`` (up to the batched kernels' rounding).
    """
    waves = [sim.next_wave(limit) for sim, limit in zip(sims, limits, strict=True)]
    stacked = [sim.held_by(wave) for sim, wave in zip(sims, waves, strict=True)]
    indices = [sim.indices(wave) for sim, wave in zip(sims, waves, strict=True)]
    grads = grad_fn(stacked, waves, indices)
    return [
        sim.apply_wave(wave, g, lr) if wave else []
        for sim, wave, g, lr in zip(sims, waves, grads, lrs, strict=True)
    ]
