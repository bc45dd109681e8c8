"""``dana sweep --address``: a sweep's runs as Ray tasks on a cluster, results shipped back.

Each run of the grid is one Ray task with its own resources (``cpus_per_run``,
``gpus_per_run``) that calls :func:`dana.training.run_experiment` in a temporary folder on
the node Ray places it on. No shared filesystem is assumed: at every epoch end the task
sends its folder's files (``checkpoint.pt``, ``result.json``, ``metrics.csv``) to a mailbox
actor, and at its end ``model.pt`` and the final ``result.json``; the driver takes them
from the mailbox every ``poll_seconds`` and writes them atomically (:mod:`dana.training.io`)
into the run's folder under the sweep's ``--out``, on the driver's machine, which holds the
folders' locks meanwhile. So the driver's folders are always a valid, resumable sweep: the
progress bar reads them as for a local sweep, and a later local sweep can finish them.

A task that dies (its process killed, its node lost) is retried by Ray (``max_retries``;
system failures only, ``retry_exceptions=False``: a run that raises is a failed run, as in
a local sweep). The new attempt, on any node, asks the mailbox for the run's last shipped
files and resumes from its last checkpoint, so at most the epoch in progress is redone;
files that an earlier attempt of the same run still sends are ignored (every attempt is
numbered). If the driver itself dies, the runs resume from what it wrote, on the next
``dana sweep``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dana.errors import DanaError
from dana.runtime.driver import connect, last_line, require_ray, visible_on_ray
from dana.training.config import RunConfig
from dana.training.folder import CHECKPOINT, RESULT, FolderBusy, claim_folder, release_folder
from dana.training.io import write_bytes
from dana.training.run import METRICS, MODEL

if TYPE_CHECKING:
    from dana.experiments.sweep import SweepSummary

#: Shipped at every epoch end, in this order (the checkpoint first, as the run writes it).
EPOCH_FILES = (CHECKPOINT, RESULT, METRICS)
#: Shipped at the end (then the checkpoint is deleted, as the run does).
FINAL_FILES = (MODEL, RESULT, METRICS)

#: (name, bytes) to write, or (name, None) to delete, in order.
Files = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how a sweep's runs execute on Ray.

    Attributes:
        address: the cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``); ``None`` or
            ``local`` starts a local Ray instance (or uses the current connection).
        cpus_per_run, gpus_per_run: the Ray resources of each run's task.
        threads: PyTorch threads of each run (default: its CPUs, at least 1).
        max_requeues: times a run whose task died is retried (Ray's ``max_retries``).
        ray_logs: show Ray's own log lines and the tasks' output.
        kill_after: (testing) run name → epoch after whose shipment the run's first
            attempt kills its own process with SIGKILL.
    """

    address: str | None = "auto"
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    threads: int | None = None
    max_requeues: int = 3
    ray_logs: bool = False
    kill_after: dict[str, int] = field(default_factory=dict, hash=False)

    def validated(self, configs: list[RunConfig]) -> ClusterOptions:
        checks = [
            (self.cpus_per_run >= 0, "--cpus-per-run must be >= 0"),
            (self.gpus_per_run >= 0, "--gpus-per-run must be >= 0"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (self.max_requeues >= 0, "--max-requeues must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise DanaError(message)
        cuda = next((c.device for c in configs if c.device.startswith("cuda")), None)
        if cuda is not None and self.gpus_per_run <= 0:
            raise DanaError(f"--device {cuda} on Ray needs --gpus-per-run > 0")
        if cuda is not None and not visible_on_ray(cuda, self.gpus_per_run):
            raise DanaError(
                f"--device {cuda}: a run on Ray sees only its own GPU(s) (Ray sets "
                "CUDA_VISIBLE_DEVICES), so use --device cuda"
            )
        return self

    @property
    def run_threads(self) -> int:
        return self.threads or max(1, int(self.cpus_per_run))


class Mailbox:
    """An actor between the tasks and the driver: the files each run shipped last (what a
    new attempt resumes from) and those the driver has not written yet."""

    def __init__(self, latest: dict[str, dict[str, bytes]]) -> None:
        self.latest = latest  # run -> {name: bytes}
        self.attempts: dict[str, int] = {}
        self.outbox: list[tuple[str, Files]] = []

    def start(self, run: str) -> tuple[int, dict[str, bytes]]:
        """A new attempt of ``run``: its number (1, 2, …) and the files to resume from."""
        attempt = self.attempts.get(run, 0) + 1
        self.attempts[run] = attempt
        return attempt, dict(self.latest.get(run, {}))

    def put(self, run: str, attempt: int, files: Files, final: bool = False) -> bool:
        """Files of ``run`` from ``attempt``; ignored (``False``) from a superseded one."""
        if attempt != self.attempts.get(run):
            return False
        latest = self.latest.setdefault(run, {})
        for name, data in files:
            if data is None:
                latest.pop(name, None)
            else:
                latest[name] = data
        if final:
            self.latest.pop(run, None)
        self.outbox.append((run, files))
        return True

    def take(self) -> tuple[list[tuple[str, Files]], dict[str, int]]:
        """The files shipped since the last call, in order, and every run's attempts."""
        out, self.outbox = self.outbox, []
        return out, dict(self.attempts)


def read_files(folder: Path, names: tuple[str, ...]) -> Files:
    """The files of ``names`` that exist in ``folder``, as (name, bytes), in order."""
    return [(name, (folder / name).read_bytes()) for name in names if (folder / name).exists()]


def run_task(
    run: str,
    config: RunConfig,
    mailbox: Any,
    data_dir: str | None,
    threads: int,
    kill_after: int | None = None,
) -> bool:
    """One run, as a Ray task: resume from the mailbox's files, ship each epoch's files,
    then the final ones; return whether the run diverged."""
    import ray
    import torch

    from dana.training import run_experiment

    torch.set_num_threads(threads)
    attempt, files = ray.get(mailbox.start.remote(run))
    remove_orphaned_run_folders()
    with tempfile.TemporaryDirectory(prefix=f"{RUN_FOLDER_PREFIX}{os.getpid()}-") as tmp:
        out = Path(tmp)
        for name, data in files.items():
            (out / name).write_bytes(data)

        def ship(record: dict[str, Any]) -> None:
            ray.get(mailbox.put.remote(run, attempt, read_files(out, EPOCH_FILES)))
            if attempt == 1 and record["epoch"] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        try:
            result = run_experiment(
                config, out, data_dir=data_dir, progress=False, log=False, on_epoch=ship
            )
        finally:
            release_folder(out)
        final: Files = [*read_files(out, FINAL_FILES), (CHECKPOINT, None)]
        ray.get(mailbox.put.remote(run, attempt, final, final=True))
    return bool(result["diverged"])


#: A task's run folder in its node's temporary directory: ``dana-run-PID-XXXX``.
RUN_FOLDER_PREFIX = "dana-run-"


def remove_orphaned_run_folders(root: str | Path | None = None) -> list[Path]:
    """Delete the run folders of tasks that died without cleaning up (a SIGKILLed task or
    node process leaves its folder: checkpoints, N copies of a model); a task calls this
    as it starts. A folder is an orphan when the process named in it is gone. Returns the
    folders deleted."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{RUN_FOLDER_PREFIX}*-*"):
        pid = folder.name[len(RUN_FOLDER_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or not folder.is_dir() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def run_on_ray(
    pending: dict[Path, RunConfig],
    options: ClusterOptions,
    summary: SweepSummary,
    *,
    data_dir: str | Path | None,
    refresh: Callable[[], None],
    poll_seconds: float = 1.0,
) -> None:
    """Run every config of ``pending`` (folder → config) as a Ray task; record the
    outcomes in ``summary`` (``requeued``: runs whose task died and was retried), calling
    ``refresh`` after the files of each poll are written."""
    from dana.data import resolve_data_dir

    options = options.validated(list(pending.values()))
    ray = require_ray()
    started = connect(ray, options.address, ray_logs=options.ray_logs)
    claimed: list[Path] = []
    refs: dict[Any, Path] = {}
    mailbox = None
    try:
        _check_resources(ray, options)
        for folder in pending:
            try:
                claim_folder(folder)  # the driver writes it: another sweep must not
            except FolderBusy:
                summary.busy.append(folder)
                continue
            claimed.append(folder)
        if not claimed:
            return
        mailbox = _start_mailbox(ray, {str(f): dict(read_files(f, EPOCH_FILES)) for f in claimed})
        task = ray.remote(run_task).options(
            num_cpus=options.cpus_per_run,
            num_gpus=options.gpus_per_run,
            max_retries=options.max_requeues,
            retry_exceptions=False,
        )
        # The data folder, as the driver resolves it: it must exist on every node.
        root = str(resolve_data_dir(data_dir).expanduser().resolve())
        for folder in claimed:
            config = pending[folder]
            kill = options.kill_after.get(config.run_name)
            ref = task.remote(str(folder), config, mailbox, root, options.run_threads, kill)
            refs[ref] = folder
        waiting = list(refs)
        attempts: dict[str, int] = {}
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=poll_seconds)
            attempts = _deliver(ray, mailbox)
            for ref in done:
                _record(ray, ref, refs[ref], summary, attempts.get(str(refs[ref]), 1))
            refresh()
        summary.requeued.extend(f for f in claimed if attempts.get(str(f), 1) > 1)
    except BaseException:
        for ref in refs:  # Ctrl-C (or a bug): stop the runs; each resumes from its files
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        with contextlib.suppress(Exception):  # what was shipped meanwhile
            _deliver(ray, mailbox)
        raise
    finally:
        for folder in claimed:
            release_folder(folder)
        if mailbox is not None:
            ray.kill(mailbox)
        if started:
            ray.shutdown()


def _start_mailbox(ray: Any, latest: dict[str, dict[str, bytes]]) -> Any:
    """The mailbox actor, on the driver's node: the files come here, and on another node
    it would die with that node and take the sweep with it. (A soft affinity is not
    enough: Ray spills it to another node when the driver's is briefly busy.)"""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(here, soft=False)
    return ray.remote(Mailbox).options(num_cpus=0, scheduling_strategy=strategy).remote(latest)


def _deliver(ray: Any, mailbox: Any) -> dict[str, int]:
    """Write the files shipped since the last call; return every run's attempts."""
    shipped, attempts = ray.get(mailbox.take.remote())
    for run, files in shipped:
        folder = Path(run)
        for name, data in files:
            if data is None:
                (folder / name).unlink(missing_ok=True)
            else:
                write_bytes(folder / name, data)
    return attempts


def _record(ray: Any, ref: Any, folder: Path, summary: SweepSummary, attempts: int) -> None:
    try:
        diverged = ray.get(ref)
    except ray.exceptions.RayTaskError as err:  # the run raised: a failed run
        cause = getattr(err, "cause", None)
        if isinstance(cause, DanaError):
            summary.failed[folder] = str(cause)
        else:
            summary.failed[folder] = last_line(err)
        return
    except ray.exceptions.RayError as err:  # its task died more than max_requeues times
        summary.failed[folder] = (
            f"its Ray task died {attempts} time(s) ({last_line(err)}); run the same command "
            "again to resume it from its last epoch"
        )
        return
    (summary.diverged if diverged else summary.finished).append(folder)


def _check_resources(ray: Any, options: ClusterOptions) -> None:
    """A run must fit on one node: else Ray would leave it pending for ever."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for name, each in (("CPU", options.cpus_per_run), ("GPU", options.gpus_per_run)):
        largest = max((n.get(name, 0.0) for n in nodes), default=0.0)
        if each > largest + 1e-9:
            raise DanaError(
                f"a run asks for {each:g} {name}s but the largest node of the Ray cluster has "
                f"{largest:g}: lower --{name.lower()}s-per-run, or add such a node"
            )
