"""The general data path's cost per batch against a plain DataLoader (issue: open API).

One map-style Dataset (Fashion-MNIST as float tensors, one sample per ``__getitem__``)
goes through (a) a plain ``DataLoader(dataset, batch_size, shuffle=True)`` loop and (b)
dana's :class:`~dana.data.streams.MapStream` (the seeded stream ``dana.train`` uses for
any Dataset); the same tensors as a tuple go through (c) :class:`TensorStream`, dana's
fast path, and (d) :class:`TrainLoader` on the uint8 images (the presets' path). Rounds
alternate between the contenders and the median is kept; ratios are against (a), measured
in the same run.

    .venv/bin/python benchmarks/bench_data.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dana.data import TrainLoader, load_dataset, resolve_data_dir
from dana.data.streams import MapStream, TensorStream


class Samples(torch.utils.data.Dataset):
    """A map-style dataset: one normalised image and its label per index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def time_batches(batches, count: int) -> float:
    """Seconds per batch for the first ``count`` batches of an iterator."""
    start = time.perf_counter()
    for k, _ in enumerate(batches, 1):
        if k == count:
            break
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", resolve_data_dir(None), train=True)
    images = (data.images.float() / 255 - 0.286) / 0.353
    dataset = Samples(images, data.labels)
    b = args.batch_size
    contenders = {
        "plain DataLoader (map-style Dataset)": lambda epoch: iter(
            torch.utils.data.DataLoader(dataset, batch_size=b, shuffle=True, drop_last=True)
        ),
        "dana MapStream (same Dataset)": lambda epoch: MapStream(dataset, b, seed=0).epoch(epoch),
        "dana TensorStream (tensors)": lambda epoch: TensorStream(
            (images, data.labels), b, seed=0
        ).epoch(epoch),
        "dana TrainLoader (uint8 images)": lambda epoch: TrainLoader(data, b, seed=0).epoch(epoch),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name, make in contenders.items():
            times[name].append(time_batches(make(round_), args.batches))
    base = statistics.median(times["plain DataLoader (map-style Dataset)"])
    print(f"{args.batches} batches of {b}, {args.rounds} rounds, {args.threads} thread(s)")
    print(f"{'contender':40} {'µs/batch':>10} {'ratio to DataLoader':>20}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:40} {median * 1e6:10.0f} {median / base:20.3f}")


if __name__ == "__main__":
    main()
