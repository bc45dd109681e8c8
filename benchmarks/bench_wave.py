"""Gradients/s of the sequential and the wave simulator against plain PyTorch loops (issue 10).

For each N: a plain loop at batch B (one worker's work, one gradient per step), a plain loop
at batch N·B (the same work as N gradients, as one step: the hardware's own limit), the
sequential simulator (one gradient at a time, ``WorkerGradients.one``) and the wave
simulator (``WaveSimulation`` + ``WorkerGradients``: every gradient of a wave in one vmap
call). The simulators run ``dana`` with the gap logged, as every run does. Contenders
alternate over the rounds and the median is kept, so the ratios come from one run.

On a CPU the clock is the process's CPU time (single-threaded: what it computed, not the
time other users of a shared machine took); on CUDA it is wall time after a synchronize.

    .venv/bin/python benchmarks/bench_wave.py --model lenet-300-100-bn --threads 1
    .venv/bin/python benchmarks/bench_wave.py --model resnet20 --batch-size 32 --gradients 32 \\
        --rounds 1 --threads 1
    .venv/bin/python benchmarks/bench_wave.py --model resnet20 --device cuda --channels-last --bf16
    .venv/bin/python benchmarks/bench_wave.py --trainer --workers 8 --threads 1

``--trainer``: the training path instead, ``dana.training.Trainer`` one epoch of
``--gradients`` gradients (no evaluation) per round with ``waves="off"`` and ``"on"``, and
``--runs K`` such trainers trained together (``train_group``, K epochs' work per round).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from dana.data import Dataset, TrainLoader, load_dataset, resolve_data_dir
from dana.models import build_model
from dana.rules import make_rule
from dana.simulation import Simulation, make_scheduler
from dana.simulation.wave import WaveSimulation, step_waves
from dana.training.flat import FlatModel
from dana.training.worker_grads import WorkerGradients, gradients_of_runs


def dataset(model_name: str, samples: int) -> Dataset:
    """Fashion-MNIST for the 28×28 models, CIFAR-shaped random images for the others."""
    if model_name in ("cnn", "lenet-300-100", "lenet-300-100-bn"):
        return load_dataset("fashion-mnist", resolve_data_dir(None), train=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (samples, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (samples,), generator=gen)
    return Dataset("random-cifar", images, labels, 10, (0.5,) * 3, (0.25,) * 3)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        data = dataset(args.model, args.batch_size * args.gradients)
        loader = TrainLoader(data, args.batch_size, seed=0, device=args.device)
        count = min(loader.batches_per_epoch, args.gradients)
        memory = torch.channels_last if args.channels_last else torch.contiguous_format
        self.batches = [
            (x.to(memory_format=memory), y) for x, y in (loader.batch(0, i) for i in range(count))
        ]
        self.shape = data.images.shape[1:]
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if args.bf16
            else contextlib.nullcontext
        )

    def batch(self, k: int):
        return self.batches[k % len(self.batches)]

    def loss(self, model, batch):
        with self.autocast():
            return F.cross_entropy(model(batch[0]), batch[1])

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        c, h, _ = self.shape
        model = build_model(self.args.model, num_classes=10, in_channels=c, image_size=h)
        return model.to(self.device)

    def plain(self, workers: int):
        """A plain loop at batch N·B: N consecutive batches concatenated, one step each."""
        model = self.model()
        if self.args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(
            model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        big = [
            tuple(
                torch.cat(t) for t in zip(*(self.batch(i + j) for j in range(workers)), strict=True)
            )
            for i in range(0, self.args.gradients, workers)
        ]

        def run(gradients: int) -> None:
            for batch in big[: max(1, gradients // workers)]:
                opt.zero_grad(set_to_none=False)
                self.loss(model, batch).backward()
                opt.step()

        return run

    def simulator(self, workers: int, waves: bool, gap: bool = True):
        flat = FlatModel(self.model())
        rule = make_rule("dana", momentum=0.9, weight_decay=5e-4)
        scheduler = make_scheduler(self.args.schedule, workers, seed=0)
        cls = WaveSimulation if waves else Simulation
        sizes = flat.sizes if gap else None
        sim = cls(rule, flat.params, workers=workers, scheduler=scheduler, layer_sizes=sizes)
        grads = WorkerGradients(flat, self.loss, workers, self.batch)
        wave_sizes: list[int] = []

        def run(gradients: int) -> None:
            for _ in range(0 if waves else gradients):
                sim.step(lambda p, w: grads.one(p, w, sim.gradients), 0.01)
            done = 0
            while waves and done < gradients:
                updates = sim.step_wave(grads, 0.01, gradients - done)
                done += len(updates)
                wave_sizes.append(len(updates))

        run.sizes = wave_sizes  # type: ignore[attr-defined]
        run.grads = grads  # type: ignore[attr-defined]
        return run

    def runs(self, workers: int, count: int):
        """``count`` independent wave runs (seeds 0, 1, …) sharing each gradient call;
        each run computes ``gradients / count`` gradients, so the work is the same."""
        sims, grads = [], []
        for seed in range(count):
            flat = FlatModel(self.model())
            rule = make_rule("dana", momentum=0.9, weight_decay=5e-4)
            scheduler = make_scheduler(self.args.schedule, workers, seed=seed)
            sims.append(
                WaveSimulation(
                    rule, flat.params, workers=workers, scheduler=scheduler, layer_sizes=flat.sizes
                )
            )
            grads.append(WorkerGradients(flat, self.loss, workers, self.batch))
        grad_fn = gradients_of_runs(grads)

        def run(gradients: int) -> None:
            goal = [sim.gradients + max(1, gradients // count) for sim in sims]
            while any(sim.gradients < g for sim, g in zip(sims, goal, strict=True)):
                limits = [g - sim.gradients for sim, g in zip(sims, goal, strict=True)]
                step_waves(sims, grad_fn, [0.01] * count, limits)

        run.sizes = [workers]  # type: ignore[attr-defined]
        run.grads = grads[0]  # type: ignore[attr-defined]
        return run

    def trainer(self, workers: int, waves: str, seed: int = 0, gap_every: int = 1):
        """A Trainer whose epochs are ``--gradients`` gradients of this benchmark's data."""
        from dana.training import Trainer

        count = self.args.gradients * self.args.batch_size
        x = torch.cat([x for x, _ in self.batches])[:count]
        y = torch.cat([y for _, y in self.batches])[:count]
        return Trainer(
            self.model,
            (x, y),
            loss=self.loss,
            algorithm="dana",
            workers=workers,
            epochs=self.args.rounds + 2,
            lr=0.01,
            weight_decay=5e-4,
            batch_size=self.args.batch_size,
            schedule=self.args.schedule,
            seed=seed,
            device=self.device,
            waves=waves,
            gap_every=gap_every,
        )

    def trainer_epoch(self, workers: int, waves: str, gap_every: int = 1):
        trainer = self.trainer(workers, waves, gap_every=gap_every)
        return lambda gradients: trainer.run_epoch()

    def trainer_group(self, workers: int, count: int):
        from dana.training.group import train_group

        trainers = [self.trainer(workers, "on", seed) for seed in range(count)]

        def run(gradients: int) -> None:  # one epoch of each trainer
            train_group(trainers, epochs=1)

        return run

    def timed(self, run) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            run()
            torch.cuda.synchronize(self.device)
            return time.perf_counter() - start
        start = time.process_time()
        run()
        return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet-300-100-bn")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--gradients", type=int, default=64, help="per contender and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--schedule", default="block-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--channels-last", action="store_true", help="images channels_last")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every forward")
    parser.add_argument(
        "--runs", type=int, default=0, help="also K wave runs batched together (K = --runs)"
    )
    parser.add_argument(
        "--gapless", action="store_true", help="also the sequential simulator without the gap"
    )
    parser.add_argument(
        "--trainer", action="store_true", help="the Trainer's epochs (waves off/on) instead"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.trainer and any(args.gradients % (n * max(1, args.runs)) for n in args.workers):
        parser.error("--gradients must be a multiple of every --workers value (times --runs)")
    bench = Bench(args)
    print(
        f"model {args.model}, batch B = {args.batch_size}, {args.gradients} gradients x "
        f"{args.rounds} rounds, dana, {args.schedule}, device {args.device}, "
        f"{torch.get_num_threads()} threads, channels_last {args.channels_last}, "
        f"bf16 {args.bf16}"
    )
    header = f"{'N':>3} {'contender':18} {'grads/s':>9} {'/ plain B':>10} {'/ plain NB':>11}"
    print(header)
    if args.trainer:
        return bench_trainer(bench, args)
    for workers in args.workers:
        contenders = {
            "plain B": bench.plain(1),
            "plain N*B": bench.plain(workers),
            "sequential": bench.simulator(workers, waves=False),
            "wave": bench.simulator(workers, waves=True),
        }
        if args.runs:
            contenders[f"wave, {args.runs} runs"] = bench.runs(workers, args.runs)
        if args.gapless:
            contenders["sequential no gap"] = bench.simulator(workers, waves=False, gap=False)
        for run in contenders.values():  # warm-up: allocator, kernels, one whole wave
            run(workers)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, run in contenders.items():
                times[name].append(bench.timed(lambda: run(args.gradients)))  # noqa: B023
        rate = {name: args.gradients / statistics.median(t) for name, t in times.items()}
        for name in contenders:
            print(
                f"{workers:3d} {name:18} {rate[name]:9.1f} {rate[name] / rate['plain B']:10.3f} "
                f"{rate[name] / rate['plain N*B']:11.3f}"
            )
        wave = contenders["wave"]
        mean_size = statistics.mean(wave.sizes[1:])  # the warm-up's excluded  # type: ignore[attr-defined]
        batched = "vmap" if wave.grads.batched else "fallback"  # type: ignore[attr-defined]
        print(
            f"{workers:3d} wave / sequential {rate['wave'] / rate['sequential']:.3f} "
            f"(mean wave {mean_size:.1f} gradients, {batched})"
        )


def bench_trainer(bench: Bench, args: argparse.Namespace) -> None:
    """Trainer epochs, waves off and on (and K runs together), against the plain loops."""
    for workers in args.workers:
        contenders = {
            "plain B": bench.plain(1),
            "plain N*B": bench.plain(workers),
            "trainer seq": bench.trainer_epoch(workers, "off"),
            "trainer seq gap/16": bench.trainer_epoch(workers, "off", gap_every=16),
            "trainer waves": bench.trainer_epoch(workers, "on"),
        }
        work = dict.fromkeys(contenders, args.gradients)
        if args.runs:
            name = f"{args.runs} trainers"
            contenders[name] = bench.trainer_group(workers, args.runs)
            work[name] = args.gradients * args.runs
        for run in contenders.values():  # warm-up
            run(args.gradients)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, run in contenders.items():
                times[name].append(bench.timed(lambda: run(args.gradients)))  # noqa: B023
        rate = {name: work[name] / statistics.median(t) for name, t in times.items()}
        for name in contenders:
            print(
                f"{workers:3d} {name:18} {rate[name]:9.1f} {rate[name] / rate['plain B']:10.3f} "
                f"{rate[name] / rate['plain N*B']:11.3f}"
            )
        print(f"{workers:3d} trainer waves / seq {rate['trainer waves'] / rate['trainer seq']:.3f}")


if __name__ == "__main__":
    main()
