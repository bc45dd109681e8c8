"""The single-machine simulator of N asynchronous workers."""

from dana.simulation.scheduling import (
    GAMMA_VARIATION,
    SCHEDULES,
    BatchTimes,
    BlockRandom,
    GammaEvents,
    Replay,
    RoundRobin,
    Scheduler,
    ScheduleSpec,
    SyncGamma,
    gamma_durations,
    load_replay,
    make_scheduler,
    parse_schedule,
)
from dana.simulation.simulator import Gap, Simulation, SimulationResult, Update, simulate
from dana.simulation.wave import BatchedGradFn, MultiBatchedGradFn, WaveSimulation, step_waves

__all__ = [
    "GAMMA_VARIATION",
    "SCHEDULES",
    "BatchTimes",
    "BatchedGradFn",
    "BlockRandom",
    "GammaEvents",
    "Gap",
    "MultiBatchedGradFn",
    "Replay",
    "RoundRobin",
    "ScheduleSpec",
    "Scheduler",
    "Simulation",
    "SimulationResult",
    "SyncGamma",
    "Update",
    "WaveSimulation",
    "gamma_durations",
    "load_replay",
    "make_scheduler",
    "parse_schedule",
    "simulate",
    "step_waves",
]
