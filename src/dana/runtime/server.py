"""One shard of the parameter server: the rule's master step on a slice of the flat buffer.

Every rule is elementwise on the flat parameter buffer (DANA-Zero's running sum and SSGD's
accumulation included), so shard ``k`` of ``K`` runs the *same* rule object on its slice
``[lo, hi)`` and the concatenation of the shards is, update for update, the unsharded
master. Shard 0 is the *coordinator*: it also keeps what is not per element — the lag
histogram, the worker of every update (the order, for replay in the simulator), the loss,
the BatchNorm statistics of the last applied message ("last writer wins", as the simulator)
and the *grants* that decide who may compute another gradient.

Exactly-once bookkeeping: a worker numbers its messages 0, 1, 2, … (``seq``). A shard
applies message ``seq`` of worker ``w`` only if it has applied exactly ``seq`` messages of
``w`` before (``MasterState.applied``, which the rule counts); an older ``seq`` is a retry
and is answered without being applied; a newer one means a message was lost and is an
error. A worker may only send message ``seq`` if the coordinator granted it (``seq <
granted[w]``); the grants add up to the run's gradient budget, so every shard applies the
same messages and the run stops at exactly ``epochs × steps_per_epoch`` gradients.

:class:`ShardServer` is a plain class with ``async`` methods (the Ray actor is this class
under ``ray.remote``; tests drive it with ``asyncio``). A coroutine never awaits inside an
update, so updates are atomic without locks; waiting (SSGD's round, a deterministic turn,
the end of an epoch) is a future resolved when the awaited condition becomes true.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dana.rules import MasterState, make_rule
from dana.simulation import make_scheduler
from dana.training.schedule import LRSchedule


@dataclass(frozen=True)
class Order:
    """The simulator's order of updates, imposed on a real run (``deterministic`` mode).

    The server applies message ``c`` (0-based, all workers together) from the worker the
    simulator's scheduler names ``c``-th; worker ``w``'s ``j``-th message is computed on
    the batch the simulator's ``c``-th gradient uses. With the same config, a launch then
    reproduces ``dana run`` to float tolerance (and is as slow as its slowest worker).
    """

    schedule: str
    workers: int
    seed: int
    batch_size: int
    synchronous: bool

    def turns(self, total: int) -> list[int]:
        """The worker of each of the ``total`` updates, in the order they are applied."""
        scheduler = make_scheduler(
            self.schedule,
            self.workers,
            seed=self.seed,
            batch_size=self.batch_size,
            synchronous=self.synchronous,
        )
        return [scheduler.next_worker() for _ in range(total)]


@dataclass(frozen=True)
class ShardSpec:
    """What a shard needs to know (all of it picklable).

    Attributes:
        index: k, the shard number; shard 0 is the coordinator.
        bounds: ``(lo, hi)``, the shard's slice of the flat parameter buffer.
        algorithm, momentum, weight_decay: the rule (:func:`dana.rules.make_rule`).
        workers: N.
        schedule: the learning rate as a function of gradients applied (all workers).
        steps_per_epoch: gradients per epoch (all workers together).
        epochs: length of the run; the gradient budget is ``epochs × steps_per_epoch``.
        order: the imposed order of updates, or ``None`` for a free asynchronous run.
        threads: PyTorch threads of the shard's process.
        publish_bytes: replies of at least this size are put once into Ray's object store
            by the shard, and the reply carries the reference (``None``: never; the shard
            runs without Ray). This saves a copy per update, and ``ssgd``'s N workers
            share one object per round.
        rule_options: the rule's extra hyperparameters (:func:`dana.rules.make_rule`).
        transport: the data plane workers reach the shard by
            (:data:`dana.runtime.transport.TRANSPORTS`): with ``"direct"`` replies are
            published into a shared-memory arena (:class:`~dana.runtime.transport.Arena`).
    """

    index: int
    bounds: tuple[int, int]
    algorithm: str
    momentum: float
    weight_decay: float
    workers: int
    schedule: LRSchedule
    steps_per_epoch: int
    epochs: int
    order: Order | None = None
    threads: int = 1
    publish_bytes: int | None = None
    rule_options: dict[str, float] = field(default_factory=dict, hash=False)
    transport: str = "ray"

    @property
    def total(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def coordinator(self) -> bool:
        return self.index == 0


@dataclass
class Reply:
    """A shard's answer to a worker.

    Attributes:
        params: the shard's slice of the parameters the worker computes at next (or a Ray
            reference to it, see :attr:`ShardSpec.publish_bytes`). Never modified after it
            is made (a fresh object per update), so it is safe to send.
        stamp: the number of master updates (replies) made so far: the worker sends it
            back with its next message, and the lag of that message is measured from it.
        go: (coordinator) the worker may compute another gradient.
        applied: messages of this worker the shard has applied (its next ``seq``).
        buffers: (coordinator, on join) the BatchNorm statistics of the last writer.
    """

    params: Any  # np.ndarray | ray.ObjectRef
    stamp: int
    go: bool
    applied: int
    buffers: list[np.ndarray] | None = None


def shard_bounds(size: int, shards: int) -> list[tuple[int, int]]:
    """Split ``range(size)`` into ``shards`` contiguous slices differing by at most one."""
    edges = [size * k // shards for k in range(shards + 1)]
    return list(itertools.pairwise(edges))


class ShardServer:
    """One shard of the parameter server (see the module docstring).

    Args:
        spec: the shard's configuration.
        params: the initial parameters of the shard's slice (fresh start), flat.
        buffers: (coordinator, fresh start) the model's initial BatchNorm statistics.
        state: a :meth:`state` to resume from instead of ``params``/``buffers``.
    """

    def __init__(
        self,
        spec: ShardSpec,
        *,
        params: np.ndarray | None = None,
        buffers: list[np.ndarray] | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        torch.set_num_threads(spec.threads)
        # Messages arrive as read-only views of Ray's shared memory; the rules only read
        # them, so the copy torch suggests would be waste.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.spec = spec
        self.rule = make_rule(
            spec.algorithm,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            **spec.rule_options,
        )
        self.turns = spec.order.turns(spec.total) if spec.order is not None else None
        if spec.transport == "direct":
            from dana.runtime.transport import make_arena

            self.arena = make_arena(spec.workers)
        else:
            self.arena = None
        self._publish = (
            self.arena.publish if self.arena is not None else _publisher(spec.publish_bytes)
        )
        # A rule that can write its new θ out of place writes it into a free arena slot:
        # that slot is then the reply, with no copy to publish it.
        self._into = (
            self.arena is not None and "out" in inspect.signature(self.rule.master_step).parameters
        )
        self._endpoint: dict[str, Any] | None = None
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._epoch_started: float | None = None  # None until every worker has joined
        self._joined: set[int] = set()
        self.snapshots: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        self.epoch_stats: dict[int, dict[str, Any]] = {}
        if state is None:
            if params is None:
                raise ValueError("a shard needs its initial params or a state to resume from")
            self._fresh(torch.as_tensor(np.asarray(params)), buffers)
        else:
            self._restore(state)
        self._dtype = self.master.params.numpy().dtype
        self._reset_epoch_stats()

    # -- state ---------------------------------------------------------------------------
    def _fresh(self, params: Tensor, buffers: list[np.ndarray] | None) -> None:
        workers = self.spec.workers
        self.master: MasterState = self.rule.init_master(params, workers)
        self.count = 0  # gradients applied, all workers together
        self.updates = 0  # replies made: the stamp (differs from count for ssgd)
        self.last_reply = self._publish(self.master.params.numpy())  # θ₀ (θ̂₀ = θ₀ too)
        # Deterministic runs: what each worker holds, as in the simulator, so that a worker
        # that starts late (or again) computes where the simulator's would.
        self.held = [(self.last_reply, 0)] * workers if self.turns is not None else None
        self.round_members: set[int] = set()  # ssgd: workers in the pending round
        self.duplicates = 0
        self.diverged = False
        self.lags: Counter[int] = Counter()
        self.order: list[int] = []  # (coordinator) the worker of each applied update
        # BatchNorm statistics each worker last sent (small); evaluation uses the last
        # writer's, and a restarted worker continues with its own.
        initial = [np.array(b) for b in buffers] if buffers is not None else None
        self.worker_buffers = [initial] * workers if initial is not None else None
        self.last_writer = 0
        # Grants: in a free run they are handed out as workers finish, up to the budget;
        # in an ordered run each worker's quota is known in advance.
        self.granted = (
            [self.turns.count(w) for w in range(workers)]
            if self.turns is not None
            else [0] * workers
        )

    def state(self) -> dict[str, Any]:
        """Everything needed to resume this shard (the master state's tensors are copies).

        Replies and statistics are never modified once made, so they are shared, not
        copied; a published reply is a Ray reference (see :func:`checkpointable`).
        """
        master = {f.name: _clone(getattr(self.master, f.name)) for f in fields(self.master)}
        return {
            "master": master,
            "count": self.count,
            "updates": self.updates,
            "last_reply": self.last_reply,
            "held": list(self.held) if self.held is not None else None,
            "round_members": sorted(self.round_members),
            "duplicates": self.duplicates,
            "diverged": self.diverged,
            "lags": dict(self.lags),
            "order": list(self.order),
            "worker_buffers": list(self.worker_buffers) if self.worker_buffers else None,
            "last_writer": self.last_writer,
            "granted": list(self.granted),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.master = MasterState(**state["master"])
        self.count = state["count"]
        self.updates = state["updates"]
        self.last_reply = self._publish(_array(state["last_reply"]))
        held = state["held"]
        self.held = (
            [(self._publish(_array(p)), stamp) for p, stamp in held] if held is not None else None
        )
        self.round_members = set(state["round_members"])
        self.duplicates = state["duplicates"]
        self.diverged = state["diverged"]
        self.lags = Counter(state["lags"])
        self.order = list(state.get("order", []))
        buffers = state["worker_buffers"]
        self.worker_buffers = (
            [[_array(b).copy() for b in bs] for bs in buffers] if buffers is not None else None
        )
        self.last_writer = state["last_writer"]
        self.granted = list(state["granted"])

    @property
    def buffers(self) -> list[np.ndarray] | None:
        """The BatchNorm statistics the master evaluates with: the last writer's."""
        return self.worker_buffers[self.last_writer] if self.worker_buffers is not None else None

    # -- the worker-facing methods -----------------------------------------------------
    async def join(self, worker: int) -> Reply:
        """A worker (new or restarted) asks where to start: params, stamp, its next ``seq``.

        The first joins of a launch wait until all N workers have joined the coordinator.
        For ``ssgd``, a worker whose message is in the pending round gets the round's
        result, as it would have without restarting.
        """
        if self.spec.coordinator and self._epoch_started is None:
            # Start together: a worker that is ready first would otherwise train alone
            # while the others load their data. The clock starts then.
            self._joined.add(worker)
            self._wake()
            await self._until(lambda: len(self._joined) == self.spec.workers)
            if self._epoch_started is None:
                self._epoch_started = time.perf_counter()
        await self._until(lambda: worker not in self.round_members)
        reply = self._reply(worker)
        if self.worker_buffers is not None:
            reply.buffers = self.worker_buffers[worker]
        return reply

    async def push(
        self,
        worker: int,
        seq: int,
        stamp: int,
        message: np.ndarray,
        loss: float,
        buffers: list[np.ndarray] | None = None,
    ) -> Reply:
        """Apply message ``seq`` of ``worker`` (its slice of the message) and answer it.

        Args:
            stamp: the stamp of the reply the worker computed this message at.
            loss: the loss of the batch (the coordinator averages it per epoch and stops
                the run when it is not finite).
            buffers: (coordinator) the worker's BatchNorm statistics after this batch.
        """
        if self.turns is not None and seq >= self.master.applied[worker]:
            await self._until(
                lambda: self.count >= len(self.turns) or self.turns[self.count] == worker
            )
        applied = self.master.applied[worker]
        if seq < applied:  # a retry of a message already applied: never apply twice
            self.duplicates += 1
            return self._reply(worker)
        where = f"shard {self.spec.index}: worker {worker} sent message {seq}"
        if seq > applied:
            raise RuntimeError(f"{where} but {applied} were applied: a message was lost")
        if self.count >= self.spec.total or (self.spec.coordinator and seq >= self.granted[worker]):
            raise RuntimeError(f"{where} without a grant ({self.granted[worker]} granted)")
        before = self.updates
        self._apply(worker, stamp, torch.from_numpy(np.asarray(message)), loss, buffers)
        await self._until(lambda: self.updates > before)  # ssgd: the round's result
        return self._reply(worker)

    # -- the driver-facing methods -----------------------------------------------------
    async def wait_epoch(self, epoch: int) -> dict[str, Any]:
        """(Coordinator) the statistics of 1-based ``epoch`` once its last gradient is
        applied; early, with ``diverged: True``, if a non-finite loss stops the run."""
        await self._until(lambda: epoch in self.epoch_stats or self.diverged)
        if epoch in self.epoch_stats:
            return self.epoch_stats.pop(epoch)
        return self._epoch_record(epoch, time.perf_counter())

    async def take_snapshot(self, epoch: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The shard at the end of ``epoch``: ``(eval, state)``.

        ``eval`` holds the master's parameters (θ, or Θ for ``dana``) of the slice and, on
        the coordinator, the last writer's BatchNorm statistics; ``state`` is
        :meth:`state` at that moment, for the checkpoint.
        """
        await self._until(lambda: epoch in self.snapshots)
        return self.snapshots.pop(epoch)

    async def endpoint(self) -> dict[str, Any]:
        """Where workers connect for the ``"direct"`` and ``"tcp"`` transports (the shard
        starts listening on the first call): :func:`dana.runtime.transport.start_serving`."""
        if self._endpoint is None:
            from dana.runtime.transport import start_serving

            self._endpoint = start_serving(self)
        return self._endpoint

    async def ping(self) -> int:
        """Gradients applied so far (the driver's liveness check)."""
        return self.count

    async def progress(self) -> tuple[int, float]:
        """(Coordinator) gradients applied so far and the mean lag of the epoch in
        progress (the driver's progress bar)."""
        return self.count, self._lag_sum / max(self._steps, 1)

    # -- internals -----------------------------------------------------------------------
    def _apply(
        self,
        worker: int,
        stamp: int,
        message: Tensor,
        loss: float,
        buffers: list[np.ndarray] | None,
    ) -> None:
        lag = self.updates - stamp
        lr = self.spec.schedule(self.count)
        reply, published = self._master_step(message, worker, lr)
        self.count += 1
        if reply is None and self.count == self.spec.total:  # ssgd's last, partial round
            reply = self.rule.flush(self.master, lr)
        if reply is not None:
            self._deliver(reply, worker, published)
        else:
            self.round_members.add(worker)
        if self.spec.coordinator:
            self._record(worker, lag, loss, lr, buffers)
        if self.count % self.spec.steps_per_epoch == 0:
            self._end_epoch(self.count // self.spec.steps_per_epoch)
        self._wake()

    def _master_step(
        self, message: Tensor, worker: int, lr: float
    ) -> tuple[Tensor | None, np.ndarray | None]:
        """The rule's step; and the arena slot the reply was written into, if it was."""
        if not self._into:
            return self.rule.master_step(self.master, message, worker, lr), None
        params = self.master.params
        slot = self.arena.reserve(self._dtype, params.numel())
        if slot is not None:
            out = torch.from_numpy(slot)
            reply = self.rule.master_step(self.master, message, worker, lr, out=out)
            slot.flags.writeable = False  # published as it is: a reply never changes
            return reply, slot if reply is out else None
        if self.arena.holds(params.numpy()):  # θ is a published reply: keep it
            self.master.params = params.clone()
        return self.rule.master_step(self.master, message, worker, lr), None

    def _deliver(
        self, reply: Tensor, worker: int | None, published: np.ndarray | None = None
    ) -> None:
        self.updates += 1
        self.last_reply = published if published is not None else self._publish(reply.numpy())
        if self.held is not None:
            receivers = range(self.spec.workers) if self.rule.synchronous else [worker]
            for w in receivers:
                self.held[w] = (self.last_reply, self.updates)
        self.round_members.clear()

    def _record(
        self, worker: int, lag: int, loss: float, lr: float, buffers: list[np.ndarray] | None
    ) -> None:
        self.lags[lag] += 1
        self.order.append(worker)
        self._loss_sum += loss
        self._lag_sum += lag
        self._steps += 1
        self._lr = lr
        if buffers is not None and self.worker_buffers is not None:
            self.worker_buffers[worker] = [np.array(b) for b in buffers]  # small; unpin Ray's
            self.last_writer = worker
        if not math.isfinite(loss):
            self.diverged = True

    def _end_epoch(self, epoch: int) -> None:
        params = self.rule.params(self.master).numpy().copy()
        self.snapshots[epoch] = ({"params": params, "buffers": self.buffers}, self.state())
        if self.spec.coordinator:
            self.epoch_stats[epoch] = self._epoch_record(epoch, time.perf_counter())

    def _epoch_record(self, epoch: int, now: float) -> dict[str, Any]:
        steps = max(self._steps, 1)
        loss = self._loss_sum / steps
        record = {
            "epoch": epoch,
            "train_loss": loss if math.isfinite(loss) else None,
            "lr": self._lr,
            "gap_mean": None,  # not measured by the runtime
            "lag_mean": self._lag_sum / steps,
            "seconds": now - (self._epoch_started or now),
            "diverged": self.diverged,
        }
        self._epoch_started = now
        self._reset_epoch_stats()
        return record

    def _reset_epoch_stats(self) -> None:
        self._loss_sum = 0.0
        self._lag_sum = 0
        self._steps = 0
        self._lr = self.spec.schedule(self.count)

    def _may_continue(self, worker: int) -> bool:
        """(Coordinator) may ``worker`` compute another gradient? Grants one if so."""
        if self.diverged:
            return False
        if self.master.applied[worker] < self.granted[worker]:
            return True
        if self.turns is None and sum(self.granted) < self.spec.total:
            self.granted[worker] += 1
            return True
        return False

    def _reply(self, worker: int) -> Reply:
        go = self._may_continue(worker) if self.spec.coordinator else True
        params, stamp = (
            self.held[worker] if self.held is not None else (self.last_reply, self.updates)
        )
        return Reply(params, stamp, go, self.master.applied[worker])

    async def _until(self, condition: Callable[[], bool]) -> None:
        if condition():
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((condition, future))
        await future

    def _wake(self) -> None:
        waiting = []
        for condition, future in self._waiters:
            if condition():
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((condition, future))
        self._waiters = waiting


def _publisher(min_bytes: int | None) -> Callable[[np.ndarray], Any]:
    """How a shard turns a reply into something it may keep and send: a copy, or (large
    replies, under Ray) one copy into the object store and its reference."""
    if min_bytes is None:
        return np.copy
    import ray

    return lambda array: ray.put(array) if array.nbytes >= min_bytes else array.copy()


def checkpointable(state: Any) -> Any:
    """``state`` with every array as a tensor and every Ray reference fetched, for
    ``torch.save`` (tensors and plain values only)."""
    if isinstance(state, dict):
        return {key: checkpointable(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(checkpointable(value) for value in state)
    if isinstance(state, np.ndarray):
        return torch.from_numpy(np.array(state))  # writable, owned
    if isinstance(state, Tensor | int | float | str | bool) or state is None:
        return state
    import ray  # a published reply

    return checkpointable(ray.get(state))


def master_part(state: dict[str, Any], algorithm: str) -> dict[str, Any]:
    """The evaluation part (parameters of the slice, last writer's BatchNorm statistics)
    of a shard :meth:`ShardServer.state`, as :meth:`ShardServer.take_snapshot` gives it."""
    params = make_rule(algorithm).params(MasterState(**state["master"]))
    buffers = state["worker_buffers"]
    return {
        "params": params.numpy(),
        "buffers": [np.asarray(b) for b in buffers[state["last_writer"]]] if buffers else None,
    }


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return list(value)
    return value


def _array(value: Any) -> np.ndarray:
    """A checkpoint's array as numpy (``torch.load`` may give tensors back): without
    going through ``Tensor.__array__``, which numpy 2 warns about."""
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
