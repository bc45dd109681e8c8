"""Update rules: each algorithm as a worker rule and a master rule with explicit state.

The simulator (:mod:`dana.simulation`) and the distributed runtime (:mod:`dana.runtime`)
run these same objects unchanged.
"""

from dana.rules.algorithms import (
    ALGORITHMS,
    ASGD,
    DANA,
    NAGASGD,
    SSGD,
    Baseline,
    DANAZero,
    MultiASGD,
    check_algorithm,
    make_rule,
)
from dana.rules.base import MasterState, Rule, WorkerState, nesterov_step

__all__ = [
    "ALGORITHMS",
    "ASGD",
    "DANA",
    "NAGASGD",
    "SSGD",
    "Baseline",
    "DANAZero",
    "MasterState",
    "MultiASGD",
    "Rule",
    "WorkerState",
    "check_algorithm",
    "make_rule",
    "nesterov_step",
]
