"""Benchmark of the Ray runtime: parameter-server throughput and end-to-end speedup.

1. Server updates/s against model size (0.27M, 2.7M, 25M float32 parameters) for K = 1,
   2, 4 shards: load-generating clients push precomputed messages through the real
   protocol (:class:`dana.runtime.server.ShardServer` with DANA's master, the worker's
   slicing, pushes and reply copies) as fast as the server answers. Each figure is set
   against the memory-copy bound measured in the same run: the updates/s at which one
   ``torch`` ``copy_`` of the parameters per update would saturate this machine's memory
   (a real update moves the message in, reads and writes the parameters and copies the
   reply out: several such copies). A naive actor (pickled torch tensors, a synchronous
   actor method that returns a clone) is measured alongside, as the reference to beat.
2. End-to-end throughput (images/s) of ``launch`` with N = 1 and N = 2 workers on the
   CPU preset, the speedup of N = 2 over N = 1, and the measured lag histogram of N = 2
   next to the simulator's (gamma model) for the same N.

Usage (a local Ray instance with 4 logical CPUs is started)::

    .venv/bin/python benchmarks/bench_server.py            # everything, a few minutes
    .venv/bin/python benchmarks/bench_server.py --quick    # fewer sizes and seconds
    .venv/bin/python benchmarks/bench_server.py --part end-to-end

On a cluster, the end-to-end part is ``dana launch --address auto -n N ...`` on each N
(see docs/runtime.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

import dana
from dana.runtime import launch
from dana.runtime.driver import PUBLISH_BYTES
from dana.runtime.server import ShardServer, ShardSpec, shard_bounds
from dana.runtime.worker import fetch_params
from dana.training import LRSchedule, preset_config

SIZES = (270_000, 2_700_000, 25_000_000)
SHARDS = (1, 2, 4)


class Client:
    """Pushes one precomputed message over and over, as a worker without the gradient."""

    def __init__(self, index: int, shards: list[Any], size: int) -> None:
        torch.set_num_threads(1)
        self.index, self.shards = index, shards
        self.bounds = shard_bounds(size, len(shards))
        self.message = np.random.default_rng(index).standard_normal(size).astype(np.float32)
        self.params = torch.zeros(size)

    def run(self, seconds: float) -> int:
        joins = ray.get([s.join.remote(self.index) for s in self.shards])
        stamp, seq, go = joins[0].stamp, 0, joins[0].go
        end = time.perf_counter() + seconds
        while go and time.perf_counter() < end:
            refs = [
                s.push.remote(self.index, seq, stamp, self.message[lo:hi], 1.0)
                for s, (lo, hi) in zip(self.shards, self.bounds, strict=True)
            ]
            replies = ray.get(refs)
            for params, (lo, hi) in zip(fetch_params(replies), self.bounds, strict=True):
                self.params[lo:hi].copy_(torch.from_numpy(params))
            stamp, go, seq = replies[0].stamp, replies[0].go, seq + 1
        return seq


class NaiveServer:
    """The reference: torch tensors pickled both ways, a synchronous method, a clone back."""

    def __init__(self, size: int) -> None:
        torch.set_num_threads(1)
        self.params = torch.zeros(size)

    def push(self, message: torch.Tensor) -> torch.Tensor:
        self.params.add_(message, alpha=-0.01)
        return self.params.clone()


class NaiveClient:
    def __init__(self, server: Any, size: int) -> None:
        torch.set_num_threads(1)
        self.server, self.message, self.params = server, torch.randn(size), torch.zeros(size)

    def run(self, seconds: float) -> int:
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.params.copy_(ray.get(self.server.push.remote(self.message)))
            count += 1
        return count


def copy_bound(size: int, repeats: int = 50) -> float:
    """Updates/s if an update cost one ``copy_`` of ``size`` float32 (the best of repeats:
    on a shared machine the fastest run is the least disturbed)."""
    src, dst = torch.randn(size), torch.empty(size)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 1.0 / min(times)


def best(repeats: int, measure: Any, *args: Any) -> float:
    """The highest of ``repeats`` calls of ``measure(*args)`` (a throughput: on a shared
    machine the highest is the least disturbed)."""
    return max(measure(*args) for _ in range(repeats))


def server_rate(size: int, shards: int, clients: int, seconds: float) -> float:
    """Updates/s the K shards apply with ``clients`` load generators."""
    schedule = LRSchedule(0.01, clients, 10**9, warmup_epochs=0.0)
    servers = [
        ray.remote(ShardServer)
        .options(num_cpus=0)
        .remote(
            ShardSpec(
                k,
                (lo, hi),
                "dana",
                0.9,
                0.0,
                clients,
                schedule,
                10**9,
                1,
                publish_bytes=PUBLISH_BYTES,
            ),
            params=np.zeros(hi - lo, np.float32),
        )
        for k, (lo, hi) in enumerate(shard_bounds(size, shards))
    ]
    actors = [
        ray.remote(Client).options(num_cpus=0).remote(c, servers, size) for c in range(clients)
    ]
    ray.get([a.__ray_ready__.remote() for a in actors])
    start = time.perf_counter()
    counts = ray.get([a.run.remote(seconds) for a in actors])
    rate = sum(counts) / (time.perf_counter() - start)
    for actor in actors + servers:
        ray.kill(actor)
    return rate


def naive_rate(size: int, clients: int, seconds: float) -> float:
    server = ray.remote(NaiveServer).options(num_cpus=0).remote(size)
    actors = [
        ray.remote(NaiveClient).options(num_cpus=0).remote(server, size) for _ in range(clients)
    ]
    ray.get([a.__ray_ready__.remote() for a in actors])
    start = time.perf_counter()
    counts = ray.get([a.run.remote(seconds) for a in actors])
    rate = sum(counts) / (time.perf_counter() - start)
    for actor in [*actors, server]:
        ray.kill(actor)
    return rate


def bench_servers(sizes: tuple[int, ...], clients: int, seconds: float, repeats: int) -> None:
    print(f"\n## Server updates/s ({clients} clients, best of {repeats} × {seconds:g} s)\n")
    header = "| parameters | copy bound (1 copy/update) | naive actor |"
    header += "".join(f" K = {k} |" for k in SHARDS)
    header += " K = 1 / copy bound | ms/update, 1 client: naive → K = 1 |"
    print(header)
    print("|" + " --- |" * (3 + len(SHARDS) + 2))
    for size in sizes:
        bound = copy_bound(size)
        naive = best(repeats, naive_rate, size, clients, seconds)
        rates = [best(repeats, server_rate, size, k, clients, seconds) for k in SHARDS]
        alone = (
            1e3 / best(repeats, naive_rate, size, 1, seconds),
            1e3 / best(repeats, server_rate, size, 1, 1, seconds),
        )
        cells = "".join(f" {r:,.1f} |" for r in rates)
        print(
            f"| {size / 1e6:g}M | {bound:,.0f} | {naive:,.1f} |{cells} "
            f"{rates[0] / bound:.4f} | {alone[0]:.1f} → {alone[1]:.1f} |",
            flush=True,
        )


def bench_end_to_end(samples: int, epochs: int, repeats: int) -> None:
    print(
        f"\n## End-to-end (cnn-fashion-mnist, {samples} images × {epochs} epochs, B = 128, "
        f"best of {repeats})\n"
    )
    results: dict[int, dict[str, Any]] = {}
    out = Path(tempfile.mkdtemp(prefix="dana-bench-"))
    try:
        for n in (1, 2):
            config = preset_config("cnn-fashion-mnist").replace(
                workers=n, epochs=epochs, train_samples=samples, algorithm="dana"
            )
            for r in range(repeats):
                result = launch(config, out / f"n{n}-{r}", cpus_per_worker=1, log=False)
                if n not in results or result["throughput"] > results[n]["throughput"]:
                    results[n] = result
    finally:
        shutil.rmtree(out, ignore_errors=True)
    one, two = results[1]["throughput"], results[2]["throughput"]
    print("| N | images/s | speedup | final test error |")
    print("| --- | --- | --- | --- |")
    for n, r in results.items():
        print(
            f"| {n} | {r['throughput']:,.0f} | {r['throughput'] / one:.2f} | "
            f"{r['final_test_error']:.2f}% |"
        )
    measured = {int(k): v for k, v in results[2]["lag_histogram"].items()}
    updates = sum(measured.values())
    simulated = Counter(
        dana.simulate(
            torch.zeros(1),
            lambda p, w: [torch.zeros(1)],
            algorithm="dana",
            workers=2,
            steps=updates,
            lr=0.1,
            schedule="gamma",
            seed=0,
        ).lag
    )
    print(f"\nSpeedup N = 2 over N = 1: {two / one:.2f}")
    print("\n| lag | measured (N = 2) | simulated (gamma, N = 2) |")
    print("| --- | --- | --- |")
    for lag in sorted(set(measured) | set(simulated)):
        print(
            f"| {lag} | {measured.get(lag, 0) / updates:.3f} | "
            f"{simulated.get(lag, 0) / updates:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.27M and 2.7M only, 2 s each")
    parser.add_argument("--clients", type=int, default=2, help="load-generating clients")
    parser.add_argument("--seconds", type=float, default=3.0, help="per server measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per figure")
    parser.add_argument(
        "--part", choices=("all", "server", "end-to-end"), default="all", help="what to measure"
    )
    args = parser.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES
    seconds = 2.0 if args.quick else args.seconds
    repeats = 1 if args.quick else args.repeats
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    print(
        f"# dana runtime benchmark ({os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"ray {ray.__version__}; load average {os.getloadavg()[0]:.1f} at start)"
    )
    try:
        if args.part in ("all", "server"):
            bench_servers(sizes, args.clients, seconds, repeats)
        if args.part in ("all", "end-to-end"):
            bench_end_to_end(samples=12_800, epochs=2, repeats=repeats)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
