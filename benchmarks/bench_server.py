"""Benchmark of the Ray runtime: parameter-server throughput and end-to-end speedup.

1. Server updates/s against model size (0.27M, 2.7M, 25M float32 parameters) for K = 1,
   2, 4 shards, on each data plane (``ray``: actor calls through the object store, the
   one before; ``direct``: sockets and shared memory, :mod:`dana.runtime.transport`):
   load-generating clients push precomputed messages through the real protocol
   (:class:`dana.runtime.server.ShardServer` with DANA's master, the worker's links and
   slicing, the reply taken as a worker takes it: :func:`dana.runtime.worker.held_params`)
   as fast as the server answers, and the latency of one update with a single client;
   each after half a second of warm-up (steady state). Each figure is set against the
   memory-copy bound measured in the same run (before and after, the higher): the
   updates/s at which one ``torch`` ``copy_`` of the parameters per update would
   saturate this machine's memory (a real update reads the message, reads and writes the
   parameters, and with several shards copies the reply out: several such copies). A
   naive actor (pickled torch tensors, a synchronous actor method that returns a clone)
   is measured alongside, as the reference to beat.
2. ``--part scaling``: server updates/s against C synthetic clients (precomputed
   messages, ``--delay-ms`` of simulated compute each, then push and pull) and K shards,
   for the parameter counts of ResNet-20, WRN-16-4 and ResNet-50, on the direct data
   plane; ``--figure PATH`` draws it (the paper's Figure 4 shape: where the server
   becomes the bottleneck, and how sharding moves it).
3. End-to-end throughput (images/s) of ``launch`` with N = 1 and N = 2 workers on the
   CPU preset, the speedup of N = 2 over N = 1, and the measured lag histogram of N = 2
   next to the simulator's (gamma model) for the same N.

Usage (a local Ray instance with 4 logical CPUs is started)::

    .venv/bin/python benchmarks/bench_server.py            # everything, a few minutes
    .venv/bin/python benchmarks/bench_server.py --quick    # fewer sizes and seconds
    .venv/bin/python benchmarks/bench_server.py --part server
    .venv/bin/python benchmarks/bench_server.py --part scaling --delay-ms 10 \
        --figure docs/results/runtime/server_scaling.png
    .venv/bin/python benchmarks/bench_server.py --part end-to-end

On a cluster, the end-to-end part is ``dana launch --address auto -n N ...`` on each N
(see docs/runtime.md).
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import shutil
import tempfile
import time
import warnings
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
from dana.runtime.transport import open_links
from dana.runtime.worker import held_params
from dana.training import LRSchedule, preset_config

SIZES = (270_000, 2_700_000, 25_000_000)
SHARDS = (1, 2, 4)
#: The data planes compared: today's (Ray actor calls) and the direct one.
TRANSPORTS = ("ray", "direct")
#: Parameter counts of the paper's models, for the scaling figure.
MODELS = {"ResNet-20": 272_474, "WRN-16-4": 2_748_890, "ResNet-50": 25_557_032}
CLIENTS = (1, 2, 4, 8, 16)
#: Seconds each client pushes before its updates count (steady state: the first updates
#: also fault in the pages of a fresh shard's reply slots and of the client's mappings).
WARMUP = 0.5
PAGE_FLOATS = mmap.PAGESIZE // 4  # float32 per page
#: A client's measurement: updates counted, and when counting began and ended (wall time,
#: comparable between processes).
Window = tuple[int, float, float]


class Client:
    """Pushes one precomputed message over and over, as a worker without the gradient
    (after ``delay`` seconds of simulated compute per message, if any). One actor process
    serves every measurement: starting processes is what costs most on a loaded machine."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.size = 0

    def attach(
        self, index: int, shards: list[Any], transport: str, size: int, in_place: bool = True
    ) -> None:
        """Connect as worker ``index`` to fresh shards of a model of ``size`` parameters
        (``in_place=False``: copy each reply, as before workers computed at it)."""
        if size != self.size:
            self.size, self.message, self.params = size, None, None  # free the old first
            self.message = np.random.default_rng(size).standard_normal(size).astype(np.float32)
            self.params = torch.zeros(size)
        self.index = index
        self.bounds = shard_bounds(size, len(shards))
        nbytes = [4 * (hi - lo) for lo, hi in self.bounds]
        self.links = open_links(transport, shards, nbytes, in_place=in_place)
        # Sent from where a worker's backward writes its gradient, when the links have it.
        self.parts = self.links.message_parts(np.float32)
        if self.parts is None:
            self.parts = [self.message[lo:hi] for lo, hi in self.bounds]
        else:
            for part, (lo, hi) in zip(self.parts, self.bounds, strict=True):
                part[...] = self.message[lo:hi]

    def run(self, seconds: float, delay: float = 0.0, warmup: float = WARMUP) -> Window:
        """Push for ``warmup + seconds``; the updates of the last ``seconds`` and when
        they began and ended (the first updates also fault in the shard's reply slots:
        steady state is measured)."""
        joins = self.links.join(self.index)
        stamp, seq, go = joins[0].stamp, 0, joins[0].go
        ks = list(range(len(self.bounds)))
        messages = self.parts
        start = time.time()
        counted, end = 0, start + warmup + seconds
        while go and (now := time.time()) < end:
            if now >= start + warmup and not counted:
                counted, start = seq, now
            if delay:
                time.sleep(delay)
            replies = self.links.push(ks, self.index, seq, stamp, messages, 1.0, None)
            # As a worker: the reply itself (one shard, shared memory) or a copy of each;
            # then read one float of each page, as the forward pass reads them all (so the
            # page table is a worker's, which the check for written pages walks).
            held_params(self.links, replies, ks, self.bounds, self.params)[::PAGE_FLOATS].sum()
            stamp, go, seq = replies[0].stamp, replies[0].go, seq + 1
        self.links.close()
        return seq - counted, start, time.time()

    def release(self) -> None:
        self.size, self.message, self.params = 0, None, None


class ShardHost:
    """An actor process holding one :class:`ShardServer` at a time (``reset`` makes a fresh
    one), forwarding the shard's methods: the shard actor of ``launch``, without starting a
    process per measurement (an await more per call, about a microsecond)."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.server: ShardServer | None = None

    async def reset(self, spec: ShardSpec | None, params: np.ndarray | None) -> None:
        if self.server is not None:  # stop the old shard's listeners and connections
            for task in list(getattr(self.server, "_transport_tasks", ())):
                task.cancel()
        self.server = None if spec is None else ShardServer(spec, params=params)

    async def join(self, worker: int) -> Any:
        return await self.server.join(worker)

    async def push(self, *args: Any) -> Any:
        return await self.server.push(*args)

    async def endpoint(self) -> dict[str, Any]:
        return await self.server.endpoint()


class NaiveServer:
    """The reference: torch tensors pickled both ways, a synchronous method, a clone back."""

    def __init__(self) -> None:
        torch.set_num_threads(1)

    def reset(self, size: int) -> None:
        self.params = torch.zeros(size)

    def push(self, message: torch.Tensor) -> torch.Tensor:
        self.params.add_(message, alpha=-0.01)
        return self.params.clone()


class NaiveClient:
    def __init__(self, server: Any) -> None:
        torch.set_num_threads(1)
        self.server = server

    def reset(self, size: int) -> None:
        self.message, self.params = torch.randn(size), torch.zeros(size)

    def run(self, seconds: float, warmup: float = WARMUP) -> Window:
        """As :meth:`Client.run`."""
        start = time.time()
        count, counted, end = 0, None, start + warmup + seconds
        while (now := time.time()) < end:
            if counted is None and now >= start + warmup:
                counted, start = count, now
            self.params.copy_(ray.get(self.server.push.remote(self.message)))
            count += 1
        return count - (counted or 0), start, time.time()


class Actors:
    """The benchmark's actor processes, started once: K shard hosts, C clients, the naive
    server and its clients."""

    def __init__(self, clients: int, naive_clients: int) -> None:
        def start(cls: Any, *args: Any) -> Any:
            return ray.remote(cls).options(num_cpus=0).remote(*args)

        self.hosts = [start(ShardHost) for _ in range(max(SHARDS))]
        self.clients = [start(Client) for _ in range(clients)]
        self.naive = start(NaiveServer)
        self.naive_clients = [start(NaiveClient, self.naive) for _ in range(naive_clients)]
        everyone = [*self.hosts, *self.clients, self.naive, *self.naive_clients]
        ray.get([a.__ray_ready__.remote() for a in everyone])


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


def measure(
    actors: Actors,
    size: int,
    shards: int,
    clients: int,
    transport: str,
    seconds: float,
    delay: float = 0.0,
) -> float:
    """Updates/s of K fresh shards (DANA's master, as ``launch`` makes them) with
    ``clients`` :class:`Client` pushing to them."""
    # "direct-copy": the direct plane with each reply copied, as before workers computed
    # at it (the shards are the same).
    in_place = transport != "direct-copy"
    transport = "direct" if transport == "direct-copy" else transport
    schedule = LRSchedule(0.01, clients, 10**9, warmup_epochs=0.0)
    hosts = actors.hosts[:shards]
    ray.get(
        [
            host.reset.remote(
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
                    publish_bytes=PUBLISH_BYTES if transport == "ray" else None,
                    transport=transport,
                ),
                np.zeros(hi - lo, np.float32),
            )
            for host, (k, (lo, hi)) in zip(
                hosts, enumerate(shard_bounds(size, shards)), strict=True
            )
        ]
    )
    users = actors.clients[:clients]
    ray.get([a.attach.remote(c, hosts, transport, size, in_place) for c, a in enumerate(users)])
    rate = server_rate(ray.get([a.run.remote(seconds, delay) for a in users]))
    ray.get([host.reset.remote(None, None) for host in hosts])
    return rate


def naive_rate(actors: Actors, size: int, clients: int, seconds: float) -> float:
    users = actors.naive_clients[:clients]
    ray.get([actors.naive.reset.remote(size), *(a.reset.remote(size) for a in users)])
    return server_rate(ray.get([a.run.remote(seconds) for a in users]))


def server_rate(windows: list[Window]) -> float:
    """Updates/s of the server: every client's updates over the span from the first
    client's start to the last one's end (a lower bound, as the windows barely differ)."""
    return sum(n for n, _, _ in windows) / (
        max(e for _, _, e in windows) - min(s for _, s, _ in windows)
    )


def bench_servers(
    actors: Actors, sizes: tuple[int, ...], clients: int, seconds: float, repeats: int
) -> None:
    print(f"\n## Server updates/s ({clients} clients, best of {repeats} × {seconds:g} s)\n")
    header = "| parameters | copy bound (1 copy/update) | naive actor |"
    header += "".join(f" {t} K = {k} |" for t in TRANSPORTS for k in SHARDS)
    header += " direct K = 1, replies copied | direct / ray (K = 1) | best direct / copy bound |"
    header += " ms/update, 1 client: naive, ray, direct copied, direct |"
    print(header)
    print("|" + " --- |" * (3 + len(TRANSPORTS) * len(SHARDS) + 4))
    for size in sizes:
        bound = copy_bound(size)  # and again below: the higher (stricter) of the two
        naive = best(repeats, naive_rate, actors, size, clients, seconds)
        naive_alone = 1e3 / best(repeats, naive_rate, actors, size, 1, seconds)
        rates = {
            (t, k): best(repeats, measure, actors, size, k, clients, t, seconds)
            for t in TRANSPORTS
            for k in SHARDS
        }
        copied = best(repeats, measure, actors, size, 1, clients, "direct-copy", seconds)
        alone = {
            t: 1e3 / best(repeats, measure, actors, size, 1, 1, t, seconds)
            for t in (*TRANSPORTS, "direct-copy")
        }
        ray.get([a.reset.remote(0) for a in [actors.naive, *actors.naive_clients]])
        bound = max(bound, copy_bound(size))
        cells = "".join(f" {rates[t, k]:,.1f} |" for t in TRANSPORTS for k in SHARDS)
        direct = max(rates["direct", k] for k in SHARDS)
        print(
            f"| {size / 1e6:g}M | {bound:,.0f} | {naive:,.1f} |{cells} {copied:,.1f} | "
            f"{rates['direct', 1] / rates['ray', 1]:.1f}× | {direct / bound:.3f} | "
            f"{naive_alone:.2f}, {alone['ray']:.2f}, {alone['direct-copy']:.3f}, "
            f"{alone['direct']:.3f} |",
            flush=True,
        )
    ray.get([a.release.remote() for a in actors.clients])


def bench_scaling(
    actors: Actors, clients: tuple[int, ...], seconds: float, delay: float, figure: Path | None
) -> None:
    """Updates/s of K shards against C synthetic clients (precomputed messages, ``delay``
    of simulated compute each) for the paper's model sizes; the figure if asked."""
    print(
        f"\n## Scaling: server updates/s against clients C and shards K (direct transport, "
        f"{delay * 1e3:g} ms of simulated compute per update, {seconds:g} s each)\n"
    )
    print("| model | parameters | K |" + "".join(f" C = {c} |" for c in clients))
    print("|" + " --- |" * (3 + len(clients)))
    table: dict[str, dict[int, list[float]]] = {}
    bounds = {name: copy_bound(size) for name, size in MODELS.items()}
    for name, size in MODELS.items():
        # Every client holds its message, its parameters and a shared-memory inbox.
        most = max(c for c in clients if c * 3 * 4 * size <= 3 << 30)
        table[name] = {}
        for k in SHARDS:
            table[name][k] = [
                measure(actors, size, k, c, "direct", seconds, delay) if c <= most else math.nan
                for c in clients
            ]
            # "–": not run, C clients' buffers would not fit the 3 GiB this allows.
            cells = "".join(" – |" if math.isnan(r) else f" {r:,.0f} |" for r in table[name][k])
            print(f"| {name} | {size / 1e6:.2f}M | {k} |{cells}", flush=True)
        print(f"| {name} | copy bound | | {bounds[name]:,.0f} updates/s |", flush=True)
        ray.get([a.release.remote() for a in actors.clients])
    if figure is not None:
        plot_scaling(table, bounds, clients, delay, figure)


def plot_scaling(
    table: dict[str, dict[int, list[float]]],
    bounds: dict[str, float],
    clients: tuple[int, ...],
    delay: float,
    path: Path,
) -> None:
    from dana.experiments.report.style import new_figure, save_figure

    fig, axes = new_figure(10, 3.4, ncols=len(table))
    for ax, (name, rows) in zip(axes[0], table.items(), strict=True):
        for k, rates in rows.items():
            ax.plot(clients, rates, marker="o", label=f"K = {k}")
        if delay:
            ax.plot(clients, [c / delay for c in clients], "k--", lw=0.8, label="C / delay")
        ax.axhline(bounds[name], color="grey", ls=":", label="copy bound")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_title(f"{name} ({MODELS[name] / 1e6:.2f}M parameters)")
        ax.set_xlabel("clients C")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("server updates/s")
    axes[0][0].legend()
    for written in save_figure(fig, path):
        print(f"\nwrote {written}")


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
    parser.add_argument("--seconds", type=float, default=2.0, help="per server measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per figure")
    parser.add_argument(
        "--part",
        choices=("all", "server", "scaling", "end-to-end"),
        default="all",
        help="what to measure",
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="scaling: simulated compute per update"
    )
    parser.add_argument("--figure", type=Path, help="scaling: write the figure here (.png/.svg)")
    parser.add_argument(
        "--address", help="an already started Ray instance to use [default: start a local one]"
    )
    args = parser.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES
    seconds = 2.0 if args.quick else args.seconds
    repeats = 1 if args.quick else args.repeats
    if args.address:
        ray.init(address=args.address, logging_level="WARNING")
    else:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    print(
        f"# dana runtime benchmark ({os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"ray {ray.__version__}; load average {os.getloadavg()[0]:.1f} at start)"
    )
    try:
        if args.part in ("all", "server", "scaling"):
            scaling = args.part != "server"
            actors = Actors(max(args.clients, *CLIENTS) if scaling else args.clients, args.clients)
        if args.part in ("all", "server"):
            bench_servers(actors, sizes, args.clients, seconds, repeats)
        if args.part in ("all", "scaling"):
            bench_scaling(actors, CLIENTS, min(seconds, 1.5), args.delay_ms / 1e3, args.figure)
        if args.part in ("all", "end-to-end"):
            bench_end_to_end(samples=12_800, epochs=2, repeats=repeats)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
