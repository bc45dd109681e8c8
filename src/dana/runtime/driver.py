"""``launch``: one run of a :class:`RunConfig` as a real parameter server on Ray.

Actors: K parameter-server shards (:class:`~dana.runtime.server.ShardServer`, shard 0 the
coordinator), N workers (:class:`~dana.runtime.worker.Worker`, each with its own model
replica and data) and one :class:`~dana.runtime.evaluator.Evaluator`. The driver (this
module) starts them, restarts failed workers, evaluates and checkpoints every epoch and
writes ``OUT/result.json``; it is not on the path of any update.

Files in ``OUT`` (all written atomically):

- ``result.json``: the schema of ``dana run`` (:func:`dana.training.run.result_record`)
  plus ``runtime: "ray"``, ``servers``, ``deterministic``, ``throughput`` (images/s over
  the training time), ``lag_histogram`` ({lag: updates}), ``updates_per_worker`` (applied
  by the server), ``update_order`` (the worker of every update, in the order applied:
  ``dana run --schedule replay:OUT/result.json`` re-runs it in the simulator),
  ``worker_restarts`` and ``duplicates`` (retried messages not applied).
  Rewritten every epoch (``finished: false``) and at the end.
- ``checkpoint.pt``: the shards' states at the end of the last trained epoch, written as
  soon as the coordinator reports that epoch's end (before its evaluation, which runs
  meanwhile), with the history and the master of each epoch not evaluated yet; a launch
  with the same config and ``OUT`` resumes from it (evaluating those first). Deleted at
  the end.
- ``model.pt``: the final master model's ``state_dict`` (parameters and the last writer's
  BatchNorm statistics).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dana.data import resolve_data_dir
from dana.errors import DanaError
from dana.rules import make_rule
from dana.runtime.evaluator import Evaluator, load_master
from dana.runtime.server import (
    Order,
    ShardServer,
    ShardSpec,
    checkpointable,
    master_part,
    shard_bounds,
)
from dana.runtime.transport import TRANSPORTS
from dana.runtime.worker import Fault, Worker, WorkerSpec, seeded_replica
from dana.tasks import Task
from dana.training.config import RunConfig
from dana.training.folder import checked_state, claim_folder, release_folder, restore
from dana.training.io import (
    load_checkpoint,
    save_checkpoint,
    save_tensors,
    write_csv,
    write_json,
)
from dana.training.run import (
    CHECKPOINT,
    METRICS,
    RESULT,
    finished_result,
    metric_text,
    resolve_task,
)
from dana.training.schedule import LRSchedule

MODEL = "model.pt"
RUNTIME = "ray"  # this module's kind of run folder (``dana run``'s is "simulator")
#: Replies from this size on are put into Ray's object store once by the shard (a copy
#: saved per update); smaller ones travel inside the reply (Ray inlines < 100 KB anyway).
PUBLISH_BYTES = 1 << 20

#: Called with each epoch's record, after the checkpoint and result.json are written.
EpochCallback = Callable[[dict[str, Any]], None]


def require_ray() -> Any:
    """The ``ray`` module, or a one-line :class:`DanaError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DanaError("the Ray runtime needs Ray: pip install 'dana[ray]'") from None
    return ray


@dataclass(frozen=True)
class LaunchOptions:
    """How a run is executed (not part of its config: the same run on other hardware).

    Attributes:
        servers: K, the number of parameter-server shards.
        deterministic: impose the simulator's order of updates and data (see
            :class:`~dana.runtime.server.Order`); for testing and debugging.
        cpus_per_worker, gpus_per_worker: Ray resources of each worker.
        threads: PyTorch threads per worker (default: its CPUs, at least 1).
        max_restarts: restarts allowed per worker before the launch fails.
        transport: the data plane (:data:`dana.runtime.transport.TRANSPORTS`).
    """

    servers: int = 1
    deterministic: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads: int | None = None
    max_restarts: int = 3
    transport: str = "direct"

    def validated(self, config: RunConfig) -> LaunchOptions:
        checks = [
            (isinstance(self.servers, int) and self.servers >= 1, "--servers must be >= 1"),
            (self.cpus_per_worker >= 0, "--cpus-per-worker must be >= 0"),
            (self.gpus_per_worker >= 0, "--gpus-per-worker must be >= 0"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (self.max_restarts >= 0, "--max-restarts must be >= 0"),
            (self.transport in TRANSPORTS, f"--transport must be one of {', '.join(TRANSPORTS)}"),
            (
                not config.device.startswith("cuda") or self.gpus_per_worker > 0,
                f"--device {config.device} needs --gpus-per-worker > 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise DanaError(message)
        return self

    @property
    def worker_threads(self) -> int:
        return self.threads or max(1, int(self.cpus_per_worker))


def launch(
    run: RunConfig | Task,
    out: str | Path,
    *,
    servers: int = 1,
    address: str | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    data_dir: str | Path | None = None,
    deterministic: bool = False,
    threads: int | None = None,
    max_restarts: int = 3,
    transport: str = "direct",
    faults: Sequence[Fault] = (),
    on_epoch: EpochCallback | None = None,
    log: bool = True,
    **config_changes: Any,
) -> dict[str, Any]:
    """Run a task on Ray with a real parameter server; return (and write) the result.

    Resumes from ``OUT/checkpoint.pt`` when it holds a run of the same config, and returns
    the result at once when ``OUT`` holds a finished launch of it.

    Args:
        run: a :class:`~dana.training.RunConfig` (a preset, or a ``module:function`` task),
            or a :class:`~dana.tasks.Task` object (shipped to every worker by Ray: it must
            pickle, lambdas included, and its data is shipped with it unless its functions
            load it on the node). ``config.workers`` workers; ``schedule`` only matters
            with ``deterministic``.
        out: the result folder.
        servers: K parameter-server shards.
        address: an existing Ray cluster (``"auto"``, ``"ray://host:10001"``, …); ``None``
            uses the current Ray connection or starts a local Ray instance.
        cpus_per_worker, gpus_per_worker: Ray resources of each worker.
        data_dir: the data directory, which must exist on every node (see
            :func:`dana.data.resolve_data_dir`).
        deterministic: impose the simulator's order of updates and data.
        threads: PyTorch threads per worker (default: ``cpus_per_worker``, at least 1).
        max_restarts: restarts allowed per worker before the launch fails.
        transport: the data plane: ``"direct"`` (shared memory on a node, TCP between
            nodes), ``"tcp"`` or ``"ray"`` (see :mod:`dana.runtime.transport`).
        faults: failures to inject (testing).
        on_epoch: called with each epoch's record once it is saved.
        log: print one line per epoch, and each worker restart, to stderr.
        config_changes: config fields to set (``algorithm="dana", workers=4, epochs=3``);
            for a Task, over its own ``defaults``.

    Raises:
        DanaError: bad options, missing Ray or data, too few resources, a worker failing
            more than ``max_restarts`` times, or a parameter-server shard dying.
    """
    task = run if isinstance(run, Task) else None
    if task is not None:
        config = RunConfig.for_task(task, **config_changes)
    else:
        config = run.replace(**config_changes) if config_changes else run.validated()
    options = LaunchOptions(
        servers, deterministic, cpus_per_worker, gpus_per_worker, threads, max_restarts, transport
    ).validated(config)
    out = claim_folder(out)
    try:
        done = finished_result(out, config, RUNTIME)
        if done is not None:
            return done
        ray = require_ray()
        root = resolve_data_dir(data_dir).expanduser().resolve()
        started = _connect(ray, address)
        try:
            return _Launch(ray, config, task, options, out, root, faults, on_epoch, log).run()
        finally:
            if started:
                ray.shutdown()
    finally:
        release_folder(out)


def _connect(ray: Any, address: str | None) -> bool:
    """Connect to Ray; return whether this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    try:
        if address is None:
            ray.init(include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=address, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise DanaError(f"cannot start or reach Ray at {address or 'localhost'}: {err}") from None
    return True


class _Launch:
    """The driver of one launch: actors, the epoch loop, restarts, files."""

    def __init__(
        self,
        ray: Any,
        config: RunConfig,
        task: Task | None,
        options: LaunchOptions,
        out: Path,
        root: Path,
        faults: Sequence[Fault],
        on_epoch: EpochCallback | None,
        log: bool,
    ) -> None:
        self.ray = ray
        self.config = config
        self.options = options
        self.out = out
        self.root = root
        self.faults = {f.worker: f for f in faults}
        self.on_epoch = on_epoch
        self.log = log
        self.user_task = task  # shipped to the actors; else each builds the config's
        self.task = resolve_task(config, root, task=task, evaluate=False)
        samples = self.task.train_samples
        self.steps_per_epoch = samples // config.batch_size
        _check_data(config, samples, options.deterministic)
        self.replica = seeded_replica(self.task, config)  # initial, then final, master model
        if options.servers > len(self.replica):
            raise DanaError(
                f"--servers {options.servers} exceeds the {len(self.replica)} parameters of "
                f"{config.model}: use fewer shards"
            )
        self.order = (
            Order(
                config.schedule,
                config.workers,
                config.seed,
                config.batch_size,
                make_rule(config.algorithm).synchronous,
            )
            if options.deterministic
            else None
        )
        self.history: list[dict[str, Any]] = []
        self.restarts = [0] * config.workers
        self.states: list[dict[str, Any]] | None = None  # the shards at the last epoch end
        # Epochs trained but not evaluated yet: (stats, each shard's eval part), in order.
        self.pending: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        self.diverged = False
        self._resume()
        self.shards: list[Any] = []
        self.workers: dict[int, Any] = {}
        self.evaluator: Any = None

    # -- files ---------------------------------------------------------------------------
    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            return
        state = checked_state(load_checkpoint(path), path, self.config.to_dict(), RUNTIME)
        restore(self._load_state, state, path)

    def _load_state(self, state: dict[str, Any]) -> None:
        path = self.out / CHECKPOINT
        launched = (state["servers"], state["deterministic"])
        if launched != (self.options.servers, self.options.deterministic):
            raise DanaError(
                f"{path} was written with --servers {launched[0]}"
                f"{' --deterministic' if launched[1] else ''}: resume with the same, or "
                "delete it to start over"
            )
        self.history = list(state["history"])
        self.diverged = state["diverged"]
        self.restarts = list(state["restarts"])
        self.states = state["shards"]
        self.pending = [(stats, parts) for stats, parts in state["pending"]]

    def _save(self) -> None:
        save_checkpoint(
            self.out / CHECKPOINT,
            {
                "config": self.config.to_dict(),
                "runtime": RUNTIME,
                "servers": self.options.servers,
                "deterministic": self.options.deterministic,
                "history": self.history,
                "pending": self.pending,
                "diverged": self.diverged,
                "restarts": self.restarts,
                "shards": self.states,
            },
        )
        write_json(self.out / RESULT, self._result())
        write_csv(self.out / METRICS, self.history)

    def _result(self) -> dict[str, Any]:
        wall = sum(r["seconds"] for r in self.history)
        coordinator = self.states[0] if self.states else None
        gradients = coordinator["count"] if coordinator else 0
        lags = coordinator["lags"] if coordinator else {}
        finals = self._metrics_of(self.history[-1]) if self.history else {}
        metric = self._metric()
        return {
            "config": self.config.to_dict(),
            "epochs": self.history,
            "final_test_error": finals.get("test_error"),
            "diverged": self.diverged,
            "wall_seconds": wall,
            "finished": self.diverged or len(self.history) >= self.config.epochs,
            "num_classes": self.task.num_classes,
            "metric": metric,
            "lower_is_better": self.task.lower_is_better,
            "final_metric": finals.get(metric) if metric else None,
            "runtime": RUNTIME,
            "servers": self.options.servers,
            "deterministic": self.options.deterministic,
            "throughput": gradients * self.config.batch_size / wall if wall > 0 else None,
            "lag_histogram": {str(lag): lags[lag] for lag in sorted(lags)},
            "updates_per_worker": list(coordinator["master"]["applied"]) if coordinator else [],
            "update_order": list(coordinator.get("order", [])) if coordinator else [],
            "worker_restarts": list(self.restarts),
            "duplicates": sum(s["duplicates"] for s in self.states) if self.states else 0,
        }

    def _finish(self) -> dict[str, Any]:
        if self.states is not None and len(self.history) == self.config.epochs:
            _check_consistent(self.states)
        if not self.diverged and self.states is not None:
            load_master(self.replica, [master_part(s, self.config.algorithm) for s in self.states])
            save_tensors(self.out / MODEL, self.replica.model.state_dict())
        result = self._result()
        write_json(self.out / RESULT, result)
        (self.out / CHECKPOINT).unlink(missing_ok=True)
        return result

    # -- actors --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            self._evaluate_pending()
            if len(self.history) < self.config.epochs and not self.diverged:
                self._check_resources()
                self._start()
                self._train()
            return self._finish()
        finally:
            self._stop()

    def _check_resources(self) -> None:
        available = self.ray.cluster_resources()
        n = self.config.workers
        for name, each in (
            ("CPU", self.options.cpus_per_worker),
            ("GPU", self.options.gpus_per_worker),
        ):
            if n * each > available.get(name, 0.0) + 1e-9:
                raise DanaError(
                    f"{n} workers × {each:g} {name}s need {n * each:g} {name}s but the Ray "
                    f"cluster has {available.get(name, 0.0):g}: lower --{name.lower()}s-per-worker "
                    "or --workers, or add nodes"
                )

    def _start(self) -> None:
        ray, config, options = self.ray, self.config, self.options
        shard_actor = ray.remote(ShardServer).options(num_cpus=0)
        params = self.replica.params.numpy()
        buffers = [b.numpy() for b in self.replica.buffers] or None
        schedule = LRSchedule(
            config.lr,
            config.workers,
            self.steps_per_epoch,
            config.milestones,
            config.decay,
            config.warmup_epochs,
        )
        for k, (lo, hi) in enumerate(shard_bounds(len(params), options.servers)):
            spec = ShardSpec(
                k,
                (lo, hi),
                config.algorithm,
                config.momentum,
                config.weight_decay,
                config.workers,
                schedule,
                self.steps_per_epoch,
                config.epochs,
                self.order,
                publish_bytes=PUBLISH_BYTES if options.transport == "ray" else None,
                rule_options=config.rule_options,
                transport=options.transport,
            )
            if self.states is not None:
                self.shards.append(shard_actor.remote(spec, state=self.states[k]))
            else:
                self.shards.append(
                    shard_actor.remote(
                        spec, params=params[lo:hi], buffers=buffers if k == 0 else None
                    )
                )
        self.evaluator = (
            ray.remote(Evaluator)
            .options(num_cpus=0)
            .remote(config, str(self.root), task=self.user_task)
        )
        for w in range(config.workers):
            self._spawn(w, self.faults.get(w))

    def _spawn(self, w: int, fault: Fault | None) -> None:
        options = self.options
        spec = WorkerSpec(
            self.config,
            str(self.root),
            options.servers,
            self.order,
            options.worker_threads,
            fault,
            self.user_task,
            options.transport,
        )
        actor = (
            self.ray.remote(Worker)
            .options(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker)
            .remote(spec, w, self.shards)
        )
        self.workers[w] = (actor, actor.run.remote())

    def _stop(self) -> None:
        actors = [a for a, _ in self.workers.values()] + self.shards
        actors += [self.evaluator] if self.evaluator is not None else []
        for actor in actors:
            self.ray.kill(actor)
        self.workers, self.shards, self.evaluator = {}, [], None

    # -- the epoch loop ------------------------------------------------------------------
    def _train(self) -> None:
        """Wait for epoch ends, evaluations and worker exits until the last epoch is saved.

        An epoch's end is checkpointed at once (the shards' states, the master to evaluate)
        and evaluated meanwhile; epoch ends come first when several events are ready, so a
        slow evaluation never holds back the checkpoint: a driver killed at any moment
        loses at most the epoch in progress.
        """
        ray = self.ray
        coordinator = self.shards[0]
        epoch = len(self.history) + 1
        waiting = coordinator.wait_epoch.remote(epoch)
        evaluations: list[Any] = []  # in epoch order, as self.pending
        while len(self.history) < self.config.epochs and not self.diverged:
            runs = {ref: w for w, (_, ref) in self.workers.items() if ref is not None}
            pending = ([waiting] if waiting is not None else []) + evaluations[:1] + list(runs)
            [ready], _ = ray.wait(pending, num_returns=1)
            if ready in runs:
                self._worker_exited(runs[ready], ready)
            elif evaluations and ready == evaluations[0]:
                evaluations.pop(0)
                self._evaluated(self._get(ready, "the evaluator"))
            else:
                stats = self._get(ready, "the parameter server")
                if stats.pop("diverged"):
                    for ref in evaluations:  # the epochs before, in order, then this one
                        if not self.diverged:
                            self._evaluated(self._get(ref, "the evaluator"))
                    if not self.diverged:
                        self._diverged(stats)
                    break
                parts = [s.take_snapshot.options(num_returns=2).remote(epoch) for s in self.shards]
                states = self._get([p[1] for p in parts], "the parameter server")
                masters = self._get([p[0] for p in parts], "the parameter server")
                self.states = checkpointable(states)
                self.pending.append((stats, checkpointable(masters)))
                self._save()
                evaluations.append(self.evaluator.evaluate.remote(*(p[0] for p in parts)))
                epoch += 1
                waiting = (
                    coordinator.wait_epoch.remote(epoch) if epoch <= self.config.epochs else None
                )

    def _evaluate_pending(self) -> None:
        """Evaluate (here, in order) the epochs a resumed checkpoint trained but had not
        evaluated yet."""
        if not self.pending:
            return
        import torch

        evaluator = Evaluator(
            self.config, str(self.root), threads=torch.get_num_threads(), task=self.user_task
        )
        while self.pending and not self.diverged:
            self._evaluated(evaluator.evaluate(*self.pending[0][1]))

    def _evaluated(self, metrics: dict[str, float] | None) -> None:
        """The oldest pending epoch's evaluation is in: record it (or the divergence)."""
        stats, _ = self.pending.pop(0)
        if metrics is None:  # non-finite parameters: the loss did not see the last step
            self.pending.clear()
            self._diverged(stats)
            return
        self._append({**stats, **metrics})

    def _diverged(self, stats: dict[str, Any]) -> None:
        self.diverged = True
        if self.task.diverged_metrics is not None:
            metrics = dict(self.task.diverged_metrics)
        else:  # the names the evaluator reported so far, with null values
            metrics = dict.fromkeys(self._metrics_of(self.history[-1]) if self.history else ())
        self._append({**stats, **metrics})

    def _metrics_of(self, record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k not in _LOG_KEYS}

    def _metric(self) -> str | None:
        """The task's primary metric: its ``metric``, else the first one evaluated."""
        if self.task.metric is not None:
            return self.task.metric
        if self.task.eval_data is None and self.user_task is not None:
            return "train_loss"
        names = list(self._metrics_of(self.history[-1])) if self.history else []
        return names[0] if names else None

    def _append(self, record: dict[str, Any]) -> None:
        order = ("epoch", "train_loss", *self._metrics_of(record), "lr", "gap_mean", "lag_mean")
        record = {key: record.get(key) for key in (*order, "seconds")}
        self.history.append(record)
        self._save()
        if self.log:
            print(self._line(record), file=sys.stderr, flush=True)
        if self.on_epoch is not None:
            self.on_epoch(record)

    def _worker_exited(self, w: int, ref: Any) -> None:
        actor, _ = self.workers[w]
        try:
            self.ray.get(ref)
            self.workers[w] = (actor, None)  # told to stop: the budget is spent
            return
        except self.ray.exceptions.RayActorError:
            cause = "its process died"
        except self.ray.exceptions.RayError as err:
            cause = _last_line(err)
        self._check_shards()
        self.restarts[w] += 1
        if self.restarts[w] > self.options.max_restarts:
            raise DanaError(
                f"worker {w} failed {self.restarts[w]} times (last: {cause}); raise "
                "--max-restarts or fix the cause"
            )
        if self.log:
            print(f"[ray] worker {w} failed ({cause}); restarting it", file=sys.stderr, flush=True)
        self.ray.kill(actor)
        self._spawn(w, None)

    def _check_shards(self) -> None:
        self._get([s.ping.remote() for s in self.shards], "the parameter server")

    def _get(self, refs: Any, what: str) -> Any:
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as err:
            epoch = len(self.history)
            raise DanaError(
                f"{what} failed ({_last_line(err)}); run the same command again to resume "
                f"from the checkpoint of epoch {epoch}"
                if epoch
                else f"{what} failed ({_last_line(err)})"
            ) from None

    def _line(self, record: dict[str, Any]) -> str:
        c, loss = self.config, record["train_loss"]
        metric = self._metric()
        shown = metric_text(metric, record.get(metric) if metric else None)
        return (
            f"[ray {c.algorithm} N={c.workers} K={self.options.servers} seed={c.seed}] "
            f"epoch {record['epoch']}/{c.epochs}  loss {'nan' if loss is None else f'{loss:.4f}'}  "
            f"{shown}  lr {record['lr']:.4g}  "
            f"lag {record['lag_mean']:.2f}  {record['seconds']:.1f}s  "
            f"{self.steps_per_epoch * c.batch_size / max(record['seconds'], 1e-9):.0f}"
            + (" img/s" if self.task.num_classes else " samples/s")
            + ("  DIVERGED" if self.diverged else "")
        )


#: Keys of an epoch record that are not metrics.
_LOG_KEYS = ("epoch", "train_loss", "lr", "gap_mean", "lag_mean", "seconds")


def _check_data(config: RunConfig, samples: int, deterministic: bool) -> None:
    """Each worker of a free run needs a full batch in its shard of the data."""
    if config.workers > 1 and not deterministic and samples // config.workers < config.batch_size:
        raise DanaError(
            f"{samples} training samples split over {config.workers} workers leave fewer than "
            f"a batch ({config.batch_size}) per worker: use fewer workers or more samples"
        )


def _check_consistent(states: list[dict[str, Any]]) -> None:
    """At the end every shard has applied the same messages: a bug if not."""
    applied = [s["master"]["applied"] for s in states]
    if any(a != applied[0] for a in applied):
        raise RuntimeError(f"the shards applied different messages per worker: {applied}")


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
