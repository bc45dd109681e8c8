"""dana: asynchronous distributed training that scales without retuning.

The public API:

- :func:`simulate` runs any algorithm with N simulated asynchronous workers on any
  gradient function (flat tensors in, the master's parameters and the per-update log out).
- :func:`train` trains an ``nn.Module`` on a dataset through the same simulator.
- :data:`ALGORITHMS`, :func:`make_rule`: the update rules, shared with the Ray runtime.
"""

from dana.errors import DanaError
from dana.rules import ALGORITHMS, make_rule
from dana.simulation import SCHEDULES, SimulationResult, simulate

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "SCHEDULES",
    "DanaError",
    "SimulationResult",
    "__version__",
    "make_rule",
    "simulate",
]
