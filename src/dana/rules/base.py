"""The contract every algorithm follows: a worker rule and a master rule with explicit state.

An algorithm is split the way a parameter server splits it. A *worker* holds the
parameters it last received, computes a gradient there and turns it into a message with
:meth:`Rule.worker_step`. The *master* applies messages with :meth:`Rule.master_step` and
answers the sending worker with the parameters it should use next.

All tensors are *flat*: one contiguous 1-D buffer holding every parameter of the model
(per-layer views are the caller's business). States are plain dataclasses of tensors, so
they pickle, move between processes and checkpoint with ``torch.save``. Steps update
their state in place (O(model) work; at most one temporary, as torch.optim's Nesterov
step has) and return the tensor to send; a returned tensor may alias the state, so a
caller copies it before the next step if it must keep it.

Nothing here knows whether it runs in the simulator or in a distributed runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from dana.errors import DanaError


@dataclass
class WorkerState:
    """What a worker keeps between its updates (only rules with worker-side state).

    Attributes:
        velocity: ``dana``'s vᵢ; for ``dana-nadam`` the look-ahead direction Lᵢ (the
            master's Θ is θ − η Σⱼ Lⱼ).
        exp_avg, exp_avg_sq, steps, mu_product: ``dana-nadam``'s NAdam state (first and
            second moments, step count, product of the momentum schedule μ).
    """

    velocity: Tensor | None = None
    exp_avg: Tensor | None = None
    exp_avg_sq: Tensor | None = None
    steps: int = 0
    mu_product: float = 1.0


@dataclass
class MasterState:
    """What the master keeps.

    Attributes:
        params: the parameters the master holds (θ, or Θ for ``dana``).
        velocity: one shared velocity (``nag-asgd``, ``ssgd`` and the rules taking its
            step); the first moment m of ``adam-asgd``, ``nadam-asgd``.
        velocities: one velocity per worker, shape ``(N, P)`` (``multi-asgd``,
            ``dana-zero``).
        velocity_sum: running ``Σⱼ vⱼ`` (``dana-zero``), so the reply costs O(model).
        scratch: a reply or accumulation buffer owned by the state.
        pending: gradients accumulated in the current synchronous round (``ssgd``).
        applied: number of messages applied, per worker (a count, for bookkeeping).
        replies: replies the master made (its update count; the rules that need the lag
            τ count it, see :mod:`dana.rules.mitigations`).
        replied_at: per worker, ``replies`` when the master last replied to it, so that
            τ = ``replies − replied_at[i]``, the simulator's and the server's lag.
        sent: ``(N, P)``, what the master last sent to each worker (θᵢ, or θ̂ᵢ).
        exp_avg_sq: an elementwise average of squares (``dc-asgd-a``'s mean square of g,
            ``gap-aware``'s of v, Adam's second moment).
        steps: steps the master took (bias corrections).
        mu_product: ``nadam-asgd``'s product of its momentum schedule.
    """

    params: Tensor
    workers: int
    velocity: Tensor | None = None
    velocities: Tensor | None = None
    velocity_sum: Tensor | None = None
    scratch: Tensor | None = None
    pending: int = 0
    applied: list[int] = field(default_factory=list)
    replies: int = 0
    replied_at: list[int] = field(default_factory=list)
    sent: Tensor | None = None
    exp_avg_sq: Tensor | None = None
    steps: int = 0
    mu_product: float = 1.0


class Rule:
    """Base class of the algorithms. Subclasses override the two steps.

    Args:
        momentum: γ in [0, 1).
        weight_decay: λ ≥ 0, added to the gradient on the worker (``g ← g + λ·params``)
            before anything else, as ``torch.optim.SGD`` does.
        **options: the rule's extra hyperparameters (:attr:`options` names them and
            holds their defaults); an unknown one is a :class:`DanaError`.
    """

    name: str = ""
    #: The rule's extra hyperparameters and their defaults (numbers).
    options: ClassVar[dict[str, float]] = {}
    #: ``True`` when the master waits for every worker before it steps (``ssgd``).
    synchronous: bool = False
    #: ``True`` when the momentum lives on the workers (``dana``): the master's θ-form
    #: then needs the workers' velocities, see :meth:`theta`.
    worker_momentum: bool = False

    def __init__(self, momentum: float = 0.9, weight_decay: float = 0.0, **options: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise DanaError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise DanaError(f"weight decay must be >= 0, got {weight_decay}")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        #: The extra hyperparameters, defaults filled in.
        self.option = {**self.options, **check_options(self.name, type(self).options, options)}

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.option.items())
        return (
            f"{type(self).__name__}(momentum={self.momentum}, "
            f"weight_decay={self.weight_decay}{extra})"
        )

    # -- worker -------------------------------------------------------------------------
    def init_worker(self, params: Tensor) -> WorkerState:
        """State of a fresh worker that holds ``params`` (not kept)."""
        return WorkerState()

    def worker_step(self, state: WorkerState, params: Tensor, grad: Tensor) -> Tensor:
        """Turn the gradient computed at ``params`` into the message for the master.

        ``grad`` is overwritten (weight decay is added in place); the returned message
        may be ``grad`` itself or alias the worker state.
        """
        return self._decayed(params, grad)

    # -- master -------------------------------------------------------------------------
    def init_master(self, params: Tensor, workers: int) -> MasterState:
        """State of a master that starts from a copy of ``params`` for ``workers`` workers."""
        if workers < 1:
            raise DanaError(f"workers must be >= 1, got {workers}")
        return MasterState(params=params.detach().clone(), workers=workers, applied=[0] * workers)

    def master_step(self, state: MasterState, message: Tensor, worker: int, lr: float) -> Tensor:
        """Apply ``message`` from ``worker`` with learning rate ``lr``; return the reply.

        The reply is what ``worker`` (only) computes its next gradient at. For a
        synchronous rule it is ``None`` until the round is complete, and then goes to
        every worker.

        A rule whose reply is its new θ may also accept a keyword ``out``: a free buffer
        shaped like θ. The new θ is then written there (same arithmetic, out of place) and
        becomes ``state.params``, leaving the old buffer as it was. A parameter server
        uses it to write θ straight into the memory it publishes replies from, instead of
        stepping in place and copying (:class:`dana.runtime.server.ShardServer`).
        """
        raise NotImplementedError

    def flush(self, state: MasterState, lr: float) -> Tensor | None:
        """Apply what the master still holds back at the end of training (``ssgd``'s
        incomplete last round); the reply then goes to every worker. ``None``: nothing."""
        return None

    def params(self, state: MasterState) -> Tensor:
        """The parameters the master holds: what is evaluated and checkpointed."""
        return state.params

    def gap_delta(
        self,
        state: MasterState,
        params: Tensor,
        lr: float,
        worker_velocity_sum: Tensor | None,
        *,
        out: Tensor,
    ) -> Tensor:
        """``Δθ = params − θ`` into ``out``: a worker's parameters minus the master's θ form.

        θ form: the plain parameters, before any look-ahead. For ``dana`` the master holds
        Θ = θ − ηγΣⱼvⱼ with the velocities on the workers, so the caller passes their sum;
        other rules ignore it.
        """
        return torch.sub(params, state.params, out=out)

    # -- shared helpers -----------------------------------------------------------------
    def _decayed(self, params: Tensor, grad: Tensor) -> Tensor:
        if self.weight_decay:
            grad.add_(params, alpha=self.weight_decay)
        return grad

    def _count(self, state: MasterState, worker: int) -> None:
        if not 0 <= worker < state.workers:
            raise DanaError(f"worker {worker} is out of range for {state.workers} workers")
        state.applied[worker] += 1


def check_options(
    algorithm: str, valid: dict[str, float], options: dict[str, object]
) -> dict[str, float]:
    """``options`` as floats; a one-line :class:`DanaError` naming the valid ones if a name
    is unknown or a value is not a finite number."""
    for key, value in options.items():
        if key not in valid:
            names = f"its options are {', '.join(valid)}" if valid else "it takes none"
            raise DanaError(f"unknown option {key!r} for {algorithm or 'this rule'}: {names}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise DanaError(f"option {key} of {algorithm} must be a finite number, got {value!r}")
    return {key: float(value) for key, value in options.items()}


def nesterov_step(
    params: Tensor, velocity: Tensor, grad: Tensor, momentum: float, lr: float
) -> None:
    """One ``torch.optim.SGD(nesterov=True)`` step, in place, with the same arithmetic.

    ``v ← γv + g;  θ ← θ − η(g + γv)``. Kept in one place so every NAG-based rule rounds
    exactly as torch does.
    """
    velocity.mul_(momentum).add_(grad)
    params.add_(grad.add(velocity, alpha=momentum), alpha=-lr)


def descend(state: MasterState, message: Tensor, lr: float, out: Tensor | None = None) -> Tensor:
    """``θ ← θ − η·message``, in place, or into ``out`` which then becomes θ (see
    :meth:`Rule.master_step`); return θ."""
    if out is None:
        return state.params.add_(message, alpha=-lr)
    state.params = torch.add(state.params, message, alpha=-lr, out=out)
    return state.params


def zeros_like_flat(params: Tensor, rows: int | None = None) -> Tensor:
    """Zeros with the dtype and device of ``params``: ``(P,)`` or ``(rows, P)``."""
    shape = params.shape if rows is None else (rows, *params.shape)
    return torch.zeros(shape, dtype=params.dtype, device=params.device)
