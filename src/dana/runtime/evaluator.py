"""Evaluation of the master's parameters, off the server's path.

At the end of every epoch each shard copies its slice of the master's parameters (and the
coordinator the BatchNorm statistics of the last applied message); the :class:`Evaluator`
actor receives those copies straight from the shards' object store and computes the task's
metrics while the server goes on applying updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dana.runtime.worker import seeded_replica
from dana.tasks import Task
from dana.training.config import RunConfig
from dana.training.flat import FlatModel
from dana.training.run import resolve_task

#: One shard's part of the master at an epoch's end: ``{"params": slice, "buffers": ...}``
#: (``buffers``: the last writer's BatchNorm statistics, on shard 0 only).
MasterPart = dict[str, Any]


def load_master(flat: FlatModel, parts: Sequence[MasterPart]) -> None:
    """Put the master's parameters (the shards' slices, in order) and BatchNorm statistics
    into ``flat``'s model."""
    flat.load(torch.from_numpy(np.concatenate([np.asarray(p["params"]) for p in parts])))
    buffers = parts[0]["buffers"]
    if buffers is not None:
        flat.load_buffers([torch.tensor(np.asarray(b)) for b in buffers])  # small: copy


class Evaluator:
    """The actor that evaluates the master each epoch (on CPU), with the task's metrics.

    Args:
        config: the run's config.
        data_dir: the data directory, as seen from the evaluator's node.
        threads: PyTorch threads.
        task: a Task object given in Python; ``None``: the config's.
    """

    def __init__(
        self, config: RunConfig, data_dir: str | Path, threads: int = 1, task: Task | None = None
    ) -> None:
        torch.set_num_threads(threads)
        self.task = resolve_task(config, data_dir, task=task, train=False)
        self.flat = seeded_replica(self.task, config)

    def evaluate(self, *parts: MasterPart) -> dict[str, float] | None:
        """The task's metrics of the master given by its shards' ``parts``; ``None`` when
        its parameters are not finite (the run diverged, as the trainer decides)."""
        load_master(self.flat, parts)
        if not bool(torch.isfinite(self.flat.params).all()):
            return None
        return self.task.evaluate(self.flat.model)

    def metric(self) -> str | None:
        """The task's primary metric (known after the first evaluation)."""
        return self.task.primary_metric
