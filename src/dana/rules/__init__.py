"""Update rules: each algorithm as a worker rule and a master rule with explicit state.

The simulator (:mod:`dana.simulation`) and the distributed runtime (:mod:`dana.runtime`)
run these same objects unchanged. :mod:`.algorithms` holds the paper's, :mod:`.mitigations`
the staleness mitigations DANA is compared with, :mod:`.adaptive` the Adam family.
"""

from dana.rules.adaptive import AdamASGD, DANANAdam, NAdamASGD
from dana.rules.algorithms import (
    ASGD,
    DANA,
    NAGASGD,
    SSGD,
    Baseline,
    DANAZero,
    MultiASGD,
)
from dana.rules.base import MasterState, Rule, WorkerState, nesterov_step
from dana.rules.mitigations import DANADC, DCASGD, SAASGD, DCASGDAdaptive, DelayAdaptive, GapAware
from dana.rules.registry import ALGORITHMS, check_algorithm, check_rule_options, make_rule

__all__ = [
    "ALGORITHMS",
    "ASGD",
    "DANA",
    "DANADC",
    "DCASGD",
    "NAGASGD",
    "SAASGD",
    "SSGD",
    "AdamASGD",
    "Baseline",
    "DANANAdam",
    "DANAZero",
    "DCASGDAdaptive",
    "DelayAdaptive",
    "GapAware",
    "MasterState",
    "MultiASGD",
    "NAdamASGD",
    "Rule",
    "WorkerState",
    "check_algorithm",
    "check_rule_options",
    "make_rule",
    "nesterov_step",
]
