"""Command-line options for a run's config, shared by ``dana run`` and ``dana launch``.

Kept apart from :mod:`dana.cli` so that the runtime's command can use them without
importing the CLI that registers it. Every option defaults to ``None`` (the preset's value
stands) except the few whose default is part of the command's meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from dana.data.loader import AUGMENTATIONS
from dana.errors import DanaError
from dana.rules import ALGORITHMS
from dana.simulation.scheduling import SCHEDULES

F = TypeVar("F", bound=Callable[..., Any])

#: The :class:`~dana.training.RunConfig` fields the options set (besides ``preset``).
CONFIG_FIELDS: tuple[str, ...] = (
    "model",
    "algorithm",
    "workers",
    "schedule",
    "epochs",
    "seed",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "train_samples",
    "test_samples",
    "device",
    "warmup_epochs",
    "milestones",
    "decay",
    "augment",
)

#: The preset of ``dana run`` and ``dana launch`` when neither --preset nor --task is given.
DEFAULT_PRESET = "cnn-fashion-mnist"


def parse_milestones(text: str | None) -> tuple[int, ...] | None:
    """``"80,120"`` → ``(80, 120)``; ``""`` or ``"none"`` → ``()`` (no decay)."""
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give epochs separated by commas, e.g. 80,120 (or none)"
        ) from None


def config_options(
    *,
    workers: int = 1,
    workers_help: str = "Number of (simulated) asynchronous workers N.",
    schedule_help: str = f"Worker scheduling: {', '.join(SCHEDULES)}, replay:PATH (options: "
    "docs/design.md) [default: block-random].",
    device_help: str = "cpu, cuda, cuda:1, … [default: cpu].",
) -> Callable[[F], F]:
    """A decorator adding ``--preset`` and one option per :data:`CONFIG_FIELDS` entry."""
    options = [
        click.option(
            "--preset",
            default=None,
            help=f"Model, dataset and single-worker recipe (see `dana presets`) "
            f"[default: {DEFAULT_PRESET}].",
        ),
        click.option(
            "--task",
            default=None,
            metavar="MODULE:FUNCTION",
            help="Your own task instead of a preset: a function returning a dana.Task "
            "(its module importable, e.g. on PYTHONPATH).",
        ),
        click.option(
            "--model", default=None, help="Override the preset's model (see dana.models)."
        ),
        click.option(
            "--algorithm",
            "-a",
            default="dana",
            show_default=True,
            help=f"One of: {', '.join(ALGORITHMS)}.",
        ),
        click.option(
            "--workers", "-n", type=int, default=workers, show_default=True, help=workers_help
        ),
        click.option("--schedule", default=None, help=schedule_help),
        click.option("--epochs", type=int, default=None, help="Epochs (all workers together)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--lr", type=float, default=None, help="Single-worker learning rate η."),
        click.option("--momentum", type=float, default=None, help="Momentum γ."),
        click.option("--weight-decay", type=float, default=None, help="Weight decay λ."),
        click.option("--batch-size", type=int, default=None, help="Batch size B per worker."),
        click.option(
            "--train-samples",
            type=int,
            default=None,
            help="Train on the first K training images only.",
        ),
        click.option(
            "--test-samples",
            type=int,
            default=None,
            help="Evaluate on the first K test images only.",
        ),
        click.option("--device", default=None, help=device_help),
        click.option(
            "--warmup-epochs", type=float, default=None, help="Warm-up from η/N, in epochs."
        ),
        click.option(
            "--milestones",
            default=None,
            callback=lambda ctx, param, value: parse_milestones(value),
            help="Epochs at which η is divided by --decay, e.g. 80,120 (none: no decay).",
        ),
        click.option("--decay", type=float, default=None, help="Divisor of η at each milestone."),
        click.option(
            "--augment",
            type=click.Choice(AUGMENTATIONS),
            default=None,
            help="Image augmentation (presets' image data only).",
        ),
        click.option(
            "--rule-option",
            "rule_option",
            multiple=True,
            metavar="KEY=VALUE",
            help="An extra hyperparameter of the algorithm, e.g. lam=0.1 for dc-asgd "
            "(repeatable; docs/design.md lists them).",
        ),
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def config_from_options(
    preset: str | None, task: str | None = None, data_dir: str | None = None, **options: Any
) -> tuple[Any, Any]:
    """``(config, task)``: the :class:`~dana.training.RunConfig` of the preset (or of the
    ``module:function`` task, loaded: ``task`` is then the Task, else ``None``) with the
    options that were given."""
    from dana.training import RunConfig, preset_config

    given = {k: options.get(k) for k in CONFIG_FIELDS}
    given["rule_options"] = parse_rule_options(options.get("rule_option") or ()) or None
    if task is None:
        return preset_config(preset or DEFAULT_PRESET).replace(**given), None
    if preset is not None:
        raise DanaError("give --preset or --task, not both: a task brings its model and data")
    for name in ("model", "train_samples", "test_samples", "augment"):
        if given.get(name) is not None:
            raise DanaError(f"--{name.replace('_', '-')} applies to presets: set it in your task")
    from dana.data import resolve_data_dir
    from dana.tasks import load_task

    loaded = load_task(task, resolve_data_dir(data_dir))
    return RunConfig.for_task(loaded, task, **given), loaded


def parse_rule_options(items: Sequence[str]) -> dict[str, float]:
    """``["lam=0.1", "eps=1e-6"]`` → ``{"lam": 0.1, "eps": 1e-6}``; one-line errors."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise DanaError(f"--rule-option takes KEY=NUMBER, e.g. lam=0.1, got {item!r}") from None
    return out


#: ``--ray-logs``, shared by the commands that start or join Ray (``launch``, ``sweep``).
ray_logs_option = click.option(
    "--ray-logs", is_flag=True, help="Show Ray's own log lines (hidden by default)."
)
