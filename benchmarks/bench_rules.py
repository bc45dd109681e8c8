"""Benchmark of the update rules: time per update (worker step + master step) of every
algorithm on a flat float32 model, against ``asgd``'s measured in the same run.

What it shows: every rule is O(model) per update whatever N (the mitigations that keep θᵢ
pay one more copy, the compensations a few elementwise passes), and the cost of each next
to the cheapest possible master. One thread, no gradient: only the rules' arithmetic.

Usage::

    .venv/bin/python benchmarks/bench_rules.py                 # 0.27M parameters, N = 16
    .venv/bin/python benchmarks/bench_rules.py --size 2700000 --workers 32
"""

from __future__ import annotations

import argparse
import time

import torch

from dana.rules import ALGORITHMS, make_rule


def per_update(algorithm: str, size: int, workers: int, repeats: int) -> float:
    """Seconds per update: worker step and master step of a message, cycling the workers."""
    rule = make_rule(algorithm, momentum=0.9, weight_decay=1e-4)
    params = torch.randn(size)
    master = rule.init_master(params, workers)
    states = [rule.init_worker(params) for _ in range(workers)]
    grads = torch.randn(2, size)
    grad = torch.empty(size)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for k in range(repeats):
            worker = k % workers
            grad.copy_(grads[k % 2])
            message = rule.worker_step(states[worker], params, grad)
            rule.master_step(master, message, worker, 0.01)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=270_000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [a for a in ALGORITHMS if a != "baseline"]
    times = {a: per_update(a, args.size, args.workers, args.repeats) for a in names}
    base = times["asgd"]
    print(f"{args.size} float32 parameters, N = {args.workers}, 1 thread")
    print(f"{'algorithm':16} {'µs/update':>10} {'× asgd':>7}")
    for name, seconds in times.items():
        print(f"{name:16} {seconds * 1e6:10.0f} {seconds / base:7.2f}")


if __name__ == "__main__":
    main()
