"""Training real models through the simulator: schedule, presets, trainer, resumable runs."""

from dana.training.config import PRESETS, RunConfig, preset_config
from dana.training.run import run_experiment
from dana.training.schedule import LRSchedule
from dana.training.trainer import Trainer, TrainResult, as_task, chance_error, train
from dana.training.workers import SimulatedWorkers

__all__ = [
    "PRESETS",
    "LRSchedule",
    "RunConfig",
    "SimulatedWorkers",
    "TrainResult",
    "Trainer",
    "as_task",
    "chance_error",
    "preset_config",
    "run_experiment",
    "train",
]
