"""The gradients of N workers of one model, each with its own BatchNorm statistics.

:class:`WorkerGradients` gives the simulator its two gradient functions on flat buffers:
:meth:`~WorkerGradients.one` (one worker, ``loss.backward()`` in the model: the sequential
path) and :meth:`~WorkerGradients.__call__` (a wave of workers in one batched computation,
:data:`dana.simulation.wave.BatchedGradFn`), both with ``loss_fn(model, batch)`` on the
batch of each gradient's number.

The batched computation is ``vmap(grad(f))`` over the stacked parameters, the stacked
per-worker buffers and the stacked batches, with ``f`` a ``functional_call`` of the loss.
BatchNorm updates its running statistics in place; vmap allows that on buffers that are
themselves batched, so each worker's statistics are gathered into a stacked copy, updated
there by the worker's own forward pass, and scattered back: exactly what the sequential
path does worker by worker. A model that vmap cannot batch (``.item()`` or data-dependent
control flow in ``forward``, dropout) is detected on the first wave: a one-line notice,
then the wave's gradients are computed one worker at a time, with the same result.

:func:`gradients_of_runs` does the same for one wave of each of several independent runs of
one model (:func:`dana.simulation.wave.step_waves`): their rows share one vmap call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as pytree

from dana.errors import DanaError
from dana.simulation.wave import MultiBatchedGradFn
from dana.training.flat import FlatModel

#: ``loss_fn(model, batch) -> Tensor``, a scalar (the mean over the batch).
LossFn = Callable[[nn.Module, Any], Tensor]
#: ``batch_fn(k)``: the batch of gradient number ``k`` (a pytree of tensors, batch-first).
BatchFn = Callable[[int], Any]


class _Loss(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` can swap its tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def stack_rows(tensors: Sequence[Tensor], rows: int) -> list[Tensor]:
    """Each tensor repeated ``rows`` times along a new first dim (detached copies)."""
    return [t.detach().unsqueeze(0).repeat(rows, *[1] * t.dim()) for t in tensors]


def stack_batches(batches: list[Any]) -> Any:
    """One pytree whose leaves are the batches' leaves stacked along a new first dim."""
    leaves, spec = zip(*(pytree.tree_flatten(b) for b in batches), strict=True)
    return pytree.tree_unflatten(
        [torch.stack(column) for column in zip(*leaves, strict=True)], spec[0]
    )


class WorkerGradients:
    """Gradients of ``workers`` workers of ``flat.model``; the workers' buffers live here.

    Args:
        flat: the model as a :class:`FlatModel` (its flat order is the simulator's).
        loss_fn: ``loss_fn(model, batch)``, a scalar loss; may use only the model's forward.
        workers: N; every worker starts with the model's current buffers.
        batch_fn: the batch of gradient number ``k`` (the k-th of the shared stream).
        batched: try the batched computation (``False``: always one worker at a time).
        buffers: the workers' buffers to use (and update in place), per model buffer a
            ``(N, *shape)`` tensor; default: N copies of the model's.

    Attributes:
        buffers: per model buffer, a ``(N, *shape)`` tensor: row i is worker i's.
        losses: the losses of the last call, one per gradient, detached.
        batched: whether waves are still computed batched (``False`` after a fallback).
    """

    def __init__(
        self,
        flat: FlatModel,
        loss_fn: LossFn,
        workers: int,
        batch_fn: BatchFn,
        *,
        batched: bool = True,
        buffers: list[Tensor] | None = None,
    ) -> None:
        self.flat = flat
        self.loss_fn = loss_fn
        self.batch_fn = batch_fn
        self.batched = batched
        self.buffers = stack_rows(flat.buffers, workers) if buffers is None else buffers
        self.losses = torch.empty(0)
        model = flat.model
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in trainable]
        self._names = [n for n, _ in named]
        self._shapes = [p.shape for _, p in named]
        self._buffer_names = [n for n, _ in model.named_buffers()]
        self._loss_module = _Loss(model, loss_fn)
        self._vmapped = vmap(grad(self._loss_at, has_aux=True))

    # -- one worker: the sequential path ----------------------------------------------
    def one(self, params: Tensor, worker: int, index: int) -> Tensor:
        """Worker ``worker``'s gradient at ``params`` on batch ``index``: ``flat.grad``
        (overwritten by the next call). Updates the worker's buffers."""
        flat = self.flat
        flat.load(params)
        if flat.buffers:
            torch._foreach_copy_(flat.buffers, [b[worker] for b in self.buffers])
        flat.zero_grad()
        loss = self.loss_fn(flat.model, self.batch_fn(index))
        loss.backward()
        if flat.buffers:
            torch._foreach_copy_([b[worker] for b in self.buffers], flat.buffers)
        self.losses = loss.detach().reshape(1)
        return flat.grad

    # -- a wave ------------------------------------------------------------------------
    def __call__(self, stacked: Tensor, workers: list[int], indices: list[int]) -> Tensor:
        """The gradients of ``workers`` at the rows of ``stacked`` on batches ``indices``
        (:data:`dana.simulation.wave.BatchedGradFn`); their losses go to :attr:`losses`."""
        if len(workers) == 1:  # nothing to batch: the sequential path, as exact and cheaper
            return self.one(stacked[0], workers[0], indices[0]).unsqueeze(0)
        if self.batched:
            batch = stack_batches([self.batch_fn(k) for k in indices])
            try:
                return self._wave(stacked, workers, batch)
            except DanaError:  # the user's loss refused its input: batched or not
                raise
            except torch.OutOfMemoryError:  # too many rows at once: halves, still batched
                del batch
                return self._in_halves(stacked, workers, indices)
            except Exception as error:  # a real bug fails again on the sequential path
                self._fall_back(error)
        out = torch.empty_like(stacked)
        losses = []
        for row, (worker, index) in enumerate(zip(workers, indices, strict=True)):
            out[row].copy_(self.one(stacked[row], worker, index))
            losses.append(self.losses)
        self.losses = torch.cat(losses)
        return out

    def _in_halves(self, stacked: Tensor, workers: list[int], indices: list[int]) -> Tensor:
        """The wave as two waves (each halved again while the device runs out of memory):
        the same gradients and statistics, rows in the same order."""
        half = len(workers) // 2
        first = self(stacked[:half], workers[:half], indices[:half])
        first_losses = self.losses
        second = self(stacked[half:], workers[half:], indices[half:])
        self.losses = torch.cat([first_losses, self.losses])
        return torch.cat([first, second])

    def _fall_back(self, error: Exception) -> None:
        """From now on one worker at a time, with a one-line notice (once)."""
        if self.batched:
            self.batched = False
            first_line = (str(error).strip().splitlines() or [""])[0][:120]
            cause = f"{type(error).__name__}: {first_line}"
            print(
                f"dana: note: torch.func.vmap cannot batch this model ({cause}); "
                "computing gradients one worker at a time",
                file=sys.stderr,
            )

    def _wave(self, stacked: Tensor, workers: list[int], batch: Any) -> Tensor:
        rows = torch.tensor(workers, dtype=torch.long, device=stacked.device)
        # A copy: updated in place by BatchNorm, kept only if the whole wave succeeds.
        buffers = [b.index_select(0, rows) for b in self.buffers]
        grads, losses = self._vmapped(stacked, buffers, batch)
        for b, new in zip(self.buffers, buffers, strict=True):
            b.index_copy_(0, rows, new)
        self.losses = losses
        return grads

    def _loss_at(self, params: Tensor, buffers: list[Tensor], batch: Any) -> tuple[Tensor, Tensor]:
        """The loss at one worker's flat ``params`` and ``buffers`` (under vmap and grad)."""
        tensors = {
            f"model.{name}": value.view(shape)
            for name, value, shape in zip(
                self._names, params.split(self.flat.sizes), self._shapes, strict=True
            )
        }
        tensors |= {f"model.{n}": b for n, b in zip(self._buffer_names, buffers, strict=True)}
        loss = functional_call(self._loss_module, tensors, (batch,))
        return loss, loss.detach()

    # -- the master's statistics and checkpoints ----------------------------------------
    def load_buffers(self, worker: int) -> None:
        """Put worker ``worker``'s buffers into the model (the master's, last writer wins)."""
        if self.flat.buffers:
            torch._foreach_copy_(self.flat.buffers, [b[worker] for b in self.buffers])

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": self.buffers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy ``state``'s buffers in (in place: a store shared with others stays shared)."""
        for own, saved in zip(self.buffers, state["buffers"], strict=True):
            own.copy_(saved)


def gradients_of_runs(runs: Sequence[WorkerGradients]) -> MultiBatchedGradFn:
    """One gradient function for a wave of each of several runs of one model and loss.

    For :func:`dana.simulation.wave.step_waves`. Each run keeps its own buffers and data;
    all rows go through one vmap call (the first run's module, with every tensor swapped).
    When vmap fails, or only one gradient is due, each run computes its own.

    Raises:
        ValueError: the runs differ in parameters, buffers or loss function.
    """
    first = runs[0]
    for run in runs[1:]:
        same = (run._names, run._shapes, run._buffer_names) == (
            first._names,
            first._shapes,
            first._buffer_names,
        )
        if not same or run.loss_fn != first.loss_fn:
            raise ValueError("runs batched together need one architecture and one loss_fn")

    def grad_fn(
        stacked: list[Tensor], waves: list[list[int]], indices: list[list[int]]
    ) -> list[Tensor]:
        live = [r for r, wave in enumerate(waves) if wave]
        if sum(len(waves[r]) for r in live) > 1 and all(runs[r].batched for r in live):
            batch = stack_batches([runs[r].batch_fn(k) for r in live for k in indices[r]])
            try:
                grads = _many([runs[r] for r in live], [stacked[r] for r in live],
                              [waves[r] for r in live], batch)  # fmt: skip
            except DanaError:
                raise
            except torch.OutOfMemoryError:  # too much at once: each run's wave on its own
                del batch
            except Exception as error:  # a real bug fails again on the sequential path
                runs[0]._fall_back(error)  # one notice
                for run in runs:
                    run.batched = False
            else:
                out = [s[:0] for s in stacked]
                for r, g in zip(live, grads, strict=True):
                    out[r] = g
                return out
        out = []
        for run, rows, wave, index in zip(runs, stacked, waves, indices, strict=True):
            grads = run(rows, wave, index) if wave else rows[:0]
            # A wave of one returns the model's gradient buffer: copy it, runs may share models.
            out.append(grads.clone() if len(wave) == 1 else grads)
        return out

    return grad_fn


def _many(
    runs: list[WorkerGradients], stacked: list[Tensor], waves: list[list[int]], batch: Any
) -> list[Tensor]:
    """The waves of ``runs`` in one vmap call; buffers scattered back only on success."""
    rows = [
        torch.tensor(wave, dtype=torch.long, device=s.device)
        for wave, s in zip(waves, stacked, strict=True)
    ]
    buffers = [
        torch.cat([run.buffers[i].index_select(0, r) for run, r in zip(runs, rows, strict=True)])
        for i in range(len(runs[0].buffers))
    ]
    grads, losses = runs[0]._vmapped(torch.cat(stacked), buffers, batch)
    counts = [len(wave) for wave in waves]
    parts = [b.split(counts) for b in buffers]
    for j, (run, r) in enumerate(zip(runs, rows, strict=True)):
        for own, part in zip(run.buffers, parts, strict=True):
            own.index_copy_(0, r, part[j])
    for run, loss in zip(runs, losses.split(counts), strict=True):
        run.losses = loss
    return list(grads.split(counts))


def use_waves(device: str | torch.device) -> bool:
    """Whether to run in waves by default on ``device``: not on a CPU, where the batched
    kernels measured slower than one worker at a time (docs/performance.md); elsewhere
    yes (unmeasured)."""
    return torch.device(device).type != "cpu"
