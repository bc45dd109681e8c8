"""Which worker's message reaches the master next (SPEC "Worker scheduling", "Delay models").

A scheduler is a small seeded state machine: :meth:`next_worker` returns the worker whose
update the master applies next. Its state is a dict of plain values, so a checkpointed
run resumes with the very same order.

A schedule is one string (it fits ``RunConfig.schedule`` and sweep files):

- ``round-robin``, ``block-random``: SPEC's orders.
- ``gamma``, ``lognormal``, ``pareto``: an event queue on simulated time, each batch's
  time drawn with mean ``B·sᵢ`` (worker i's speed factor sᵢ, 1 by default). Options after a
  colon, comma-separated: ``v=0.1`` (gamma's coefficient of variation), ``sigma=1``
  (log-normal's σ of the log), ``alpha=3`` (Pareto's tail index, > 1), and either
  ``slow=FxS`` (the last round(F·N) workers S× slower, e.g. ``slow=0.25x2``) or
  ``speeds=s0/s1/…`` (one factor per worker). E.g. ``gamma:slow=0.25x2,v=0.2``.
- ``replay:PATH``: the order of updates recorded in a ``dana launch`` result.json
  (``update_order``), replayed exactly.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dana.errors import DanaError

#: Scheduling modes, by the names SPEC gives them (the timed ones take options, see above);
#: ``replay:PATH`` besides.
SCHEDULES = ("round-robin", "block-random", "gamma", "lognormal", "pareto")
#: Coefficient of variation V of batch execution times in the gamma model (paper: 0.1).
GAMMA_VARIATION = 0.1
#: The timed models and their shape parameter (name, default).
TIMED = {"gamma": ("v", GAMMA_VARIATION), "lognormal": ("sigma", 1.0), "pareto": ("alpha", 3.0)}


def gamma_durations(
    rng: np.random.Generator, size: int | None, batch_size: int, variation: float = GAMMA_VARIATION
) -> Any:
    """Batch times ~ Gamma(shape = 1/V², scale = B·V²): mean B, coefficient of variation V."""
    return rng.gamma(1.0 / variation**2, batch_size * variation**2, size=size)


@dataclass(frozen=True)
class BatchTimes:
    """Batch execution times of a timed model: mean ``B·sᵢ`` for worker i.

    ``gamma``: Gamma(shape = 1/V², scale = B·V²)·sᵢ; ``lognormal``: exp(N(ln B − σ²/2, σ²))·sᵢ;
    ``pareto``: classical Pareto with index α and scale B(α − 1)/α, times sᵢ (its tail is
    ``P(T > t) ∝ t^−α``; variance finite only for α > 2).
    """

    kind: str = "gamma"
    batch_size: int = 128
    shape: float = GAMMA_VARIATION
    speeds: tuple[float, ...] | None = None

    def draw(self, rng: np.random.Generator, workers: int, worker: int | None = None) -> Any:
        """One time per worker (``worker=None``), or one for ``worker``."""
        size = workers if worker is None else None
        b, a = self.batch_size, self.shape
        if self.kind == "gamma":
            times = gamma_durations(rng, size, b, a)
        elif self.kind == "lognormal":
            times = rng.lognormal(math.log(b) - a * a / 2.0, a, size=size)
        else:
            times = (rng.pareto(a, size=size) + 1.0) * (b * (a - 1.0) / a)
        if self.speeds is not None:
            times = times * (np.asarray(self.speeds) if worker is None else self.speeds[worker])
        return times


class Scheduler:
    """Base class: a seeded source of worker indices."""

    #: How many updates it can give (``None``: any number).
    length: int | None = None

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
    """An event queue on simulated time; batch times drawn by ``times`` (default: SPEC's
    gamma model, :func:`gamma_durations`; any :class:`BatchTimes`).

    All workers start at time 0. The next update is the worker whose batch finishes
    first; it starts its next batch at that moment (its message is applied at once).
    Draws are taken in a fixed order: one per worker at start (workers 0…N−1), then one
    per update for the worker that just finished. Ties go to the lower worker index.
    """

    def __init__(
        self, workers: int, seed: int, batch_size: int, times: BatchTimes | None = None
    ) -> None:
        super().__init__(workers, seed)
        self.batch_size = batch_size
        self.times = times or BatchTimes(batch_size=batch_size)
        self.now = 0.0
        starts = self.times.draw(self.rng, workers)
        self.queue: list[tuple[float, int]] = [(float(t), w) for w, t in enumerate(starts)]
        heapq.heapify(self.queue)

    def next_worker(self) -> int:
        self.now, worker = heapq.heappop(self.queue)
        duration = float(self.times.draw(self.rng, self.workers, worker))
        heapq.heappush(self.queue, (self.now + duration, worker))
        return worker

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "now": self.now, "queue": list(self.queue)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.now = state["now"]
        self.queue = [tuple(item) for item in state["queue"]]


class SyncGamma(_Seeded):
    """Timed batches behind a barrier (``ssgd``): every round, each worker once, by finish
    time; the round takes its slowest worker's time."""

    def __init__(
        self, workers: int, seed: int, batch_size: int, times: BatchTimes | None = None
    ) -> None:
        super().__init__(workers, seed)
        self.batch_size = batch_size
        self.times = times or BatchTimes(batch_size=batch_size)
        self.now = 0.0
        self.block: list[int] = []

    def next_worker(self) -> int:
        if not self.block:
            times = self.times.draw(self.rng, self.workers)
            self.now += float(times.max())
            self.block = np.argsort(times, kind="stable").tolist()[::-1]
        return self.block.pop()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "now": self.now, "block": list(self.block)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.now = state["now"]
        self.block = list(state["block"])


class Replay(Scheduler):
    """The order of updates of a recorded run (``update_order`` in its result.json)."""

    def __init__(self, workers: int, order: list[int]) -> None:
        super().__init__(workers)
        self.order = list(order)
        self.length = len(self.order)
        self.position = 0

    def next_worker(self) -> int:
        if self.position >= len(self.order):
            raise DanaError(
                f"the replayed order holds {len(self.order)} updates and the run needs more: "
                "replay a longer run, or run fewer steps"
            )
        self.position += 1
        return self.order[self.position - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


@dataclass(frozen=True)
class ScheduleSpec:
    """A parsed schedule string (see the module docstring)."""

    kind: str
    shape: float | None = None
    slow: tuple[float, float] | None = None
    speeds: tuple[float, ...] | None = None
    path: str | None = None

    def speed_factors(self, workers: int) -> tuple[float, ...] | None:
        """sᵢ per worker (``None``: all 1); a one-line error if they do not fit N."""
        if self.speeds is not None:
            if len(self.speeds) != workers:
                raise DanaError(
                    f"speeds= gives {len(self.speeds)} factors for {workers} workers: give one "
                    "per worker, or use slow=FRACTIONxFACTOR"
                )
            return self.speeds
        if self.slow is not None:
            fraction, factor = self.slow
            count = math.floor(fraction * workers + 0.5)  # round half up: a quarter of 2 is 1
            return (1.0,) * (workers - count) + (factor,) * count
        return None


def parse_schedule(schedule: str) -> ScheduleSpec:
    """Parse a schedule string; a one-line :class:`DanaError` for anything wrong."""
    if not isinstance(schedule, str):
        raise DanaError(f"schedule must be a string, got {schedule!r}")
    kind, _, rest = schedule.partition(":")
    if kind == "replay":
        if not rest:
            raise DanaError("replay needs a result file: --schedule replay:PATH/result.json")
        return ScheduleSpec("replay", path=rest)
    if kind in ("round-robin", "block-random") and not rest:
        return ScheduleSpec(kind)
    if kind not in TIMED:
        raise DanaError(
            f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}, replay:PATH"
        )
    name, shape = TIMED[kind]
    valid = f"{name}=, slow=FRACTIONxFACTOR, speeds=S0/S1/…"
    spec: dict[str, Any] = {"shape": shape}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in (name, "slow", "speeds"):
            raise DanaError(f"unknown option {key!r} of schedule {kind}: use {valid}")
        try:
            if key == name:
                spec["shape"] = float(value)
            elif key == "slow":
                fraction, factor = value.split("x")
                spec["slow"] = (float(fraction), float(factor))
            else:
                spec["speeds"] = tuple(float(v) for v in value.split("/"))
        except ValueError:
            raise DanaError(f"cannot read {item!r} in schedule {schedule!r}: use {valid}") from None
    checks = [
        (not ("slow" in spec and "speeds" in spec), "give slow= or speeds=, not both"),
        (kind != "gamma" or spec["shape"] > 0, "v must be > 0"),
        (kind != "lognormal" or spec["shape"] > 0, "sigma must be > 0"),
        (kind != "pareto" or spec["shape"] > 1, "alpha must be > 1 (a finite mean)"),
        (all(s > 0 for s in spec.get("speeds", ())), "speed factors must be > 0"),
        (
            "slow" not in spec or (0 <= spec["slow"][0] <= 1 and spec["slow"][1] > 0),
            "slow=FRACTIONxFACTOR needs 0 <= FRACTION <= 1 and FACTOR > 0",
        ),
    ]
    if not all(map(math.isfinite, _numbers(spec))):
        raise DanaError(f"schedule {schedule!r}: its options must be finite numbers")
    for ok, message in checks:
        if not ok:
            raise DanaError(f"schedule {schedule!r}: {message}")
    return ScheduleSpec(kind, **spec)


def _numbers(spec: dict[str, Any]) -> list[float]:
    return [spec["shape"], *spec.get("slow", ()), *spec.get("speeds", ())]


def load_replay(path: str, workers: int | None = None) -> list[int]:
    """The ``update_order`` recorded in the result.json at ``path``, checked against N."""
    file = Path(path)
    try:
        result = json.loads(file.read_text())
    except OSError as err:
        raise DanaError(f"cannot read the replayed run {path}: {err.strerror}") from None
    except ValueError:
        raise DanaError(f"{path} is not a result.json (not valid JSON)") from None
    order = result.get("update_order") if isinstance(result, dict) else None
    if not isinstance(order, list) or not all(isinstance(w, int) for w in order):
        raise DanaError(
            f"{path} records no update order: replay the result.json of a `dana launch` run"
        )
    recorded = (result.get("config") or {}).get("workers", max(order, default=-1) + 1)
    if workers is not None and recorded != workers:
        raise DanaError(
            f"{path} was recorded with {recorded} workers: run it with --workers {recorded}"
        )
    if order and (min(order) < 0 or max(order) >= recorded):
        raise DanaError(f"{path} records workers outside 0…{recorded - 1}")
    return order


def make_scheduler(
    schedule: str, workers: int, *, seed: int, batch_size: int = 128, synchronous: bool = False
) -> Scheduler:
    """The scheduler for ``schedule`` (see the module docstring).

    ``synchronous`` (``ssgd``): rounds hold each worker exactly once whatever the mode;
    under a timed model the round's order is by finish time, which does not change the
    result. A replayed order cannot be imposed on rounds.
    """
    spec = parse_schedule(schedule)
    if spec.kind == "round-robin":
        return RoundRobin(workers)
    if spec.kind == "block-random":
        return BlockRandom(workers, seed)
    if spec.kind == "replay":
        if synchronous:
            raise DanaError("ssgd waits for every worker each round: it cannot replay an order")
        return Replay(workers, load_replay(spec.path, workers))
    times = BatchTimes(spec.kind, batch_size, spec.shape, spec.speed_factors(workers))
    if synchronous:
        return SyncGamma(workers, seed, batch_size, times)
    return GammaEvents(workers, seed, batch_size, times)


def check_schedule(schedule: str, workers: int | None = None) -> None:
    """Raise a one-line :class:`DanaError` for a bad schedule (and, given N, one that does
    not fit it: speed factors, a replayed run's workers)."""
    spec = parse_schedule(schedule)
    if workers is not None:
        spec.speed_factors(workers)
        if spec.kind == "replay":
            load_replay(spec.path, workers)


def schedule_slug(schedule: str) -> str:
    """A folder-name form of ``schedule``: ``gamma:slow=0.25x2`` → ``gamma-slow0.25x2``,
    ``replay:runs/x/result.json`` → ``replay-x``."""
    spec = parse_schedule(schedule)
    if spec.kind == "replay":
        path = Path(spec.path)
        return f"replay-{(path.parent if path.suffix == '.json' else path).name or 'run'}"
    return schedule.replace(":", "-").replace(",", "-").replace("=", "").replace("/", "_")
