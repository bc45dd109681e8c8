"""Which worker's message reaches the master next (SPEC "Worker scheduling").

A scheduler is a small seeded state machine: :meth:`next_worker` returns the worker whose
update the master applies next. Its state is a dict of plain values, so a checkpointed
run resumes with the very same order.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from dana.errors import DanaError

#: Scheduling modes, by the names SPEC gives them.
SCHEDULES = ("round-robin", "block-random", "gamma")
#: Coefficient of variation V of batch execution times in the gamma model (paper: 0.1).
GAMMA_VARIATION = 0.1


def gamma_durations(
    rng: np.random.Generator, size: int | None, batch_size: int, variation: float = GAMMA_VARIATION
) -> Any:
    """Batch times ~ Gamma(shape = 1/V², scale = B·V²): mean B, coefficient of variation V."""
    return rng.gamma(1.0 / variation**2, batch_size * variation**2, size=size)


class Scheduler:
    """Base class: a seeded source of worker indices."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def next_worker(self) -> int:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RoundRobin(Scheduler):
    """Workers in the order 0, 1, …, N−1, 0, 1, …"""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.position = 0

    def next_worker(self) -> int:
        worker = self.position % self.workers
        self.position += 1
        return worker

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


class _Seeded(Scheduler):
    def __init__(self, workers: int, seed: int) -> None:
        super().__init__(workers)
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class BlockRandom(_Seeded):
    """Every block of N updates holds each worker once, in a fresh random order per block."""

    def __init__(self, workers: int, seed: int) -> None:
        super().__init__(workers, seed)
        self.block: list[int] = []

    def next_worker(self) -> int:
        if not self.block:
            # Reversed so that pop() hands out the permutation front to back.
            self.block = self.rng.permutation(self.workers).tolist()[::-1]
        return self.block.pop()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "block": list(self.block)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.block = list(state["block"])


class GammaEvents(_Seeded):
    """An event queue on simulated time; batch times drawn by :func:`gamma_durations`.

    All workers start at time 0. The next update is the worker whose batch finishes
    first; it starts its next batch at that moment (its message is applied at once).
    Draws are taken in a fixed order: one per worker at start (workers 0…N−1), then one
    per update for the worker that just finished. Ties go to the lower worker index.
    """

    def __init__(self, workers: int, seed: int, batch_size: int) -> None:
        super().__init__(workers, seed)
        self.batch_size = batch_size
        self.now = 0.0
        starts = gamma_durations(self.rng, workers, batch_size)
        self.queue: list[tuple[float, int]] = [(float(t), w) for w, t in enumerate(starts)]
        heapq.heapify(self.queue)

    def next_worker(self) -> int:
        self.now, worker = heapq.heappop(self.queue)
        duration = float(gamma_durations(self.rng, None, self.batch_size))
        heapq.heappush(self.queue, (self.now + duration, worker))
        return worker

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "now": self.now, "queue": list(self.queue)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.now = state["now"]
        self.queue = [tuple(item) for item in state["queue"]]


class SyncGamma(_Seeded):
    """Gamma times behind a barrier (``ssgd``): every round, each worker once, by finish time."""

    def __init__(self, workers: int, seed: int, batch_size: int) -> None:
        super().__init__(workers, seed)
        self.batch_size = batch_size
        self.now = 0.0
        self.block: list[int] = []

    def next_worker(self) -> int:
        if not self.block:
            times = gamma_durations(self.rng, self.workers, self.batch_size)
            self.now += float(times.max())
            self.block = np.argsort(times, kind="stable").tolist()[::-1]
        return self.block.pop()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "now": self.now, "block": list(self.block)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.now = state["now"]
        self.block = list(state["block"])


def make_scheduler(
    schedule: str, workers: int, *, seed: int, batch_size: int = 128, synchronous: bool = False
) -> Scheduler:
    """The scheduler for ``schedule`` (one of :data:`SCHEDULES`).

    ``synchronous`` (``ssgd``): rounds hold each worker exactly once whatever the mode;
    under ``gamma`` the round's order is by finish time, which does not change the result.
    """
    check_schedule(schedule)
    if schedule == "round-robin":
        return RoundRobin(workers)
    if schedule == "block-random":
        return BlockRandom(workers, seed)
    if synchronous:
        return SyncGamma(workers, seed, batch_size)
    return GammaEvents(workers, seed, batch_size)


def check_schedule(schedule: str) -> None:
    """Raise a one-line :class:`DanaError` for an unknown scheduling mode."""
    if schedule not in SCHEDULES:
        raise DanaError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
