"""``launch``: one run of a :class:`RunConfig` as a real parameter server on Ray.

Actors: K parameter-server shards (:class:`~dana.runtime.server.ShardServer`, shard 0 the
coordinator), N workers (:class:`~dana.runtime.worker.Worker`, each with its own model
replica and data) and one :class:`~dana.runtime.evaluator.Evaluator`. The driver (this
module) starts them, restarts failed workers, evaluates and checkpoints every epoch and
writes ``OUT/result.json``; it is not on the path of any update.

Files in ``OUT`` (all written atomically):

- ``result.json``: the schema of ``dana run`` (:func:`dana.training.run.result_record`)
  plus ``runtime: "ray"``, ``servers``, ``deterministic``, ``throughput`` (samples/s over
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

import contextlib
import logging
import math
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
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
    save_model,
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

#: How often the progress bar asks the coordinator how far the run is.
PROGRESS_SECONDS = 0.5

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
            (
                visible_on_ray(config.device, self.gpus_per_worker),
                f"--device {config.device}: a worker sees only its own GPU(s) (Ray sets "
                f"CUDA_VISIBLE_DEVICES), so use --device cuda",
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
    progress: bool | None = None,
    ray_logs: bool = False,
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
        address: an existing Ray cluster (``"auto"``, ``"HOST:PORT"``,
            ``"ray://host:10001"``); ``None`` or ``"local"`` uses the current Ray connection
            or starts a local Ray instance.
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
        progress: a progress bar of the updates (updates/s, lag, ETA) that moves within
            an epoch; ``None``: only on a terminal.
        ray_logs: show Ray's own log lines and the actors' output (hidden by default).
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
        started = connect(ray, address, ray_logs=ray_logs)
        try:
            return _Launch(
                ray, config, task, options, out, root, faults, on_epoch, log, progress
            ).run()
        finally:
            if started:
                ray.shutdown()
    finally:
        release_folder(out)


def visible_on_ray(device: str, gpus: float) -> bool:
    """Whether a Ray worker or task given ``gpus`` GPUs can use ``device``: Ray sets its
    ``CUDA_VISIBLE_DEVICES`` to those alone, so ``cuda:K`` needs K < their number."""
    kind, _, index = device.partition(":")
    k = int(index) if kind == "cuda" and index.isdigit() else 0
    return k < max(1, math.ceil(gpus))


#: Seconds to wait for a TCP connection to a cluster's address before calling it unreachable.
CONNECT_SECONDS = 5.0
#: Seconds ``ray.init`` may take to join a cluster whose address answers.
CONNECT_DEADLINE = 15.0


def connect(ray: Any, address: str | None, *, ray_logs: bool = False) -> bool:
    """Connect to Ray; return whether this call started it (and must shut it down).

    An address that does not accept a TCP connection within :data:`CONNECT_SECONDS` is a
    one-line :class:`DanaError` at once (Ray itself retries for a minute or more), and one
    that accepts it but is no Ray cluster that answers within :data:`CONNECT_DEADLINE` is
    one then (``ray.init`` is left to fail in a daemon thread). Ray's own
    log lines (its Python logger's warnings, the actors' and tasks' output) are kept out of
    the user's output unless ``ray_logs``. (``RAY_BACKEND_LOG_LEVEL`` would quiet its C++
    core too, but announces itself with a line of its own.)
    """
    if ray.is_initialized():
        return False
    address = None if address == "local" else address
    level = logging.INFO if ray_logs else logging.ERROR
    if address is None:
        options = {"logging_level": level, "log_to_driver": ray_logs}
        _init(ray, "localhost", include_dashboard=False, **options)
        return True
    where = address
    _check_reachable(address)
    # Ray retries a GCS that does not answer once a second for 20 s (this shortens it), and
    # each try may itself wait: a thread bounds the whole (the CLI exits right after).
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(int(CONNECT_SECONDS)))
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            _init(ray, where, address=address, logging_level=level, log_to_driver=ray_logs)
            outcome.append(None)
        except BaseException as err:  # handed to the caller's thread
            outcome.append(err)

    thread = threading.Thread(target=attempt, name="dana-ray-connect", daemon=True)
    thread.start()
    thread.join(CONNECT_DEADLINE)
    if not outcome:
        raise DanaError(
            f"the Ray cluster at {address} did not answer within {CONNECT_DEADLINE:g} s: check "
            "that `ray start` runs there (and --address names its GCS port, 6379 by default)"
        )
    if outcome[0] is not None:
        raise outcome[0]
    return True


def _init(ray: Any, where: str, **options: Any) -> None:
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise DanaError(f"cannot start or reach Ray at {where}: {last_line(err)}") from None


def _check_reachable(address: str) -> None:
    """A one-line error when ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) does
    not accept a TCP connection within :data:`CONNECT_SECONDS`."""
    where = address.removeprefix("ray://")
    if where == "auto":
        try:  # the cluster `ray start` recorded on this machine (Ray's own look-up)
            from ray._private.services import canonicalize_bootstrap_address

            where = canonicalize_bootstrap_address("auto") or ""
        except ImportError:  # another Ray version: let ray.init find it
            return
        except ConnectionError:
            raise DanaError(
                "--address auto: no Ray cluster was started on this machine: start one with "
                "`ray start --head`, or give --address HOST:PORT"
            ) from None
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise DanaError(
            f"--address {address!r} is not auto, HOST:PORT or ray://HOST:PORT: "
            "e.g. --address 10.0.0.1:6379"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        why = (
            f"no answer within {CONNECT_SECONDS:g} s"
            if isinstance(err, TimeoutError)
            else (err.strerror or str(err)).lower()
        )
        raise DanaError(
            f"cannot reach the Ray cluster at {address} ({why}): "
            "check that `ray start` runs there and that the port is open"
        ) from None


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
        progress: bool | None = None,
    ) -> None:
        self.ray = ray
        self.config = config
        self.options = options
        self.out = out
        self.root = root
        self.faults = {f.worker: f for f in faults}
        self.on_epoch = on_epoch
        self.log = log
        self.show_progress = sys.stderr.isatty() if progress is None else progress
        self.bar: Any = None  # the progress bar while training
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
        self.server_restarts = 0  # shards failed and restarted from the checkpoint
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
            "server_restarts": self.server_restarts,
            "duplicates": sum(s["duplicates"] for s in self.states) if self.states else 0,
        }

    def _finish(self) -> dict[str, Any]:
        if self.states is not None and len(self.history) == self.config.epochs:
            _check_consistent(self.states)
        if not self.diverged and self.states is not None:
            load_master(self.replica, [master_part(s, self.config.algorithm) for s in self.states])
            save_model(self.out / MODEL, self.replica.model)
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
            with self._progress_bar():
                while len(self.history) < self.config.epochs and not self.diverged:
                    self._start()
                    try:
                        self._train()
                    except _ServerLost as lost:
                        self._restart_server(lost.cause)
            return self._finish()
        finally:
            self._stop()

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[None]:
        """The bar of updates applied (all workers), moved every :data:`PROGRESS_SECONDS`
        from the coordinator's count: rate, ETA and the epoch's mean lag."""
        from tqdm import tqdm

        c = self.config
        self.bar = tqdm(
            total=c.epochs * self.steps_per_epoch,
            initial=self.states[0]["count"] if self.states else 0,
            unit="update",
            desc=f"ray {c.algorithm} N={c.workers} K={self.options.servers}",
            dynamic_ncols=True,
            leave=False,
            disable=not self.show_progress,
        )
        try:
            with self.bar:
                yield
        finally:
            self.bar = None

    def _show_progress(self) -> None:
        if self.bar is None or self.bar.disable:
            return
        count, lag = self._get(self.shards[0].progress.remote(), "the parameter server")
        epoch = min(count // self.steps_per_epoch + 1, self.config.epochs)
        self.bar.n = count
        self.bar.set_postfix_str(f"epoch {epoch}/{self.config.epochs}, lag {lag:.2f}")

    def _say(self, line: str) -> None:
        """A line on stderr, above the progress bar when there is one."""
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def _restart_server(self, cause: str) -> None:
        """A shard died: restart the whole server (every shard, the workers, the evaluator)
        from the last checkpoint, as a rerun of the launch would; the epoch in progress is
        redone. At most ``max_restarts`` times."""
        self.server_restarts += 1
        epoch = len(self.history) + len(self.pending)  # the checkpoint's epoch
        if self.server_restarts > self.options.max_restarts:
            raise DanaError(
                f"the parameter server failed {self.server_restarts} times (last: {cause}); "
                f"run the same command again to resume from the checkpoint of epoch {epoch}"
            )
        lost = self._applied_now() - (self.states[0]["count"] if self.states else 0)
        since = f"the checkpoint of epoch {epoch}" if epoch else "the start"
        if self.log:
            self._say(
                f"[ray] a parameter-server shard failed ({cause}); restarting the server from "
                f"{since}: {f'{lost} updates' if lost > 0 else 'the updates'} since are redone"
            )
        self._stop()
        self._evaluate_pending()

    def _applied_now(self) -> int:
        """Gradients the surviving shards had applied (0 if none answers at once)."""
        refs = [s.ping.remote() for s in self.shards]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=1.0)
        counts = []
        for ref in ready:
            with contextlib.suppress(self.ray.exceptions.RayError):
                counts.append(self.ray.get(ref))
        return max(counts, default=0)

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
            ready_list, _ = ray.wait(pending, num_returns=1, timeout=self._poll_seconds())
            if not ready_list:
                self._show_progress()
                continue
            [ready] = ready_list
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

    def _poll_seconds(self) -> float | None:
        return PROGRESS_SECONDS if self.bar is not None and not self.bar.disable else None

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
            self._say(self._line(record))
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
            cause = last_line(err)
        self._check_shards()
        self.restarts[w] += 1
        if self.restarts[w] > self.options.max_restarts:
            raise DanaError(
                f"worker {w} failed {self.restarts[w]} times (last: {cause}); raise "
                "--max-restarts or fix the cause"
            )
        if self.log:
            self._say(f"[ray] worker {w} failed ({cause}); restarting it")
        self.ray.kill(actor)
        self._spawn(w, None)

    def _check_shards(self) -> None:
        self._get([s.ping.remote() for s in self.shards], "the parameter server")

    def _get(self, refs: Any, what: str) -> Any:
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayActorError as err:
            if what == "the parameter server":  # a shard died: restart the server
                raise _ServerLost(last_line(err)) from None
            raise self._failed(what, err) from None
        except self.ray.exceptions.RayError as err:
            raise self._failed(what, err) from None

    def _failed(self, what: str, err: BaseException) -> DanaError:
        epoch = len(self.history)
        return DanaError(
            f"{what} failed ({last_line(err)}); run the same command again to resume "
            f"from the checkpoint of epoch {epoch}"
            if epoch
            else f"{what} failed ({last_line(err)})"
        )

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


class _ServerLost(Exception):
    """A parameter-server shard died (its process, or its node): ``cause`` says how."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


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


def last_line(err: BaseException) -> str:
    """The last non-empty line of an error's text (Ray's carry a traceback first)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
