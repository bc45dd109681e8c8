"""Reading ``result.json`` files into :class:`Run` records: validation and warnings."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dana.errors import DanaError

Warn = Callable[[str], None]

#: The primary metric of a result that names none (every classification result).
DEFAULT_METRIC = "test_error"


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of a run; NaN where the result file has no (finite) value.

    ``metric`` is the run's primary metric that epoch (``test_error`` unless the result
    names another, see :attr:`Run.metric`).
    """

    epoch: int
    metric: float
    gap_mean: float
    train_loss: float = math.nan


@dataclass(frozen=True)
class Run:
    """One finished run read from a ``result.json``.

    ``final_metric`` is the final value of the primary metric ``metric`` (the test error
    in percent for classification); ``lag_histogram`` the ``(lag, updates)`` pairs of a
    result that recorded them (``dana launch``), in increasing lag, else None.
    """

    path: Path
    preset: str
    model: str
    dataset: str
    schedule: str
    runtime: str
    algorithm: str
    workers: int
    seed: int
    lr: float
    final_metric: float
    diverged: bool
    epochs: tuple[EpochRecord, ...]
    throughput: float | None
    setup: tuple[tuple[str, Any], ...]
    metric: str = DEFAULT_METRIC
    lower_is_better: bool = True
    lag_histogram: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class LoadedResults:
    """Runs that count, plus what was left out and why (for the report's summary)."""

    files: int
    runs: tuple[Run, ...]
    unfinished: tuple[Path, ...]
    skipped: tuple[tuple[Path, str], ...]


class _BadResult(Exception):
    """A ``result.json`` that parses but does not follow the schema."""


# Config keys that must agree inside a group for its runs to be comparable.
_SETUP_KEYS = ("epochs", "batch_size", "train_samples")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_or_nan(value: object) -> float:
    return float(value) if _is_number(value) and math.isfinite(float(value)) else math.nan


def _text(config: dict[str, Any], key: str, default: str | None = None) -> str:
    value = config.get(key)
    value = default if value is None else value
    if not isinstance(value, str) or not value:
        raise _BadResult(f"config.{key} must be a non-empty string")
    return value


def _integer(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    value = default if value is None else value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _BadResult(f"config.{key} must be an integer")
    return value


def _parse_epochs(records: object, metric: str) -> tuple[EpochRecord, ...]:
    if records is None:
        return ()
    if not isinstance(records, list):
        raise _BadResult("epochs must be a list")
    parsed = []
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise _BadResult("every epochs entry must be an object")
        epoch = record.get("epoch", index)
        parsed.append(
            EpochRecord(
                epoch=int(epoch) if _is_number(epoch) else index,
                metric=_finite_or_nan(record.get(metric)),
                gap_mean=_finite_or_nan(record.get("gap_mean")),
                train_loss=_finite_or_nan(record.get("train_loss")),
            )
        )
    return tuple(parsed)


def _final_metric(
    data: dict[str, Any], metric: str, epochs: tuple[EpochRecord, ...], diverged: bool
) -> float:
    """The final value of the primary metric.

    ``test_error``: ``final_test_error``, or the chance error of a diverged run (as the
    runner records it). Any other metric: ``final_metric`` (what ``dana run`` and
    ``dana launch`` write) or ``final_<metric>`` when the result has it, else the last finite
    per-epoch value.
    """
    if metric == DEFAULT_METRIC:
        final = _finite_or_nan(data.get("final_test_error"))
        if math.isnan(final):
            classes = data.get("num_classes")
            if not (diverged and _is_number(classes) and classes > 0):
                raise _BadResult("final_test_error must be a finite number")
            final = 100.0 * (1.0 - 1.0 / classes)
        return final
    final = _finite_or_nan(data.get("final_metric", data.get(f"final_{metric}")))
    finite = [record.metric for record in epochs if not math.isnan(record.metric)]
    if math.isnan(final) and finite:
        final = finite[-1]
    if math.isnan(final):
        state = "diverged run" if diverged else "run"
        raise _BadResult(f"{state} without a finite final_{metric} or per-epoch {metric}")
    return final


def _parse_lag_histogram(histogram: object) -> tuple[tuple[int, int], ...] | None:
    """``{"lag": updates}`` as ``(lag, updates)`` pairs in increasing lag; None if absent."""
    if histogram is None:
        return None
    problem = "lag_histogram must map lags (integers >= 0) to update counts (integers >= 0)"
    if not isinstance(histogram, dict):
        raise _BadResult(problem)
    pairs = []
    for lag, count in histogram.items():
        if not (isinstance(lag, str) and lag.isdecimal()):
            raise _BadResult(problem)
        if not (_is_number(count) and float(count).is_integer() and count >= 0):
            raise _BadResult(problem)
        pairs.append((int(lag), int(count)))
    return tuple(sorted(pairs))


def _parse_run(path: Path, data: dict[str, Any]) -> Run:
    config = data.get("config")
    if not isinstance(config, dict):
        raise _BadResult("no config object")
    workers = _integer(config, "workers")
    if workers < 1:
        raise _BadResult("config.workers must be >= 1")
    diverged = bool(data.get("diverged", False))
    metric = data.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or not metric:
        raise _BadResult("metric must be a non-empty string (the primary metric's name)")
    lower_is_better = data.get("lower_is_better", True)
    if not isinstance(lower_is_better, bool):
        raise _BadResult("lower_is_better must be true or false")
    epochs = _parse_epochs(data.get("epochs"), metric)
    final = _final_metric(data, metric, epochs, diverged)
    throughput = data.get("throughput")
    return Run(
        path=path,
        preset=str(config.get("preset") or "-"),
        model=_text(config, "model"),
        dataset=_text(config, "dataset"),
        schedule=_text(config, "schedule", "n/a"),
        runtime=str(data.get("runtime") or "simulator"),
        algorithm=_text(config, "algorithm"),
        workers=workers,
        seed=_integer(config, "seed", 0),
        lr=float(config["lr"]) if _is_number(config.get("lr")) else math.nan,
        final_metric=final,
        diverged=diverged,
        epochs=epochs,
        throughput=float(throughput) if _is_number(throughput) and throughput > 0 else None,
        setup=tuple((key, config.get(key)) for key in _SETUP_KEYS),
        metric=metric,
        lower_is_better=lower_is_better,
        lag_histogram=_parse_lag_histogram(data.get("lag_histogram")),
    )


def print_warning(message: str) -> None:
    print(message, file=sys.stderr)


def load_results(
    results_dir: Path, *, warn: Warn = print_warning, exclude: Path | None = None
) -> LoadedResults:
    """Read every ``result.json`` below ``results_dir`` (recursively, sorted by path).

    Unreadable or malformed files are skipped with a ``warning:`` line through ``warn``;
    unfinished runs (``"finished": false``) are left out; a second run with the same
    group, algorithm, N and seed is skipped with a warning (the first path wins).
    Files below ``exclude`` (the report folder) are ignored.

    Raises:
        DanaError: the folder does not exist or holds no ``result.json``.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise DanaError(f"results folder {results_dir} does not exist: give the folder of a sweep")
    paths = sorted(results_dir.rglob("result.json"))
    # A report folder inside the results is skipped; one that holds them excludes nothing.
    if exclude is not None and not results_dir.resolve().is_relative_to(exclude.resolve()):
        paths = [path for path in paths if not path.resolve().is_relative_to(exclude.resolve())]
    if not paths:
        raise DanaError(f"no result.json found under {results_dir}: run `dana sweep` first")

    runs: list[Run] = []
    unfinished: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen: dict[tuple[Any, ...], Path] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise _BadResult("not a JSON object")
            if data.get("finished") is False:
                unfinished.append(path)
                continue
            run = _parse_run(path, data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = f"not valid JSON ({exc})"
        except _BadResult as exc:
            reason = str(exc)
        else:
            identity = (*group_identity(run), run.algorithm, run.workers, run.seed)
            if identity not in seen:
                seen[identity] = path
                runs.append(run)
                continue
            reason = f"same algorithm, N and seed as {seen[identity]}"
        warn(f"warning: skipping {path}: {reason}")
        skipped.append((path, reason))
    return LoadedResults(len(paths), tuple(runs), tuple(unfinished), tuple(skipped))


def group_identity(run: Run) -> tuple[str, str, str, str, str, str, float]:
    """What runs share to be compared: model, dataset, schedule, runtime, preset, metric, lr."""
    return (run.model, run.dataset, run.schedule, run.runtime, run.preset, run.metric, run.lr)
