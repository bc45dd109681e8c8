"""``dana sweep``: a grid of algorithms × worker counts × schedules × seeds over a preset.

Every run writes ``RESULTS/<preset>/<algorithm>-n<N>-<schedule>-s<seed>/result.json``
through :func:`dana.training.run_experiment`, so a sweep inherits its guarantees:
finished runs are skipped, interrupted ones resume from their last epoch, files are
written atomically (a kill -9 loses at most the current epoch of the runs in flight), and
a diverged run is a result. Runs go to a pool of processes (``jobs``), each with its own
thread budget (and its own GPU when runs ask for ``cuda`` and several are visible); one
progress bar with ETA counts epochs over the whole grid.

``batch_runs = K``: compatible runs (:func:`group_key`: one model, dataset, N, epochs, batch
size and device; seeds, algorithms, learning rates and schedules may differ) go K at a
time to one process, which trains them together (:func:`dana.training.run.run_group`: one
batched gradient call for all their waves); each still writes its own folder as alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from dana.errors import DanaError
from dana.training import RunConfig, preset_config
from dana.training.folder import FolderBusy, release_folder
from dana.training.resources import check_threads
from dana.training.run import RESULT, finished_result

if TYPE_CHECKING:
    from dana.experiments.cluster import ClusterOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class SweepSpec:
    """The grid. ``baseline`` runs once per schedule and seed, at N = 1; every other
    algorithm runs at every N of ``workers``. ``lrs`` (optional) adds a learning-rate
    axis, e.g. the single-worker sweep that picks a preset's lr. ``overrides`` change the
    preset's config (e.g. ``epochs``, ``train_samples``) for every run alike;
    ``rule_options`` gives an algorithm's extra hyperparameters (``{"dc-asgd": {"lam":
    0.1}}``, in a file ``[rule_options.dc-asgd]``) to its runs only."""

    preset: str | None
    algorithms: tuple[str, ...]
    workers: tuple[int, ...]
    schedules: tuple[str, ...] = ("block-random",)
    seeds: tuple[int, ...] = (0,)
    lrs: tuple[float, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    #: A user's task (``module:function``) instead of a preset.
    task: str | None = None
    rule_options: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Runs trained together in one batched computation (1: each alone).
    batch_runs: int = 1
    #: ``auto``/``on``/``off``: waves of each run's gradients in one call (see RunConfig).
    waves: str | None = None

    def base_config(self) -> RunConfig:
        """The config every run starts from: the preset's, or the task's, with overrides
        (but ``rule_options``, which each algorithm gets in :meth:`configs`)."""
        overrides = {k: v for k, v in self.overrides.items() if k != "rule_options"}
        if self.waves is not None:
            overrides["waves"] = self.waves
        if self.task is None:
            return preset_config(self.preset).replace(**overrides)
        from dana.tasks import load_task

        return RunConfig.for_task(load_task(self.task), self.task, **overrides)

    def configs(self) -> list[RunConfig]:
        """Every run of the grid, validated (a bad value fails before anything runs)."""
        base = self.base_config()
        common = self.overrides.get("rule_options") or {}  # for every algorithm of the grid
        if not isinstance(common, dict):
            raise DanaError("rule_options must be a table of options, e.g. {lam = 0.1}")
        runs = []
        for lr in self.lrs or (base.lr,):
            for schedule in self.schedules:
                for seed in self.seeds:
                    for algorithm in self.algorithms:
                        counts = (1,) if algorithm == "baseline" else self.workers
                        options = {**common, **self.rule_options.get(algorithm, {})}
                        runs.extend(
                            base.replace(
                                algorithm=algorithm,
                                workers=n,
                                schedule=schedule,
                                seed=seed,
                                lr=lr,
                                rule_options=options,
                            )
                            for n in counts
                        )
        if not runs:
            raise DanaError("the sweep is empty: give at least one algorithm, N and seed")
        return runs

    @classmethod
    def from_toml(cls, path: str | Path, **changes: Any) -> SweepSpec:
        """Read a sweep file; keyword arguments that are not ``None`` override its values.

        The file holds ``preset``, ``algorithms``, ``workers``, ``schedules``, ``seeds``,
        an optional ``[overrides]`` table of config fields, optional
        ``[rule_options.ALGORITHM]`` tables, ``batch_runs`` and ``waves``.
        """
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise DanaError(f"cannot read sweep file {path}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise DanaError(f"sweep file {path} is not UTF-8 text: save it as UTF-8") from None
        except tomllib.TOMLDecodeError as err:
            raise DanaError(f"sweep file {path} is not valid TOML: {err}") from None
        known = {
            "preset",
            "task",
            "algorithms",
            "workers",
            "schedules",
            "seeds",
            "lrs",
            "overrides",
            "rule_options",
            "batch_runs",
            "waves",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise DanaError(f"unknown keys {unknown} in {path}: valid keys are {sorted(known)}")
        data.update({k: v for k, v in changes.items() if v is not None})
        return cls.from_values(**data)

    @classmethod
    def from_values(cls, **values: Any) -> SweepSpec:
        kinds = {"algorithms": str, "workers": int, "schedules": str, "seeds": int, "lrs": float}
        for key, kind in kinds.items():
            if key in values:
                if not isinstance(values[key], list | tuple):
                    raise DanaError(f"{key} must be a list, e.g. {key} = [{values[key]!r}]")
                if not all(_is(kind, item) for item in values[key]):
                    example = {str: '"dana"', int: "4", float: "0.1"}[kind]
                    raise DanaError(
                        f"{key} must be a flat list of {kind.__name__} values, e.g. "
                        f"{key} = [{example}], got {values[key]!r}"
                    )
                values[key] = tuple(dict.fromkeys(values[key]))  # keep order, drop repeats
                if not values[key] and key != "lrs":
                    raise DanaError(f"{key} is empty: give at least one value, or leave it out")
        overrides = values.get("overrides", {})
        if not isinstance(overrides, dict):
            raise DanaError("overrides must be a table of config fields, e.g. [overrides]")
        for key in ("preset", "task", "algorithm", "workers", "schedule", "seed"):
            if key in overrides:
                grid = "preset or task" if key in ("preset", "task") else f"{key}s (a list)"
                raise DanaError(
                    f"[overrides] cannot set {key}: give it as the sweep's {grid} at the top "
                    "level, so run folders and configs say what trains"
                )
        if values.get("preset") is not None and values.get("task") is not None:
            raise DanaError("a sweep trains a preset or a task, not both")
        if values.get("preset") is None and values.get("task") is None:
            raise DanaError("a sweep needs a preset (or a task) and a list of algorithms")
        for key in ("preset", "task"):
            if values.get(key) is not None and not isinstance(values[key], str):
                example = '"cnn-fashion-mnist"' if key == "preset" else '"package.module:function"'
                raise DanaError(f"{key} must be a name, e.g. {key} = {example}")
        if "algorithms" not in values:
            raise DanaError("a sweep needs a list of algorithms")
        batch_runs = values.get("batch_runs", 1)
        if not _is(int, batch_runs) or batch_runs < 1:
            raise DanaError(f"batch_runs must be an integer >= 1, got {batch_runs!r}")
        if values.get("waves") not in (None, "auto", "on", "off"):
            raise DanaError(f"waves must be auto, on or off, got {values['waves']!r}")
        values.setdefault("preset", None)
        values.setdefault("workers", (1,))
        options = values.get("rule_options", {})
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise DanaError("rule_options must hold a table per algorithm: [rule_options.dc-asgd]")
        stray = sorted(set(options) - set(values["algorithms"]))
        if stray:
            raise DanaError(f"rule_options for {stray}, which the sweep's algorithms do not hold")
        return cls(**values)


@dataclass
class SweepSummary:
    """What a sweep did: run folders by outcome."""

    finished: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    diverged: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    busy: list[Path] = field(default_factory=list)  # held by another process: left to it
    requeued: list[Path] = field(default_factory=list)  # on Ray: its task died, it resumed

    def lines(self) -> list[str]:
        out = [
            f"{len(self.finished)} runs finished, {len(self.skipped)} already done, "
            f"{len(self.diverged)} diverged (recorded), {len(self.failed)} failed"
            + (f", {len(self.busy)} in use by another process (skipped)" if self.busy else "")
        ]
        out += [f"failed: {path}: {why}" for path, why in self.failed.items()]
        out += [f"in use by another process: {path}" for path in self.busy]
        out += [f"requeued (its Ray task died, it resumed): {path}" for path in self.requeued]
        return out


def run_folder(results: Path, config: RunConfig, *, with_lr: bool = False) -> Path:
    """``RESULTS/<preset>/<algorithm>-n<N>-<schedule>-s<seed>[-lr<lr>]``."""
    return Path(results) / (config.run_name + (f"-lr{config.lr:g}" if with_lr else ""))


def group_key(config: RunConfig) -> tuple:
    """Runs with equal keys can be trained together (``batch_runs``): one model on one
    dataset, with the same N, epochs, batch size and device."""
    return (
        config.preset,
        config.task,
        config.model,
        config.dataset,
        config.train_samples,
        config.test_samples,
        config.augment,
        config.workers,
        config.epochs,
        config.batch_size,
        config.device,
    )


def batch_groups(pending: dict[Path, RunConfig], size: int) -> list[list[tuple[Path, RunConfig]]]:
    """``pending`` runs in groups of at most ``size`` compatible ones, in grid order."""
    by_key: dict[tuple, list[tuple[Path, RunConfig]]] = {}
    for folder, config in pending.items():
        by_key.setdefault(group_key(config), []).append((folder, config))
    return [runs[i : i + size] for runs in by_key.values() for i in range(0, len(runs), size)]


def epochs_done(path: Path, config: RunConfig) -> int:
    """Epochs a run folder holds (a diverged or finished run counts in full)."""
    try:
        result = json.loads((path / RESULT).read_text())
    except (OSError, ValueError):
        return 0
    if result.get("config") != config.to_dict():
        return 0
    return config.epochs if result.get("finished") else len(result.get("epochs", []))


def _init_process(threads: int, gpus: Any, parent: int, pdeathsig: bool) -> None:
    """Pool process set-up: ignore Ctrl-C (the parent stops the pool), die with the
    parent, its thread budget and, with several GPUs, a GPU of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # born ignoring it, too: see run_sweep
    _die_with_parent(parent, pdeathsig)
    # tqdm's default lock is a named semaphore here (the spawn context): one that a run
    # stopped by SIGTERM would leave for the resource tracker to warn about.
    tqdm.set_lock(threading.RLock())
    import torch

    torch.set_num_threads(threads)
    if gpus is not None:
        # CUDA reads this when it is first used, which is after this initializer.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())


def _die_with_parent(parent: int, pdeathsig: bool) -> None:
    """End this process when ``parent`` ends, however it ends (kill -9 included).

    Linux: the kernel sends SIGKILL (``prctl(PR_SET_PDEATHSIG)``), at once; it fires when
    the *thread* that started this process ends, so only when that was the parent's main
    thread (``pdeathsig``). Otherwise a daemon thread watches ``os.getppid()``.
    """
    armed = False
    if pdeathsig and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            armed = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) == 0
    if os.getppid() != parent:  # the parent died before this process armed anything
        os._exit(1)
    if not armed:

        def watch() -> None:
            while os.getppid() == parent:
                threading.Event().wait(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="dana-parent-watch").start()


def _run_one(config: RunConfig, out: Path, data_dir: str | None) -> dict[Path, Any]:
    """One run in a pool process; returns ``{out: whether it diverged}``."""
    from dana.training import run_experiment

    try:
        result = run_experiment(config, out, data_dir=data_dir, progress=False, log=False)
    finally:
        release_folder(out)  # a failed run must not keep its folder from other sweeps
    return {out: bool(result["diverged"])}


def _run_group(configs: list[RunConfig], outs: list[Path], data_dir: str | None) -> dict[Path, Any]:
    """Runs trained together in a pool process; per folder whether it diverged, or the
    exception that kept it from running."""
    from dana.training.run import run_group

    outcomes = run_group(configs, outs, data_dir=data_dir, log=False)
    return {
        out: r if isinstance(r, Exception) else bool(r["diverged"]) for out, r in outcomes.items()
    }


def _gpu_queue(configs: list[RunConfig], jobs: int, context: Any) -> Any:
    """A queue dealing GPU indices to pool processes, when runs ask for plain ``cuda``."""
    if jobs == 1 or not any(c.device == "cuda" for c in configs):
        return None
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        return None
    queue = context.Queue()
    for job in range(jobs):
        queue.put(gpu_for_job(job, count))
    return queue


def gpu_for_job(job: int, count: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of pool process ``job`` among ``count`` visible GPUs:
    an entry of this process's own ``CUDA_VISIBLE_DEVICES`` when it has one (a job given
    GPUs "2,3" or MIG/UUID names keeps to those), else the index."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [d for d in visible if d]
    if len(visible) >= count:
        return visible[job % count]
    return str(job % count)


def run_sweep(
    spec: SweepSpec,
    results: str | Path,
    *,
    jobs: int = 1,
    threads_per_job: int | None = None,
    data_dir: str | Path | None = None,
    progress: bool | None = None,
    poll_seconds: float = 1.0,
    cluster: ClusterOptions | None = None,
) -> SweepSummary:
    """Run every config of ``spec`` under ``results``; return what happened.

    A run that raises is recorded as failed and the sweep goes on. ``spec.batch_runs`` > 1
    trains compatible runs that many at a time together (one job each group). With
    ``cluster``, the runs are Ray tasks (:mod:`dana.experiments.cluster`) instead of a local
    pool (``jobs``); their files are written under ``results`` all the same.
    """
    if jobs < 1:
        raise DanaError(f"--jobs must be >= 1, got {jobs}")
    check_threads(threads_per_job)
    configs = spec.configs()
    results = Path(results)
    threads = threads_per_job or max(1, (os.cpu_count() or 1) // jobs)
    folders = [run_folder(results, c, with_lr=bool(spec.lrs)) for c in configs]
    summary = SweepSummary()
    pending = {}
    for config, folder in zip(configs, folders, strict=True):
        if finished_result(folder, config) is not None:
            summary.skipped.append(folder)
        else:
            pending[folder] = config
    total = sum(c.epochs for c in configs)
    bar = tqdm(
        total=total,
        unit="epoch",
        desc="sweep",
        dynamic_ncols=True,
        disable=(not sys.stderr.isatty()) if progress is None else not progress,
    )
    context = multiprocessing.get_context("spawn")  # fork + OpenMP threads can deadlock
    main_thread = threading.current_thread() is threading.main_thread()
    with bar:
        if cluster is not None:
            from dana.experiments.cluster import run_on_ray

            if spec.batch_runs > 1:
                raise DanaError("batch_runs is the local pool's: on Ray every run is its own task")

            run_on_ray(
                pending,
                replace(cluster, threads=threads_per_job or cluster.threads),
                summary,
                data_dir=data_dir,
                refresh=lambda: _refresh(bar, folders, configs),
                poll_seconds=poll_seconds,
            )
            return summary
        with _sigint_ignored(main_thread):
            # The pool starts its processes in submit(): started while SIGINT is ignored,
            # they inherit SIG_IGN, and Python keeps ignoring it, so a Ctrl-C reaches only
            # this process, even while they import torch.
            pool = cf.ProcessPoolExecutor(
                max_workers=jobs,
                mp_context=context,
                initializer=_init_process,
                initargs=(threads, _gpu_queue(configs, jobs, context), os.getpid(), main_thread),
            )
            where = None if data_dir is None else str(data_dir)
            if spec.batch_runs > 1:
                futures = {
                    pool.submit(_run_group, [c for _, c in group], [f for f, _ in group], where): [
                        f for f, _ in group
                    ]
                    for group in batch_groups(pending, spec.batch_runs)
                }
            else:
                futures = {
                    pool.submit(_run_one, config, folder, where): [folder]
                    for folder, config in pending.items()
                }
        try:
            _collect(futures, summary, folders, configs, bar, poll_seconds)
        except BaseException:  # Ctrl-C (or a bug): stop the runs now; each resumes later
            _stop(pool, main_thread)
            raise
    pool.shutdown()
    return summary


def _collect(
    futures: dict[cf.Future, list[Path]],
    summary: SweepSummary,
    folders: list[Path],
    configs: list[RunConfig],
    bar: Any,
    poll_seconds: float,
) -> None:
    waiting = set(futures)
    while waiting:
        done, waiting = cf.wait(waiting, timeout=poll_seconds)
        for future in done:
            try:
                outcomes = future.result()
            except Exception as err:  # a bug in one job must not stop the sweep
                outcomes = dict.fromkeys(futures[future], err)
            for folder, outcome in outcomes.items():
                _record(summary, Path(folder), outcome)
        _refresh(bar, folders, configs)


def _refresh(bar: Any, folders: list[Path], configs: list[RunConfig]) -> None:
    """Set the progress bar to the epochs the run folders hold."""
    bar.n = sum(epochs_done(f, c) for f, c in zip(folders, configs, strict=True))
    bar.refresh()


def _record(summary: SweepSummary, folder: Path, outcome: bool | Exception) -> None:
    """File one run's outcome: whether it diverged, or what it raised."""
    if isinstance(outcome, FolderBusy):
        summary.busy.append(folder)
    elif isinstance(outcome, DanaError):
        summary.failed[folder] = str(outcome)
    elif isinstance(outcome, Exception):
        summary.failed[folder] = f"{type(outcome).__name__}: {outcome}"
    else:
        (summary.diverged if outcome else summary.finished).append(folder)


@contextlib.contextmanager
def _sigint_ignored(active: bool) -> Iterator[None]:
    """Ignore SIGINT inside the block (only the main thread may change handlers)."""
    if not active:
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(pool: cf.ProcessPoolExecutor, main_thread: bool) -> None:
    """Cancel what has not started and kill the runs in flight (their checkpoints are
    atomic: each resumes from its last epoch). A second Ctrl-C meanwhile exits at once."""
    if main_thread:

        def now(signum: int, frame: Any) -> None:
            os._exit(130)

        signal.signal(signal.SIGINT, now)
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=3)
            if process.is_alive():
                process.kill()
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None:  # it closes the pool's queues once it sees the processes gone
        manager.join(timeout=3)


def _is(kind: type, value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def parse_list(text: str | None, kind: type = str) -> tuple | None:
    """``"1,2,4"`` → ``(1, 2, 4)``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise DanaError(
            f"cannot read {text!r} as a comma-separated list of {kind.__name__}"
        ) from None
