"""The Adam family: adam-asgd, nadam-asgd and dana-nadam against torch.optim at N = 1, and
dana-nadam against a plain reference implementation with N workers in a skewed order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dana
from dana.rules import make_rule
from dana.simulation import Gap, Scheduler, Simulation

F64 = torch.float64


def problem(seed: int = 0):
    """Three layers, a nonlinear loss whose batch depends on the gradient count."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=F64) * 0.5 for s in [(4, 3), (4,), (2, 4)]]
    xs = torch.randn(30, 16, 3, generator=gen, dtype=F64)
    ys = torch.randn(30, 16, 2, generator=gen, dtype=F64)

    def grads(ps, k):
        leaves = [p.detach().clone().requires_grad_() for p in ps]
        w1, b1, w2 = leaves
        loss = ((torch.tanh(xs[k % 30] @ w1.T + b1) @ w2.T - ys[k % 30]) ** 2).mean()
        return list(torch.autograd.grad(loss, leaves))

    return params, grads


def counting(grads):
    calls = []

    def grad_fn(ps, worker):
        calls.append(0)
        return grads(ps, len(calls) - 1)

    return grad_fn


def schedule(k: int) -> float:
    return 0.01 if k < 15 else 0.004 + 0.001 * (k % 3)


def torch_run(optimizer, params, grads, total, **kwargs):
    """``optimizer`` on the same gradient sequence, float64 throughout (NAdam's μ product
    and step counters are tensors of the default dtype)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        leaves = [p.detach().clone().requires_grad_() for p in params]
        opt = optimizer(leaves, lr=schedule(0), **kwargs)
        for k in range(total):
            opt.param_groups[0]["lr"] = schedule(k)
            for leaf, g in zip(leaves, grads([p.detach() for p in leaves], k), strict=True):
                leaf.grad = g
            opt.step()
        return [p.detach() for p in leaves]
    finally:
        torch.set_default_dtype(default)


CASES = [
    # (algorithm, torch optimizer, dana options, the same as torch's keyword arguments)
    ("adam-asgd", torch.optim.Adam, {}, {}),
    ("adam-asgd", torch.optim.Adam, {"beta2": 0.99, "eps": 1e-6}, {"eps": 1e-6}),
    ("nadam-asgd", torch.optim.NAdam, {}, {}),
    ("dana-nadam", torch.optim.NAdam, {}, {}),
    ("dana-nadam", torch.optim.NAdam, {"momentum_decay": 0.05, "eps": 1e-6}, {"eps": 1e-6}),
]


@pytest.mark.parametrize(("algorithm", "optimizer", "options", "kwargs"), CASES)
@pytest.mark.parametrize("momentum", [0.9, 0.8])
def test_with_one_worker_it_is_the_torch_optimizer(algorithm, optimizer, options, kwargs, momentum):
    params, grads = problem()
    beta2 = options.get("beta2", 0.999)
    kwargs = {**kwargs, "betas": (momentum, beta2), "weight_decay": 1e-3}
    if "momentum_decay" in options:
        kwargs["momentum_decay"] = options["momentum_decay"]
    expected = torch_run(optimizer, params, grads, 40, **kwargs)
    got = dana.simulate(
        params, counting(grads), algorithm=algorithm, workers=1, steps=40, lr=schedule,
        momentum=momentum, weight_decay=1e-3, options=options,
    )  # fmt: skip
    for a, b in zip(got.params, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert not torch.allclose(got.params[0], params[0])  # it did move


def test_dana_nadam_and_nadam_asgd_differ_only_when_there_is_staleness():
    params, grads = problem()
    run = {
        a: dana.simulate(params, counting(grads), algorithm=a, workers=1, steps=20, lr=0.01)
        for a in ("dana-nadam", "nadam-asgd")
    }
    for a, b in zip(run["dana-nadam"].params, run["nadam-asgd"].params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    run = {
        a: dana.simulate(params, counting(grads), algorithm=a, workers=4, steps=20, lr=0.01)
        for a in ("dana-nadam", "nadam-asgd")
    }
    assert not torch.allclose(run["dana-nadam"].params[0], run["nadam-asgd"].params[0])


class Fixed(Scheduler):
    def __init__(self, order, workers):
        super().__init__(workers)
        self.order = list(order)

    def next_worker(self):
        return self.order.pop(0)


def test_dana_nadam_with_n_workers_matches_a_plain_reference():
    # Each worker runs NAdam on its own gradients (own t, m, v, Π) and sends its step; the
    # master subtracts η·msg. Written out plainly, with lags up to ≫ N.
    workers, lr, b1, b2, eps, psi = 3, 0.01, 0.9, 0.999, 1e-8, 4e-3
    p = np.array([4.0, 2.0, 1.0])
    order = np.random.default_rng(0).choice(workers, 60, p=p / p.sum()).tolist()
    params, grads = problem(seed=1)
    flat0 = torch.cat([q.reshape(-1) for q in params])
    sizes = [q.numel() for q in params]
    shapes = [q.shape for q in params]

    def flat_grad(x, k):
        views = [v.view(s) for v, s in zip(x.split(sizes), shapes, strict=True)]
        return torch.cat([g.reshape(-1) for g in grads(views, k)])

    big_theta = flat0.clone()
    held = [flat0.clone() for _ in range(workers)]
    m = [torch.zeros_like(flat0) for _ in range(workers)]
    v = [torch.zeros_like(flat0) for _ in range(workers)]
    t, prod, expected_seen = [0] * workers, [1.0] * workers, []
    for k, i in enumerate(order):
        expected_seen.append(held[i])
        g = flat_grad(held[i], k)
        t[i] += 1
        mu = b1 * (1 - 0.5 * 0.96 ** (t[i] * psi))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((t[i] + 1) * psi))
        prod[i] *= mu
        m[i] = b1 * m[i] + (1 - b1) * g
        v[i] = b2 * v[i] + (1 - b2) * g * g
        d = torch.sqrt(v[i] / (1 - b2 ** t[i])) + eps
        msg = (1 - mu) / (1 - prod[i]) * g / d + mu_next / (1 - prod[i] * mu_next) * m[i] / d
        big_theta = big_theta - lr * msg
        held[i] = big_theta.clone()

    sim = Simulation(make_rule("dana-nadam"), flat0, workers=workers, scheduler=Fixed(order, 3))
    seen = []

    def grad_fn(x, worker):
        seen.append(x.clone())
        return flat_grad(x, len(seen) - 1)

    for _ in order:
        sim.step(grad_fn, lr)
    for a, b in zip(seen, expected_seen, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(sim.params, big_theta, rtol=1e-12, atol=1e-13)


def test_dana_nadam_gap_is_measured_against_the_theta_form():
    # θ = Θ + ηΣⱼLⱼ (every worker's look-ahead added back): the logged gap is G(x − θ).
    params, grads = problem()
    flat0 = torch.cat([q.reshape(-1) for q in params])
    sizes = [q.numel() for q in params]
    shapes = [q.shape for q in params]
    sim = Simulation(
        make_rule("dana-nadam"),
        flat0,
        workers=3,
        scheduler=Fixed([0, 1, 2, 2, 0, 1, 0, 0, 2, 1, 1, 0], 3),
        layer_sizes=sizes,
    )
    gap, expected = Gap(sizes), []

    def grad_fn(x, worker):
        theta = sim.master.params + 0.01 * sum(w.velocity for w in sim.worker_states)
        expected.append(float(gap(x - theta)))
        views = [v.view(s) for v, s in zip(x.split(sizes), shapes, strict=True)]
        return torch.cat([g.reshape(-1) for g in grads(views, len(expected))])

    logged = [float(sim.step(grad_fn, 0.01).gap) for _ in range(12)]
    assert logged == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert max(logged) > 0


def test_dana_nadam_first_message_by_hand():
    # t = 1: m = 0.1g, v = 0.001g², d = |g| + ε; msg = g/d + μ₂/(1 − μ₁μ₂)·0.1g/d.
    g, eps = 2.0, 1e-8
    mu1 = 0.9 * (1 - 0.5 * 0.96 ** (1 * 4e-3))
    mu2 = 0.9 * (1 - 0.5 * 0.96 ** (2 * 4e-3))
    rule = make_rule("dana-nadam")
    state = rule.init_worker(torch.zeros(1, dtype=F64))
    msg = rule.worker_step(state, torch.zeros(1, dtype=F64), torch.tensor([g], dtype=F64))
    d = math.sqrt(0.001 * g * g / 0.001) + eps
    assert msg.item() == pytest.approx(g / d + mu2 / (1 - mu1 * mu2) * 0.1 * g / d, abs=1e-14)
    assert state.velocity.item() == pytest.approx(mu2 / (1 - mu1 * mu2) * 0.1 * g / d, abs=1e-14)


def test_dana_nadams_master_does_asgds_work():
    rule = make_rule("dana-nadam")
    state = rule.init_master(torch.zeros(100), workers=64)
    tensors = [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in tensors) == 100  # θ only: no per-worker state
    before = state.params.clone()
    rule.master_step(state, torch.ones(100), 5, 0.1)
    torch.testing.assert_close(state.params, before - 0.1)
