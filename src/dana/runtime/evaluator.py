"""Evaluation of the master's parameters, off the server's path.

At the end of every epoch each shard copies its slice of the master's parameters (and the
coordinator the BatchNorm statistics of the last applied message); the :class:`Evaluator`
actor receives those copies straight from the shards' object store and computes the test
error while the server goes on applying updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dana.data import Dataset
from dana.runtime.worker import seeded_replica
from dana.training.config import RunConfig
from dana.training.flat import FlatModel
from dana.training.run import load_test_set
from dana.training.trainer import test_error as model_test_error

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


@torch.no_grad()
def test_error(flat: FlatModel, dataset: Dataset, device: str | torch.device = "cpu") -> float:
    """Test error (%) of ``flat``'s model on ``dataset`` (the trainer's evaluation)."""
    return model_test_error(flat.model, dataset, device)


class Evaluator:
    """The actor that evaluates the master each epoch (on CPU).

    Args:
        config: the run's config (model and dataset).
        data_dir: the data directory, as seen from the evaluator's node.
        threads: PyTorch threads.
    """

    def __init__(self, config: RunConfig, data_dir: str | Path, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.test_set = load_test_set(config, data_dir)
        self.flat = seeded_replica(config, self.test_set)

    def evaluate(self, *parts: MasterPart) -> float | None:
        """The test error (%) of the master given by its shards' ``parts``; ``None`` when
        its parameters are not finite (the run diverged, as the trainer decides)."""
        load_master(self.flat, parts)
        if not bool(torch.isfinite(self.flat.params).all()):
            return None
        return test_error(self.flat, self.test_set)
