"""Every algorithm by name: the paper's (:mod:`.algorithms`), the staleness mitigations
(:mod:`.mitigations`) and the adaptive ones (:mod:`.adaptive`)."""

from __future__ import annotations

from dana.errors import DanaError
from dana.rules.adaptive import AdamASGD, DANANAdam, NAdamASGD
from dana.rules.algorithms import ASGD, DANA, NAGASGD, SSGD, Baseline, DANAZero, MultiASGD
from dana.rules.base import Rule, check_options
from dana.rules.mitigations import DANADC, DCASGD, SAASGD, DCASGDAdaptive, DelayAdaptive, GapAware

#: Every algorithm, by the name SPEC gives it, in SPEC's order (legends and tables use it).
ALGORITHMS: dict[str, type[Rule]] = {
    cls.name: cls
    for cls in (
        Baseline,
        ASGD,
        NAGASGD,
        MultiASGD,
        DANAZero,
        DANA,
        SSGD,
        DCASGD,
        DCASGDAdaptive,
        SAASGD,
        GapAware,
        DelayAdaptive,
        DANADC,
        AdamASGD,
        NAdamASGD,
        DANANAdam,
    )
}


def check_algorithm(algorithm: str) -> type[Rule]:
    """The rule class of ``algorithm``; a one-line :class:`DanaError` for an unknown name."""
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        raise DanaError(
            f"unknown algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}"
        ) from None


def check_rule_options(algorithm: str, options: dict[str, object]) -> dict[str, float]:
    """``options`` of ``algorithm`` as floats; a one-line :class:`DanaError` for an unknown
    name (naming the valid ones) or a value that is not a number."""
    return check_options(algorithm, check_algorithm(algorithm).options, options)


def make_rule(
    algorithm: str, *, momentum: float = 0.9, weight_decay: float = 0.0, **options: float
) -> Rule:
    """The rule for ``algorithm`` (one of :data:`ALGORITHMS`), with its hyperparameters and
    its extra options (``Rule.options`` names them, e.g. ``lam`` for ``dc-asgd``)."""
    return check_algorithm(algorithm)(momentum=momentum, weight_decay=weight_decay, **options)
