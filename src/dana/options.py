"""Command-line options for a run's config, shared by ``dana run`` and ``dana launch``.

Kept apart from :mod:`dana.cli` so that the runtime's command can use them without
importing the CLI that registers it. Every option defaults to ``None`` (the preset's value
stands) except the few whose default is part of the command's meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

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
)


def config_options(
    *,
    workers: int = 1,
    workers_help: str = "Number of (simulated) asynchronous workers N.",
    schedule_help: str = f"Worker scheduling: {', '.join(SCHEDULES)} [default: block-random].",
    device_help: str = "cpu, cuda, cuda:1, … [default: cpu].",
) -> Callable[[F], F]:
    """A decorator adding ``--preset`` and one option per :data:`CONFIG_FIELDS` entry."""
    options = [
        click.option(
            "--preset",
            default="cnn-fashion-mnist",
            show_default=True,
            help="Model, dataset and single-worker recipe (see `dana presets`).",
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


def config_from_options(preset: str, **options: Any) -> Any:
    """The preset's :class:`~dana.training.RunConfig` with the options that were given."""
    from dana.training import preset_config

    changes = {k: options.get(k) for k in CONFIG_FIELDS}
    changes["rule_options"] = parse_rule_options(options.get("rule_option") or ()) or None
    return preset_config(preset).replace(**changes)


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
