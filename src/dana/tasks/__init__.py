"""Tasks: what to train (a model, data, a loss, metrics); the presets are tasks too."""

from dana.tasks.classification import (
    chance_error,
    classification_task,
    cross_entropy,
    preset_task,
    top1_error,
)
from dana.tasks.task import LossFn, MetricsFn, Task, load_task, mean_loss_metric

__all__ = [
    "LossFn",
    "MetricsFn",
    "Task",
    "chance_error",
    "classification_task",
    "cross_entropy",
    "load_task",
    "mean_loss_metric",
    "preset_task",
    "top1_error",
]
