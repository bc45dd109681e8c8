"""A worker: a model replica, its data, the worker rule and the pull/compute/push loop.

Data assignment. In a free run with N > 1 workers, the training samples are assigned to
workers at random once (a permutation seeded by the run's seed, split into N shards), and
each worker iterates over its own shard, reshuffled every pass, as on a cluster where a
worker reads its own part of the data. With one worker, or in ``deterministic`` mode,
worker ``w``'s ``j``-th gradient is computed on the batch the simulator uses for the same
update: one shared seeded stream of batches, the ``c``-th update on the ``c``-th batch
(the task's ``train_stream(B, seed=config.seed)``, the trainer's data order).

A worker's position in its data is its message number ``seq``, which the server keeps
(:class:`~dana.runtime.server.ShardServer`): a restarted worker continues with the batch
of the first message the server has not applied, so no batch is skipped.

BatchNorm (the trainer's policy): each worker keeps its own running statistics, updated by
its own forward passes, and sends them with each message to the coordinator shard, which
keeps the last applied ones for evaluation. A new or restarted worker starts from those.
"""

from __future__ import annotations

import hashlib
import os
import signal
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from dana.data.streams import subset
from dana.rules import make_rule
from dana.runtime.server import Order, Reply, shard_bounds
from dana.runtime.transport import open_links
from dana.tasks import Task
from dana.training.config import RunConfig
from dana.training.flat import FlatModel
from dana.training.resources import deterministic_kernels
from dana.training.run import resolve_task


@dataclass(frozen=True)
class Fault:
    """A failure to inject into a worker, for testing the fault handling.

    Attributes:
        worker: the worker that fails (only its first incarnation does).
        at: the message number ``seq`` at which it fails.
        kind: ``"kill"``: the process kills itself with SIGKILL once message ``at`` is
            applied and answered, before using the answer; ``"partial"``: it sends message
            ``at`` to shard 0 only and kills itself (a crash between two shards' pushes);
            ``"raise"``: it raises an exception before computing message ``at``.
    """

    worker: int
    at: int
    kind: Literal["kill", "partial", "raise"] = "kill"


def seeded_replica(task: Task, config: RunConfig, device: str = "cpu") -> FlatModel:
    """The task's model, initialised as the simulator's trainer does (same seed)."""
    return FlatModel(task.fresh_model(config.seed).to(device))


def derived_seed(seed: int, tag: str) -> int:
    """A 63-bit seed that depends on ``(seed, tag)`` only."""
    digest = hashlib.blake2b(f"dana.runtime:{seed}:{tag}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class WorkerData:
    """The batch of each of one worker's messages (see the module docstring).

    Args:
        task: the task (its training data, augmentation and collate function).
        config: the run's config (batch size, seed, N).
        worker: w.
        order: the imposed order of updates (deterministic mode), else ``None``.
        device: where batches are produced.
    """

    def __init__(
        self,
        task: Task,
        config: RunConfig,
        worker: int,
        order: Order | None,
        device: str = "cpu",
    ) -> None:
        batch, workers = config.batch_size, config.workers
        samples = task.train_samples
        self.steps_per_epoch = samples // batch
        self.positions: list[int] | None = None
        if workers == 1 or order is not None:
            # The simulator's stream: update c is computed on batch c.
            self.loader = task.train_stream(batch, seed=config.seed, device=device)
            if order is not None:
                turns = order.turns(config.epochs * self.steps_per_epoch)
                self.positions = [c for c, w in enumerate(turns) if w == worker]
            self.shard_batches = self.steps_per_epoch
            return
        generator = torch.Generator().manual_seed(derived_seed(config.seed, "shards"))
        shard = torch.randperm(samples, generator=generator)[worker::workers].sort().values
        self.loader = task.train_stream(
            batch,
            seed=derived_seed(config.seed, f"worker{worker}"),
            device=device,
            data=subset(task.train_data, shard),
        )
        self.shard_batches = self.loader.batches_per_epoch

    def batch(self, seq: int) -> Any:
        """The batch of this worker's message ``seq``."""
        position = self.positions[seq] if self.positions is not None else seq
        return self.loader.batch(*divmod(position, self.shard_batches))


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to know (all of it picklable)."""

    config: RunConfig
    data_dir: str
    servers: int
    order: Order | None = None
    threads: int = 1
    fault: Fault | None = None
    #: A Task object given in Python (shipped by Ray); ``None``: from the config.
    task: Task | None = None
    #: The data plane (:data:`dana.runtime.transport.TRANSPORTS`).
    transport: str = "ray"


class Worker:
    """One worker process: model replica, data, worker rule; :meth:`run` trains.

    Args:
        spec: the run's worker configuration.
        index: w, this worker's number.
        shards: the K shard actors (Ray handles), shard 0 first.
    """

    def __init__(self, spec: WorkerSpec, index: int, shards: list[Any]) -> None:
        torch.set_num_threads(spec.threads)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        config = spec.config
        self.spec = spec
        self.index = index
        self.shards = shards
        self.device = torch.device(config.device)
        deterministic_kernels(self.device)
        self.task = resolve_task(config, spec.data_dir, task=spec.task, evaluate=False)
        self.flat = seeded_replica(self.task, config, config.device)
        self.flat.model.train()
        self.data = WorkerData(self.task, config, index, spec.order, config.device)
        self.rule = make_rule(
            config.algorithm,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            **config.rule_options,
        )
        self.bounds = shard_bounds(len(self.flat), spec.servers)
        itemsize = self.flat.params.element_size()
        # A GPU worker copies each reply to its device: the arena is mapped read-only.
        self.links = open_links(
            spec.transport,
            shards,
            [(hi - lo) * itemsize for lo, hi in self.bounds],
            in_place=self.device.type == "cpu",
        )
        buffer = self.links.message_buffer()
        self.parts: list[np.ndarray] | None = None
        if buffer is not None:
            self.parts = self.links.message_parts(_numpy(self.flat.params[:0]).dtype)
        if buffer is not None and self.device.type == "cpu":
            # Backward writes the gradient where the shards read the message: for rules
            # whose message is the gradient itself (modified in place), a push copies nothing.
            self.flat.adopt_grad(torch.frombuffer(buffer, dtype=self.flat.params.dtype))
        #: The parameters the model computes at: its own buffer, or the last reply itself.
        self.params = self.flat.params
        self._views: dict[int, list[Tensor]] = {}  # per reply slot, built once

    def run(self) -> dict[str, Any]:
        """Train until the coordinator says stop; return what this incarnation did."""
        joins: list[Reply] = self.links.join(self.index)
        self._load(joins, range(len(self.shards)))
        if joins[0].buffers is not None:
            self.flat.load_buffers([torch.from_numpy(b).to(self.device) for b in joins[0].buffers])
        state = self.rule.init_worker(self.flat.params)
        seq, stamp, go = max(j.applied for j in joins), joins[0].stamp, joins[0].go
        lagging = [k for k, j in enumerate(joins) if j.applied < seq]
        gradients = 0
        if lagging:
            # Killed between its pushes to two shards: send the shards that missed message
            # seq - 1 a fresh gradient for it, so every shard applies the same messages.
            replies = self._step(state, seq - 1, stamp, lagging)
            gradients += 1
            if 0 in lagging:
                stamp, go = replies[0].stamp, replies[0].go
        while go:
            if self._fault(seq) == "raise":
                raise RuntimeError(f"injected fault in worker {self.index} at message {seq}")
            replies = self._step(state, seq, stamp, list(range(len(self.shards))))
            gradients += 1
            stamp, go = replies[0].stamp, replies[0].go
            seq += 1
        return {"worker": self.index, "gradients": gradients, "next_seq": seq}

    def _step(self, state: Any, seq: int, stamp: int, shards: list[int]) -> list[Reply]:
        """Compute message ``seq`` at the held parameters, push it to ``shards``, load
        the replies; return them (in ``shards`` order)."""
        flat = self.flat
        batch = self.data.batch(seq)
        flat.zero_grad()
        loss = self.task.loss(flat.model, batch)
        loss.backward()
        flat.gather_grad()
        message = self.rule.worker_step(state, self.params, flat.grad)
        parts = stage_message(message, flat.grad, self.parts, self.bounds)
        buffers = [_numpy(b) for b in flat.buffers] if flat.buffers else None
        fault = self._fault(seq)
        targets = shards[:1] if fault == "partial" else shards
        replies = self.links.push(
            targets,
            self.index,
            seq,
            stamp,
            [parts[k] for k in targets],
            float(loss.detach()),
            buffers,
        )
        if fault in ("partial", "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        self._load(replies, shards)
        return replies

    def _fault(self, seq: int) -> str | None:
        fault = self.spec.fault
        return fault.kind if fault is not None and fault.at == seq else None

    def _load(self, replies: list[Reply], shards: Sequence[int]) -> None:
        flat = self.flat
        self.params = held_params(self.links, replies, shards, self.bounds, flat.params)
        if self.params is flat.params:
            flat.point_home()
            return
        key = self.params.data_ptr()
        if key not in self._views:
            self._views[key] = flat.views(self.params)
        flat.point_at(self._views[key])


def held_params(
    links: Any,
    replies: Sequence[Reply],
    shards: Sequence[int],
    bounds: Sequence[tuple[int, int]],
    home: Tensor,
) -> Tensor:
    """Where a worker computes once ``replies`` (shard ``shards[i]``'s i-th) arrived.

    With one shard on this node replying in shared memory, the reply itself, no copy
    (:meth:`~dana.runtime.transport.DirectLinks.writable`: writes to it stay private to
    this process and are undone before the next reply). Otherwise ``home``, the worker's
    own flat parameters, with the replies copied in; each reply is valid only until the
    next push, so it is copied now.
    """
    if len(bounds) == 1 and home.device.type == "cpu":
        there = links.writable(0)
        if there is not None and there.size == home.numel():
            params = torch.from_numpy(there)
            if params.dtype == home.dtype:
                return params
    for reply, k in zip(replies, shards, strict=True):
        lo, hi = bounds[k]
        home[lo:hi].copy_(torch.from_numpy(reply.params))
    return home


def stage_message(
    message: Tensor,
    grad: Tensor,
    parts: list[np.ndarray] | None,
    bounds: Sequence[tuple[int, int]],
) -> list[np.ndarray]:
    """The arrays to push, shard k's slice of ``message`` k-th.

    With the links' message parts (``parts``), a message computed in the gradient buffer
    ``grad`` is already there; any other (a GPU's, a rule's own buffer) is copied there,
    straight from its device.
    Without them (Ray's transport copies each message itself), views of ``message``.
    """
    if parts is None:
        payload = _numpy(message)
        return [payload[lo:hi] for lo, hi in bounds]
    computed_there = (
        message.device.type == "cpu"
        and message.data_ptr() == grad.data_ptr()
        and message.shape == grad.shape
        and message.dtype == grad.dtype
    )
    if not computed_there:
        for part, (lo, hi) in zip(parts, bounds, strict=True):
            torch.from_numpy(part).copy_(message[lo:hi])
    return parts


def _numpy(tensor: Tensor) -> np.ndarray:
    """A numpy view of ``tensor`` (a copy only when it lives on a GPU)."""
    return tensor.detach().cpu().numpy()
