"""Experiments: the theoretical speedup model (paper Figure 5) and reports of results."""

from dana.experiments.report import (
    algorithm_colour,
    algorithm_label,
    group_runs,
    load_results,
    summarise,
    write_report,
)
from dana.experiments.speedup import (
    MonteCarloEstimate,
    SimulatedSpeedup,
    expected_max_gamma,
    gamma_parameters,
    monte_carlo_max_gamma,
    plot_speedup,
    simulate_speedup,
    speedup_markdown,
    speedup_table,
)

__all__ = [
    "MonteCarloEstimate",
    "SimulatedSpeedup",
    "algorithm_colour",
    "algorithm_label",
    "expected_max_gamma",
    "gamma_parameters",
    "group_runs",
    "load_results",
    "monte_carlo_max_gamma",
    "plot_speedup",
    "simulate_speedup",
    "speedup_markdown",
    "speedup_table",
    "summarise",
    "write_report",
]
