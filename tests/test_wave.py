"""Wave execution (dana.simulation.wave) against the one-at-a-time simulator."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dana
from dana.rules import ALGORITHMS, make_rule
from dana.simulation import SCHEDULES, Simulation, make_scheduler
from dana.simulation.wave import WaveSimulation
from dana.training.flat import FlatModel
from dana.training.worker_grads import WorkerGradients, stack_batches

WORKERS, STEPS, EPOCH = 4, 30, 7  # epochs of 7 gradients cut waves (and ssgd rounds) short


def layers():
    gen = torch.Generator().manual_seed(3)
    return [
        torch.randn(4, 3, generator=gen, dtype=torch.float64),
        torch.randn(5, generator=gen, dtype=torch.float64),
    ]


def quadratic_grad(params, worker):
    return [p - (worker + 1) * 0.1 for p in params]


def batched_quadratic_grad(params, workers):
    targets = (torch.tensor(workers, dtype=torch.float64) + 1) * 0.1
    return [p - targets.view(-1, *[1] * (p.dim() - 1)) for p in params]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_simulate_in_waves_is_bit_identical_on_elementwise_gradients(algorithm):
    for schedule in SCHEDULES:
        args = {
            "algorithm": algorithm,
            "workers": 1 if algorithm == "baseline" else 5,
            "steps": 37,
            "lr": lambda k: 0.05 / (1 + k // 10),
            "schedule": schedule,
            "seed": 2,
            "weight_decay": 1e-3,
        }
        one = dana.simulate(layers(), quadratic_grad, **args)
        wave = dana.simulate(layers(), batched_quadratic_grad, batched=True, **args)
        assert wave.order == one.order and wave.lag == one.lag and wave.gap == one.gap
        assert all(torch.equal(a, b) for a, b in zip(wave.params, one.params, strict=True))


def test_waves_hold_no_worker_twice_and_stop_at_the_round_for_ssgd():
    for algorithm in ("asgd", "ssgd"):
        rule = make_rule(algorithm)
        sim = WaveSimulation(
            rule,
            torch.zeros(3),
            workers=4,
            scheduler=make_scheduler("gamma", 4, seed=1, synchronous=rule.synchronous),
        )
        sizes = []
        for limit in [3, 50, 50, 2, 50, 50, 50]:
            updates = sim.step_wave(
                lambda p, w, k: torch.ones_like(p),
                0.1,
                limit,
            )
            workers = [u.worker for u in updates]
            assert len(set(workers)) == len(workers) <= limit
            sizes.append(len(workers))
        if algorithm == "ssgd":  # rounds of 4: 3, then the round's last one, then whole rounds
            assert sizes == [3, 1, 4, 2, 2, 4, 4]
        else:  # a wave ends where the next worker repeats; gamma makes that vary
            assert max(sizes) <= 4 and len(set(sizes)) > 1


# -- a real model, float64 ----------------------------------------------------------------
def mlp(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(10)] if batch_norm else []
    return nn.Sequential(nn.Linear(6, 10), *norm, nn.ReLU(), nn.Linear(10, 3)).double()


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


BATCHES = [
    (
        torch.randn(8, 6, generator=torch.Generator().manual_seed(k), dtype=torch.float64),
        torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1000 + k)),
    )
    for k in range(STEPS)
]


def make(algorithm, schedule, model, cls=Simulation, batched=True):
    workers = 1 if algorithm == "baseline" else WORKERS
    flat = FlatModel(model)
    rule = make_rule(algorithm, momentum=0.9, weight_decay=1e-3)
    scheduler = make_scheduler(schedule, workers, seed=4, synchronous=rule.synchronous)
    sim = cls(rule, flat.params, workers=workers, scheduler=scheduler, layer_sizes=flat.sizes)
    grads = WorkerGradients(flat, cross_entropy, workers, BATCHES.__getitem__, batched=batched)
    return sim, grads


def lr(k):
    return 0.1 * (1 + k) / STEPS  # a warm-up: each update has its own rate


def run_sequential(sim, grads, start=0, stop=STEPS):
    updates = []
    for k in range(start, stop):
        updates.append(sim.step(lambda p, w: grads.one(p, w, sim.gradients), lr(k)))
    return updates


def run_waves(sim, grads, start=0, stop=STEPS):
    updates = []
    while sim.gradients < stop:
        epoch_end = (sim.gradients // EPOCH + 1) * EPOCH
        updates += sim.step_wave(grads, lr, min(epoch_end, stop) - sim.gradients)
    return updates


def assert_same(sim_a, grads_a, ups_a, sim_b, grads_b, ups_b):
    assert [(u.worker, u.lag) for u in ups_a] == [(u.worker, u.lag) for u in ups_b]
    gaps_a = torch.stack([u.gap for u in ups_a])
    torch.testing.assert_close(gaps_a, torch.stack([u.gap for u in ups_b]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sim_a.params, sim_b.params, rtol=0, atol=1e-10)
    torch.testing.assert_close(sim_a.held, sim_b.held, rtol=0, atol=1e-10)
    for a, b in zip(grads_a.buffers, grads_b.buffers, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_waves_of_a_model_match_the_sequential_simulator(algorithm, schedule):
    for batch_norm in (False, True):
        seq, seq_grads = make(algorithm, schedule, mlp(batch_norm))
        ups_seq = run_sequential(seq, seq_grads)
        wave, wave_grads = make(algorithm, schedule, mlp(batch_norm), cls=WaveSimulation)
        ups_wave = run_waves(wave, wave_grads)
        assert wave_grads.batched  # the vmap path ran, not the fallback
        assert_same(seq, seq_grads, ups_seq, wave, wave_grads, ups_wave)
        if batch_norm and seq.workers > 1:
            # Every worker has its own statistics, and they moved.
            means = wave_grads.buffers[0]
            assert not torch.allclose(means[0], means[1]) and means.abs().min() > 0


def test_wave_checkpoint_resumes_exactly_in_either_mode():
    whole, whole_grads = make("dana", "gamma", mlp(True), cls=WaveSimulation)
    run_waves(whole, whole_grads)
    first, first_grads = make("dana", "gamma", mlp(True), cls=WaveSimulation)
    while first.gradients < 10 or not first.upcoming:  # stop where a draw waits in the state
        first.step_wave(first_grads, lr, (first.gradients // EPOCH + 1) * EPOCH - first.gradients)
    cut = first.gradients
    assert cut < STEPS - 5 and first.upcoming
    saved = copy.deepcopy((first.state_dict(), first_grads.state_dict()))
    for cls, run in ((WaveSimulation, run_waves), (Simulation, run_sequential)):
        resumed, grads = make("dana", "gamma", mlp(True), cls=cls)
        resumed.load_state_dict(copy.deepcopy(saved[0]))
        grads.load_state_dict(copy.deepcopy(saved[1]))
        run(resumed, grads, start=cut)
        torch.testing.assert_close(resumed.params, whole.params, rtol=0, atol=1e-10)
        for a, b in zip(grads.buffers, whole_grads.buffers, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


class ItemModel(nn.Module):
    """Calls ``.item()`` in forward: vmap cannot batch it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(True)

    def forward(self, x):
        scale = 1.0 + 0.0 * x.abs().max().item()
        return self.net(x) * scale


def test_a_model_vmap_cannot_batch_falls_back_with_one_notice(capsys):
    def item_model():
        model = ItemModel()
        model.net = mlp(True)
        return model

    seq, seq_grads = make("dana-zero", "gamma", item_model())
    ups_seq = run_sequential(seq, seq_grads)
    wave, wave_grads = make("dana-zero", "gamma", item_model(), cls=WaveSimulation)
    ups_wave = run_waves(wave, wave_grads)
    assert not wave_grads.batched
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "one worker at a time" in notice[0] and ".item()" in notice[0]
    # The fallback is the sequential path: bit for bit.
    assert torch.equal(seq.params, wave.params)
    for a, b in zip(seq_grads.buffers, wave_grads.buffers, strict=True):
        assert torch.equal(a, b)
    assert [u.worker for u in ups_seq] == [u.worker for u in ups_wave]


def test_a_wave_too_large_for_the_device_is_computed_in_halves_still_batched():
    # A device that runs out of memory on more than 2 rows at once: each wave is halved
    # (not a reason to stop batching) and the run is the sequential one to rounding.
    seq, seq_grads = make("dana", "block-random", mlp(True))
    ups_seq = run_sequential(seq, seq_grads)
    wave, wave_grads = make("dana", "block-random", mlp(True), cls=WaveSimulation)
    vmapped, sizes = wave_grads._vmapped, []

    def small_device(stacked, buffers, batch):
        sizes.append(len(stacked))
        if len(stacked) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return vmapped(stacked, buffers, batch)

    wave_grads._vmapped = small_device
    ups_wave = run_waves(wave, wave_grads)
    assert wave_grads.batched and max(sizes) == WORKERS and 2 in sizes
    assert_same(seq, seq_grads, ups_seq, wave, wave_grads, ups_wave)


def test_worker_gradients_match_the_trainer_step_and_its_statistics():
    """The trainer's own sequential path (Trainer.step) against a wave run."""
    from dana.data import Dataset
    from dana.training import Trainer

    images = torch.zeros(16, 1, 2, 3, dtype=torch.uint8)
    data = Dataset("tiny", images, torch.zeros(16, dtype=torch.int64), 3, (0.0,), (1.0,))

    class Flatten6(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(True)

        def forward(self, x):
            return self.net(x.reshape(len(x), 6))

    batches = [(x.view(8, 1, 2, 3), y) for x, y in BATCHES]
    trainer = Trainer(
        Flatten6(), data, data, algorithm="dana", workers=WORKERS, epochs=1, lr=0.1,
        weight_decay=1e-3, batch_size=8, schedule="gamma", seed=4,
    )  # fmt: skip
    ups_trainer = [trainer.step(batch, lr(k)) for k, batch in enumerate(batches)]

    flat = FlatModel(Flatten6())
    rule = make_rule("dana", momentum=0.9, weight_decay=1e-3)
    wave = WaveSimulation(
        rule,
        flat.params,
        workers=WORKERS,
        scheduler=make_scheduler("gamma", WORKERS, seed=4),
        layer_sizes=flat.sizes,
    )
    grads = WorkerGradients(flat, cross_entropy, WORKERS, batches.__getitem__)
    ups_wave = run_waves(wave, grads)
    assert [(u.worker, u.lag) for u in ups_trainer] == [(u.worker, u.lag) for u in ups_wave]
    torch.testing.assert_close(trainer.sim.params, wave.params, rtol=0, atol=1e-10)
    for i, worker_buffers in enumerate(trainer.worker_buffers):
        for a, b in zip(worker_buffers, grads.buffers, strict=True):
            torch.testing.assert_close(a, b[i], rtol=0, atol=1e-10)
    # The master's statistics: last writer wins.
    grads.load_buffers(ups_wave[-1].worker)
    trainer.load_master_into_model()
    for a, b in zip(trainer.flat.buffers, flat.buffers, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_stack_batches_keeps_the_pytree():
    a = {"x": torch.zeros(2, 3), "y": (torch.ones(2), torch.arange(2))}
    b = {"x": torch.ones(2, 3), "y": (torch.zeros(2), torch.arange(2) + 5)}
    stacked = stack_batches([a, b])
    assert stacked["x"].shape == (2, 2, 3) and isinstance(stacked["y"], tuple)
    assert torch.equal(stacked["y"][1], torch.tensor([[0, 1], [5, 6]]))


def test_a_checkpoint_without_draws_ahead_still_loads():
    sim, grads = make("asgd", "block-random", mlp(False))
    run_sequential(sim, grads, stop=5)
    state = sim.state_dict()
    del state["upcoming"]  # written before waves existed
    resumed, _ = make("asgd", "block-random", mlp(False), cls=WaveSimulation)
    resumed.load_state_dict(state)
    assert resumed.upcoming == []
    wave = resumed.next_wave(10)  # the rest of the block, at least
    assert len(wave) >= 3 and wave == sim.peek(len(wave))


def test_waves_by_default_only_off_the_cpu():
    from dana.training.worker_grads import use_waves

    assert not use_waves("cpu") and use_waves("cuda") and use_waves(torch.device("cuda:1"))


def _out_of_memory(*args):
    raise torch.OutOfMemoryError("CUDA out of memory")


@pytest.mark.parametrize("out_of_memory", [False, True])
def test_batched_runs_equal_the_same_runs_made_alone(monkeypatch, out_of_memory):
    from dana.simulation.wave import step_waves
    from dana.training import worker_grads
    from dana.training.worker_grads import gradients_of_runs

    # Three runs with their own algorithm, schedule, seed, learning rate and data stream.
    specs = [("dana", "gamma", 1, 0.1, 0), ("nag-asgd", "block-random", 2, 0.05, 5),
             ("ssgd", "round-robin", 3, 0.02, 11)]  # fmt: skip

    def build(algorithm, schedule, seed, rate, offset):
        flat = FlatModel(mlp(True))
        rule = make_rule(algorithm, momentum=0.9, weight_decay=1e-3)
        scheduler = make_scheduler(schedule, WORKERS, seed=seed, synchronous=rule.synchronous)
        sim = WaveSimulation(
            rule, flat.params, workers=WORKERS, scheduler=scheduler, layer_sizes=flat.sizes
        )
        batches = lambda k: BATCHES[(k + offset) % STEPS]  # noqa: E731
        return sim, WorkerGradients(flat, cross_entropy, WORKERS, batches), rate

    alone = []
    for spec in specs:
        sim, grads, rate = build(*spec)
        updates = []
        for _ in range(STEPS):
            updates.append(sim.step(lambda p, w, s=sim, g=grads: g.one(p, w, s.gradients), rate))
        alone.append((sim, grads, updates))
    runs = [build(*spec) for spec in specs]
    grad_fn = gradients_of_runs([grads for _, grads, _ in runs])
    if out_of_memory:  # the runs together do not fit: each run's wave on its own, batched
        monkeypatch.setattr(worker_grads, "_many", _out_of_memory)
    together = [[] for _ in runs]
    while any(sim.gradients < STEPS for sim, _, _ in runs):
        limits = [min((s.gradients // EPOCH + 1) * EPOCH, STEPS) - s.gradients for s, _, _ in runs]
        waves = step_waves([s for s, _, _ in runs], grad_fn, [r for _, _, r in runs], limits)
        for mine, wave in zip(together, waves, strict=True):
            mine += wave
    assert all(grads.batched for _, grads, _ in runs)
    for (sim_a, grads_a, ups_a), (sim_b, grads_b, _), ups_b in zip(
        alone, runs, together, strict=True
    ):
        assert_same(sim_a, grads_a, ups_a, sim_b, grads_b, ups_b)


def test_runs_of_different_models_cannot_be_batched_together():
    from dana.training.worker_grads import gradients_of_runs

    a = WorkerGradients(FlatModel(mlp(True)), cross_entropy, 2, BATCHES.__getitem__)
    b = WorkerGradients(FlatModel(mlp(False)), cross_entropy, 2, BATCHES.__getitem__)
    with pytest.raises(ValueError, match="one architecture"):
        gradients_of_runs([a, b])
