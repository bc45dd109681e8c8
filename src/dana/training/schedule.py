"""The learning-rate schedule every algorithm uses (SPEC "Learning-rate schedule").

Step decay from the model's own single-worker recipe, and Goyal et al.'s gradual
warm-up: start at η/N and ramp linearly to η over the first warm-up epochs. Epochs count
samples processed by all workers together, so the schedule is a function of the number
of gradients done. ``ssgd``'s rule multiplies by N itself (linear scaling), which turns
the same schedule into SPEC's ramp from η to η·N.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """``lr(gradients_done) -> η``.

    Args:
        lr: η, the single-worker learning rate.
        workers: N (the warm-up starts at η/N; with N = 1 there is no warm-up).
        steps_per_epoch: gradients per epoch (dataset size // batch size).
        milestones: epochs at which η is divided by ``decay`` (MultiStepLR semantics:
            from the first gradient of that 0-based epoch on).
        decay: the divisor at each milestone.
        warmup_epochs: length of the linear warm-up, in epochs (may be fractional; 0: none).
    """

    lr: float
    workers: int
    steps_per_epoch: int
    milestones: tuple[int, ...] = ()
    decay: float = 10.0
    warmup_epochs: float = 5.0

    def __post_init__(self) -> None:
        from dana.errors import DanaError

        if not (self.lr > 0 and self.decay > 0 and self.warmup_epochs >= 0):
            raise DanaError("lr and decay must be > 0 and warm-up epochs >= 0")
        if self.workers < 1 or self.steps_per_epoch < 1:
            raise DanaError("workers and steps per epoch must be >= 1")

    def __call__(self, gradients_done: int) -> float:
        epochs = gradients_done / self.steps_per_epoch
        passed = sum(1 for m in self.milestones if gradients_done >= m * self.steps_per_epoch)
        rate = self.lr / self.decay**passed
        if epochs < self.warmup_epochs:
            start = 1.0 / self.workers
            rate *= start + (1.0 - start) * epochs / self.warmup_epochs
        return rate
