"""The single-machine simulator of N asynchronous workers."""

from dana.simulation.scheduling import (
    GAMMA_VARIATION,
    SCHEDULES,
    BlockRandom,
    GammaEvents,
    RoundRobin,
    Scheduler,
    SyncGamma,
    gamma_durations,
    make_scheduler,
)
from dana.simulation.simulator import Gap, Simulation, SimulationResult, Update, simulate
from dana.simulation.wave import BatchedGradFn, MultiBatchedGradFn, WaveSimulation, step_waves

__all__ = [
    "GAMMA_VARIATION",
    "SCHEDULES",
    "BatchedGradFn",
    "BlockRandom",
    "GammaEvents",
    "Gap",
    "MultiBatchedGradFn",
    "RoundRobin",
    "Scheduler",
    "Simulation",
    "SimulationResult",
    "SyncGamma",
    "Update",
    "WaveSimulation",
    "gamma_durations",
    "make_scheduler",
    "simulate",
    "step_waves",
]
