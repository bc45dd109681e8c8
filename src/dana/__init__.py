"""dana: asynchronous distributed training that scales without retuning.

The public API:

- :class:`Task`: what to train (a model, its data, a loss of a batch, metrics).
- :func:`train` trains a task (or any ``nn.Module`` with its data) with N simulated
  asynchronous workers; :class:`SimulatedWorkers` brings them into your own training loop.
- :func:`simulate` runs any algorithm on any gradient function (flat tensors in, the
  master's parameters and the per-update log out).
- :data:`ALGORITHMS`, :func:`make_rule`: the update rules, shared with the Ray runtime
  (:func:`dana.runtime.launch`).
"""

from dana.errors import DanaError
from dana.rules import ALGORITHMS, make_rule
from dana.simulation import SCHEDULES, SimulationResult, simulate
from dana.tasks import Task, classification_task
from dana.training import SimulatedWorkers, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "SCHEDULES",
    "DanaError",
    "SimulatedWorkers",
    "SimulationResult",
    "Task",
    "TrainResult",
    "__version__",
    "classification_task",
    "make_rule",
    "simulate",
    "train",
]
