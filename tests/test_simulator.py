"""The simulator's event model: schedules, lags, gaps, determinism (SPEC "simulator")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dana
from dana.rules import make_rule
from dana.simulation import (
    BlockRandom,
    GammaEvents,
    Gap,
    Simulation,
    SyncGamma,
    gamma_durations,
    make_scheduler,
)


def quadratic_grad(params, worker):
    """∇ of ½‖p − t_w‖² with a per-worker target: gradients depend on where they are taken."""
    return [p - (worker + 1) * 0.1 for p in params]


def layers():
    gen = torch.Generator().manual_seed(3)
    return [
        torch.randn(4, 3, generator=gen, dtype=torch.float64),
        torch.randn(5, generator=gen, dtype=torch.float64),
    ]


def test_round_robin_order_and_lags():
    r = dana.simulate(layers(), quadratic_grad, algorithm="nag-asgd", workers=4, steps=14, lr=0.1)
    assert r.order == [0, 1, 2, 3] * 3 + [0, 1]
    assert r.lag == [0, 1, 2, 3] + [3] * 10


def test_block_random_blocks_are_permutations_in_fresh_orders():
    r = dana.simulate(
        layers(),
        quadratic_grad,
        algorithm="dana",
        workers=5,
        steps=200,
        lr=0.1,
        schedule="block-random",
        seed=11,
    )
    blocks = [tuple(r.order[i : i + 5]) for i in range(0, 200, 5)]
    assert all(sorted(b) == list(range(5)) for b in blocks)
    assert len(set(blocks)) > 10
    # The lag is the number of updates since the worker last received parameters.
    last = dict.fromkeys(range(5), 0)
    for k, (w, lag) in enumerate(zip(r.order, r.lag, strict=True)):
        assert lag == k - last[w]
        last[w] = k + 1


def test_gamma_draws_have_mean_b_and_variation_v():
    draws = gamma_durations(np.random.default_rng(0), 400_000, batch_size=128)
    assert draws.mean() == pytest.approx(128, rel=2e-3)
    assert draws.std() / draws.mean() == pytest.approx(0.1, rel=1e-2)


def test_gamma_order_follows_the_event_queue():
    n, steps, seed = 6, 300, 5
    scheduler = GammaEvents(n, seed, batch_size=128)
    got = [scheduler.next_worker() for _ in range(steps)]
    # Independent derivation: same draw order, but an argmin over finish times, no heap.
    rng = np.random.Generator(np.random.PCG64(seed))
    finish = list(rng.gamma(100.0, 1.28, size=n))
    expected = []
    for _ in range(steps):
        w = min(range(n), key=lambda i: (finish[i], i))
        expected.append(w)
        now = finish[w]
        finish[w] += rng.gamma(100.0, 1.28)
    assert got == expected
    assert scheduler.now == pytest.approx(now, rel=1e-12)  # simulated time of the last event


def test_gamma_lags_vary_and_average_n_minus_one():
    r = dana.simulate(
        layers(),
        quadratic_grad,
        algorithm="asgd",
        workers=8,
        steps=4000,
        lr=0.01,
        schedule="gamma",
        seed=2,
    )
    steady = r.lag[100:]
    assert len(set(steady)) > 3  # stragglers arise on their own
    assert np.mean(steady) == pytest.approx(7, abs=0.1)


def test_ssgd_rounds_hold_each_worker_once_under_every_schedule():
    for schedule in ("round-robin", "block-random", "gamma"):
        scheduler = make_scheduler(schedule, 4, seed=1, synchronous=True)
        order = [scheduler.next_worker() for _ in range(40)]
        assert all(sorted(order[i : i + 4]) == [0, 1, 2, 3] for i in range(0, 40, 4))
    assert isinstance(make_scheduler("gamma", 4, seed=1, synchronous=True), SyncGamma)
    r = dana.simulate(layers(), quadratic_grad, algorithm="ssgd", workers=4, steps=12, lr=0.1)
    assert r.lag == [0] * 12
    assert r.gap == [0.0] * 12


def test_gap_against_a_direct_computation():
    # NAG-ASGD by hand, round-robin: the gap of an update is G(params it was computed at −
    # master's params when applied), G = Σ_layers ‖ψ‖/√m.
    n, steps, lr, gamma = 3, 12, 0.1, 0.9
    start = layers()
    held = [[p.clone() for p in start] for _ in range(n)]
    theta = [p.clone() for p in start]
    v = [torch.zeros_like(p) for p in start]
    expected = []
    for k in range(steps):
        w = k % n
        g = quadratic_grad(held[w], w)
        expected.append(
            sum(
                torch.linalg.vector_norm(a - b).item() / math.sqrt(a.numel())
                for a, b in zip(held[w], theta, strict=True)
            )
        )
        for t, vel, gi in zip(theta, v, g, strict=True):
            vel.mul_(gamma).add_(gi)
            t.sub_(lr * (gi + gamma * vel))
        held[w] = [t.clone() for t in theta]
    r = dana.simulate(start, quadratic_grad, algorithm="nag-asgd", workers=n, steps=steps, lr=lr)
    assert r.gap == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert r.gap[0] == 0.0 and r.gap[1] > 0.0
    for a, b in zip(r.params, theta, strict=True):
        torch.testing.assert_close(a, b)


def test_gap_class_weights_each_layer_by_its_size():
    gap = Gap([4, 1])
    value = gap(torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0]))
    assert value.item() == pytest.approx(2 / 2 + 3 / 1)


def test_gaps_order_as_in_paper_figure_1b():
    # Workers with similar gradients (a shared quadratic): NAG-ASGD's momentum blows the gap
    # up, while DANA's look-ahead keeps it near momentum-free ASGD's (paper Equation 5).
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20, 20, generator=gen, dtype=torch.float64)
    hessian = a @ a.T / 20 + 0.1 * torch.eye(20, dtype=torch.float64)

    def mean_gap(algorithm):
        r = dana.simulate(
            torch.full((20,), 5.0, dtype=torch.float64),
            lambda p, w: [hessian @ p[0]],
            algorithm=algorithm,
            workers=8,
            steps=200,
            lr=0.01,
            schedule="block-random",
            seed=0,
        )
        return np.mean(r.gap)

    asgd, nag, dana_gap = mean_gap("asgd"), mean_gap("nag-asgd"), mean_gap("dana")
    assert nag > 10 * dana_gap
    assert dana_gap < 2 * asgd


def test_same_seed_is_bit_identical_and_other_seeds_differ():
    def once(seed):
        return dana.simulate(
            layers(),
            quadratic_grad,
            algorithm="dana",
            workers=6,
            steps=300,
            lr=0.05,
            schedule="gamma",
            seed=seed,
            weight_decay=1e-4,
        )

    a, b, c = once(4), once(4), once(5)
    assert a.order == b.order and a.lag == b.lag and a.gap == b.gap
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params, strict=True))
    assert a.order != c.order


def test_inputs_are_not_modified_and_dtype_is_kept():
    start = layers()
    before = [p.clone() for p in start]
    r = dana.simulate(start, quadratic_grad, algorithm="dana-zero", workers=3, steps=20, lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(start, before, strict=True))
    assert [p.dtype for p in r.params] == [torch.float64, torch.float64]
    assert [p.shape for p in r.params] == [p.shape for p in start]
    single = dana.simulate(
        torch.ones(3), lambda p, w: p[0], algorithm="asgd", workers=1, steps=1, lr=0.5
    )
    torch.testing.assert_close(single.params[0], torch.full((3,), 0.5))


def test_lr_callable_receives_the_number_of_gradients_done():
    seen = []

    def lr(k):
        seen.append(k)
        return 0.1

    dana.simulate(
        torch.zeros(2), lambda p, w: [torch.ones(2)], algorithm="asgd", workers=2, steps=5, lr=lr
    )
    assert seen[:5] == [0, 1, 2, 3, 4]
    assert max(seen) == 4  # never past the last gradient (a list of 5 rates is enough)


def test_ssgd_warm_up_ramps_the_step_from_lr_to_n_lr():
    # γ = 0 and a constant gradient g = 1: each round moves θ by N·lr(k), k the count of
    # gradients before the round's last one. The schedule ramps η/N → η over 2 epochs of
    # 8 gradients, so SSGD's step ramps η → η·N (SPEC), then stays at η·N.
    from dana.training import LRSchedule

    n, eta = 4, 0.1
    schedule = LRSchedule(lr=eta, workers=n, steps_per_epoch=8, warmup_epochs=2)
    r = dana.simulate(
        torch.zeros(1, dtype=torch.float64),
        lambda p, w: [torch.ones(1)],
        algorithm="ssgd",
        workers=n,
        steps=32,
        lr=schedule,
        momentum=0.0,
    )
    steps = [n * schedule(k) for k in range(n - 1, 32, n)]
    assert steps[0] == pytest.approx(eta * (1 + (n - 1) * 3 / 16))
    assert steps[-1] == pytest.approx(eta * n)
    assert r.params[0].item() == pytest.approx(-sum(steps))


def test_more_user_mistakes_are_one_line_errors():
    bad = [
        ({"params": torch.zeros(3, dtype=torch.int64)}, "floating-point"),
        ({"params": [torch.zeros(0), torch.zeros(2)]}, "empty tensor"),
        ({"workers": True}, "workers must be"),
        ({"steps": -1}, "steps must be"),
    ]
    for change, match in bad:
        args = {"params": torch.zeros(2), "algorithm": "dana", "workers": 2, "steps": 1, "lr": 0.1}
        args |= change
        with pytest.raises(dana.DanaError, match=match):
            dana.simulate(args.pop("params"), lambda p, w: [torch.zeros_like(x) for x in p], **args)


def test_simulation_state_dict_resumes_bit_for_bit():
    def build(seed=9):
        rule = make_rule("dana", momentum=0.9)
        flat = torch.cat([p.reshape(-1) for p in layers()])
        scheduler = make_scheduler("gamma", 5, seed=seed)
        return Simulation(rule, flat, workers=5, scheduler=scheduler, layer_sizes=[12, 5])

    def grad(p, w):
        return p - 0.1 * (w + 1)

    whole = build()
    for _ in range(80):
        whole.step(grad, 0.05)
    first = build()
    for _ in range(35):
        first.step(grad, 0.05)
    saved = first.state_dict()
    path_state = {k: v for k, v in saved.items()}
    resumed = build(seed=123)  # the seed is overwritten by the loaded state
    resumed.load_state_dict(path_state)
    for _ in range(45):
        resumed.step(grad, 0.05)
    assert torch.equal(whole.params, resumed.params)
    assert torch.equal(whole.held, resumed.held)


def test_block_random_state_round_trip():
    a = BlockRandom(7, seed=3)
    [a.next_worker() for _ in range(10)]
    b = BlockRandom(7, seed=0)
    b.load_state_dict(a.state_dict())
    assert [a.next_worker() for _ in range(30)] == [b.next_worker() for _ in range(30)]


@pytest.mark.parametrize("algorithm", ["dana", "asgd", "dana-zero"])
def test_gap_every_k_measures_the_same_gaps_on_every_kth_update_and_trains_the_same(algorithm):
    # dana's θ form needs Σⱼvⱼ: kept running for k = 1, summed when measured for k > 1.
    def build(gap_every, seed=4):
        flat = torch.cat([p.reshape(-1) for p in layers()])
        return Simulation(
            make_rule(algorithm, momentum=0.9, weight_decay=1e-3),
            flat,
            workers=5,
            scheduler=make_scheduler("block-random", 5, seed=seed),
            layer_sizes=[12, 5],
            gap_every=gap_every,
        )

    def grad(p, w):
        return p - 0.1 * (w + 1)

    every, sampled = build(1), build(3)
    full = [every.step(grad, 0.05) for _ in range(40)]
    some = [sampled.step(grad, 0.05) for _ in range(40)]
    assert sampled.velocity_sum is None  # not kept when the gap is sampled
    assert torch.equal(every.params, sampled.params)  # the gap never changes the training
    assert [u.lag for u in full] == [u.lag for u in some]
    for k, (a, b) in enumerate(zip(full, some, strict=True)):
        if k % 3:
            assert b.gap is None
        else:
            assert float(b.gap) == pytest.approx(float(a.gap), rel=1e-12, abs=1e-15)
    assert any(float(u.gap) > 0 for u in full[1:])

    # A state saved with k = 1 resumes with k = 3 and back: Σⱼvⱼ dropped, or re-summed.
    resumed = build(3, seed=99)
    resumed.load_state_dict(every.state_dict())
    assert resumed.velocity_sum is None
    back = build(1, seed=99)
    back.load_state_dict(sampled.state_dict())
    if algorithm == "dana":
        total = sum(s.velocity for s in every.worker_states)
        assert torch.allclose(back.velocity_sum, total, rtol=1e-12, atol=1e-15)
    u1, u2 = every.step(grad, 0.05), back.step(grad, 0.05)
    assert float(u1.gap) == pytest.approx(float(u2.gap), rel=1e-12, abs=1e-15)
    assert torch.equal(every.params, back.params)


def test_gap_every_rejects_what_is_not_a_positive_integer():
    flat = torch.zeros(3)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(dana.DanaError, match="gap_every must be an integer >= 1"):
            Simulation(
                make_rule("asgd"),
                flat,
                workers=2,
                scheduler=make_scheduler("round-robin", 2, seed=0),
                layer_sizes=[3],
                gap_every=bad,
            )
