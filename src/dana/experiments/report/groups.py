"""Grouping runs into comparable sets, each with its single-worker baseline."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from dana.experiments.report.load import (
    DEFAULT_METRIC,
    Run,
    Warn,
    group_identity,
    print_warning,
)
from dana.experiments.report.style import algorithm_sort_key


@dataclass
class Group:
    """Runs of one (model, dataset, schedule[, runtime, preset, metric]) and their baselines.

    ``metric`` is the primary metric every run of the group reports (``test_error``
    for classification).
    """

    model: str
    dataset: str
    schedule: str
    runtime: str
    preset: str
    runs: list[Run]
    baseline: list[Run]
    slug: str = ""
    lr: float = math.nan
    metric: str = DEFAULT_METRIC

    @property
    def title(self) -> str:
        # A user's task names its model and data by its own name: say it once.
        task = self.model == self.dataset == self.preset
        what = self.model if task else f"{self.model} on {self.dataset}"
        text = f"{what}, {self.schedule} scheduling"
        if self.runtime != "simulator":
            text += f" ({self.runtime})"
        if self.preset != "-" and not task:
            text += f" [{self.preset}]"
        if not math.isnan(self.lr):
            text += f", lr {self.lr:g}"
        return text

    def workers(self) -> list[int]:
        return sorted({run.workers for run in self.runs})

    def algorithms(self) -> list[str]:
        return sorted({run.algorithm for run in self.runs}, key=algorithm_sort_key)


def _slugify(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", part).strip("-") or "x" for part in parts)


def group_runs(runs: Iterable[Run], *, warn: Warn = print_warning) -> list[Group]:
    """Group runs by (model, dataset, schedule, runtime, preset, metric) and attach baselines.

    A group's baseline runs are its own ``baseline`` runs or, when it has none, those
    of the same model, dataset, runtime and preset under any schedule (with one worker
    every schedule is the same). A group holding nothing but baseline runs is not
    reported on its own when other groups of that model, dataset, runtime and preset
    exist. File-name slugs are
    ``model_dataset_schedule``, plus the runtime when it is not the simulator, and the
    preset (the metric) when two presets (metrics) would otherwise share a slug.
    """
    by_identity: dict[tuple[str, ...], list[Run]] = defaultdict(list)
    for run in runs:
        by_identity[group_identity(run)].append(run)

    baselines: dict[tuple[str, ...], list[Run]] = defaultdict(list)
    for (model, dataset, _schedule, runtime, preset, metric, lr), members in by_identity.items():
        baselines[(model, dataset, runtime, preset, metric, lr)] += [
            run for run in members if run.algorithm == "baseline"
        ]

    groups: list[Group] = []
    for identity in sorted(by_identity):
        model, dataset, schedule, runtime, preset, metric, lr = identity
        members = by_identity[identity]
        own = [run for run in members if run.algorithm == "baseline"]
        others = [run for run in members if run.algorithm != "baseline"]
        if not others and any(
            key[:2] == (model, dataset)
            and key[3:] == (runtime, preset, metric, lr)
            and key != identity
            for key in by_identity
        ):
            continue
        baseline = own or baselines[(model, dataset, runtime, preset, metric, lr)]
        groups.append(
            Group(model, dataset, schedule, runtime, preset, others, baseline, lr=lr, metric=metric)
        )

    slugs = defaultdict(list)
    for group in groups:
        parts = [group.model, group.dataset, group.schedule]
        if group.runtime != "simulator":
            parts.append(group.runtime)
        slugs[_slugify(*parts)].append(group)
    for slug, members in slugs.items():
        presets = {group.preset for group in members}
        lrs = {group.lr for group in members}
        metrics = {group.metric for group in members}
        for group in members:
            parts = [slug]
            if len(presets) > 1:
                parts.append(_slugify(group.preset))
            if len(metrics) > 1:
                parts.append(_slugify(group.metric))
            if len(lrs) > 1:
                parts.append(f"lr{group.lr:g}")
            group.slug = "_".join(parts)

    for group in groups:
        setups = {run.setup for run in group.runs + group.baseline}
        if len(setups) > 1:
            described = "; ".join(
                ", ".join(f"{key}={value}" for key, value in setup)
                for setup in sorted(setups, key=str)
            )
            warn(f"warning: group {group.slug} mixes runs with different settings: {described}")
    return groups
