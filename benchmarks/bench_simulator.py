"""Simulator throughput against a plain PyTorch training loop (issue: core, performance).

Both train the same model from the same initialisation on the same batches; the plain
loop is ``torch.optim.SGD(momentum=0.9, nesterov=True)``. The simulator runs ``dana`` and
``dana-zero`` with N = 1, 8, 32 workers (gap and lag logged, as in every run; and ``dana``
with the gap measured on every K-th gradient only, ``--gap-every``). Timings
alternate between the contenders over several rounds and the median is kept, so the
ratios come from one run on the same (noisy, shared) machine.

    .venv/bin/python benchmarks/bench_simulator.py               # CNN, Fashion-MNIST
    .venv/bin/python benchmarks/bench_simulator.py --model resnet20 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dana.data import TrainLoader, load_dataset, resolve_data_dir
from dana.models import build_model
from dana.training import Trainer


def batches(model_name: str, count: int, batch_size: int, device: str):
    """Real Fashion-MNIST batches for the CNN and the LeNets, CIFAR-shaped random images
    otherwise."""
    if model_name == "cnn" or model_name.startswith("lenet"):
        data = load_dataset("fashion-mnist", resolve_data_dir(None), train=True)
    else:
        from dana.data import Dataset

        gen = torch.Generator().manual_seed(0)
        images = torch.randint(
            0, 256, (batch_size * count, 3, 32, 32), dtype=torch.uint8, generator=gen
        )
        labels = torch.randint(0, 10, (batch_size * count,), generator=gen)
        data = Dataset("random-cifar", images, labels, 10, (0.5,) * 3, (0.25,) * 3)
    loader = TrainLoader(data, batch_size, seed=0, device=device)
    out = []
    for x, y in loader.epoch(0):
        out.append((x, y))
        if len(out) == count:
            return data, out
    return data, out


def build(model_name: str, in_channels: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    size = 28 if in_channels == 1 else 32  # Fashion-MNIST or CIFAR-shaped
    return build_model(model_name, num_classes=10, in_channels=in_channels, image_size=size).to(
        device
    )


def plain_loop(model, data, device):
    opt = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
    )

    def run(batch_list):
        for x, y in batch_list:
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    return run


def simulator(model, data, algorithm, workers, device, gap_every=1):
    trainer = Trainer(
        model,
        data,
        data,
        algorithm=algorithm,
        workers=workers,
        epochs=1,
        lr=0.01,
        weight_decay=5e-4,
        batch_size=128,
        device=device,
        gap_every=gap_every,
    )

    def run(batch_list):
        for batch in batch_list:
            trainer.step(batch, 0.01)

    return run


def timed(run, batch_list, device) -> float:
    """Seconds of ``run``: the process's CPU time on a CPU (the other users of a shared
    machine do not count; one thread gives the work itself), wall time on a GPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        run(batch_list)
        torch.cuda.synchronize(device)
        return time.perf_counter() - start
    start = time.process_time()
    run(batch_list)
    return time.process_time() - start


def overhead_per_update(model, algorithm: str, workers: int, device: str, steps: int) -> float:
    """Seconds per update of the simulator alone: rules, copies, gap; gradient precomputed."""
    from dana.rules import make_rule
    from dana.simulation import Simulation, make_scheduler
    from dana.training.flat import FlatModel

    flat = FlatModel(model)
    sim = Simulation(
        make_rule(algorithm, weight_decay=5e-4),
        flat.params,
        workers=workers,
        scheduler=make_scheduler("block-random", workers, seed=0),
        layer_sizes=flat.sizes,
    )
    grad = torch.randn_like(flat.params) * 1e-3
    views = [flat.views(row) for row in sim.held]

    def grad_fn(params, worker):
        flat.point_at(views[worker])  # the trainer's re-pointing of the model, counted
        return grad.clone()

    run = lambda: [sim.step(grad_fn, 0.01) for _ in range(steps)]  # noqa: E731
    run()
    return timed(lambda _: run(), None, device) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--steps", type=int, default=60, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--gap-every",
        type=int,
        default=16,
        metavar="K",
        help="also time dana measuring the gap on every K-th gradient only (0: not)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data, batch_list = batches(args.model, args.steps, 128, args.device)
    channels = data.images.shape[1]
    contenders = {
        "plain PyTorch loop": plain_loop(
            build(args.model, channels, args.device), data, args.device
        )
    }
    for algorithm in ("dana", "dana-zero"):
        for workers in (1, 8, 32):
            model = build(args.model, channels, args.device)
            contenders[f"{algorithm} N={workers}"] = simulator(
                model, data, algorithm, workers, args.device
            )
    if args.gap_every > 1:
        for workers in (1, 8, 32):
            model = build(args.model, channels, args.device)
            contenders[f"dana N={workers} gap/{args.gap_every}"] = simulator(
                model, data, "dana", workers, args.device, args.gap_every
            )
    for run in contenders.values():  # warm-up: allocator, kernels, caches
        timed(run, batch_list[:5], args.device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            times[name].append(timed(run, batch_list, args.device))
    images = args.steps * 128
    base = statistics.median(times["plain PyTorch loop"])
    per_batch = base / args.steps
    print(
        f"model {args.model}, batch 128, {args.steps} batches x {args.rounds} rounds, "
        f"device {args.device}, {torch.get_num_threads()} threads"
    )
    print(f"{'contender':24} {'images/s':>10} {'ratio to plain':>15}")
    for name, samples in times.items():
        t = statistics.median(samples)
        print(f"{name:24} {images / t:10.0f} {base / t:15.3f}")
    print(
        f"\nsimulator alone (precomputed gradient) against one plain training step "
        f"({per_batch * 1e3:.2f} ms):"
    )
    for algorithm in ("dana", "dana-zero"):
        for workers in (1, 8, 32):
            model = build(args.model, channels, args.device)
            cost = overhead_per_update(model, algorithm, workers, args.device, 200)
            print(
                f"{algorithm} N={workers:<3} {cost * 1e6:8.1f} us per update = "
                f"{cost / per_batch:6.2%} of a training step"
            )


if __name__ == "__main__":
    main()
