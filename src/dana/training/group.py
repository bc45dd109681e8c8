"""Several independent runs of one model trained together: one gradient call for all.

Each :class:`~dana.training.Trainer` keeps everything that makes its run its own (rule
state, scheduler, data stream, learning-rate schedule, workers' statistics, history,
checkpoint); the group only shares the computation of gradients. Epoch by epoch, every
unfinished run takes its next wave (:meth:`Trainer.next_wave`), all the waves' gradients
are computed in one ``vmap`` call (:func:`~dana.training.worker_grads.gradients_of_runs`,
each run's rows at its own held parameters, buffers and batches), and each run applies its
own (:meth:`Trainer.apply_wave`). So each run's updates are those it makes alone, up to the
batched kernels' float rounding; a run that diverges stops there and the others go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dana.errors import DanaError
from dana.training.trainer import Trainer
from dana.training.worker_grads import gradients_of_runs

#: ``on_epoch(trainer, record)`` after each run's epoch.
GroupEpochCallback = Callable[[Trainer, dict[str, Any]], None]


def check_group(trainers: Sequence[Trainer]) -> None:
    """A one-line error unless the runs can share gradient calls: one device, one loss,
    one architecture, and the same batches per epoch (so that their epochs end together)."""
    first = trainers[0]
    for trainer in trainers[1:]:
        same = (
            trainer.device == first.device
            and trainer.worker_grads.loss_fn == first.worker_grads.loss_fn
            and trainer.loader.batches_per_epoch == first.loader.batches_per_epoch
            and trainer.flat.sizes == first.flat.sizes
        )
        if not same:
            raise DanaError(
                "runs trained together need one task, model, device, dataset size and batch "
                "size: run the others apart"
            )


def train_group(
    trainers: Sequence[Trainer],
    *,
    on_epoch: GroupEpochCallback | None = None,
    on_step: Callable[[], None] | None = None,
    epochs: int | None = None,
) -> None:
    """Train every trainer to its end (or ``epochs`` more epochs), their waves' gradients
    computed together.

    Runs may be at different epochs (resumed from different checkpoints): each does its own
    next epoch in every round. ``on_epoch(trainer, record)`` follows each run's epoch (e.g.
    its checkpoint); ``on_step()`` each update of any run.
    """
    if not trainers:
        return
    check_group(trainers)
    grad_fn = gradients_of_runs([t.worker_grads for t in trainers])
    rounds = 0
    while (epochs is None or rounds < epochs) and (
        active := [t for t in trainers if not t.finished]
    ):
        rounds += 1
        for trainer in active:
            trainer.start_epoch()
        while True:
            waves = [t.next_wave() if t in active else [] for t in trainers]
            if not any(waves):
                break
            grads = grad_fn(
                [t.sim.held_by(w) for t, w in zip(trainers, waves, strict=True)],
                waves,
                [t.sim.indices(w) for t, w in zip(trainers, waves, strict=True)],
            )
            for trainer, wave, g in zip(trainers, waves, grads, strict=True):
                if wave:
                    trainer.apply_wave(wave, g, trainer.worker_grads.losses, on_step)
        for trainer in active:
            record = trainer.end_epoch()
            if on_epoch is not None:
                on_epoch(trainer, record)
