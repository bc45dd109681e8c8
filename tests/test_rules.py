"""The update rules against hand-computed steps, torch.optim.SGD and each other (SPEC 1–3)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dana
from dana.rules import ALGORITHMS, make_rule

LR, GAMMA = 0.1, 0.9


def constant_grads(per_worker: dict[int, float]):
    """grad_fn returning a constant scalar gradient per worker."""
    return lambda params, worker: [torch.full_like(params[0], per_worker[worker])]


def run(algorithm: str, workers: int, steps: int, grads: dict[int, float], **kw) -> float:
    start = torch.tensor([1.0], dtype=torch.float64)
    kw = {"momentum": GAMMA} | kw
    result = dana.simulate(
        start,
        constant_grads(grads),
        algorithm=algorithm,
        workers=workers,
        steps=steps,
        lr=LR,
        **kw,
    )
    return result.params[0].item()


# Hand-computed with θ₀ = 1, g = 2, η = 0.1, γ = 0.9 (see each comment).
@pytest.mark.parametrize(
    ("algorithm", "workers", "steps", "expected"),
    [
        # θ ← θ − ηg: 1 − 0.2 − 0.2
        ("asgd", 1, 2, 0.6),
        # v=2, θ=1−0.1(2+1.8)=0.62; v=3.8, θ=0.62−0.1(2+3.42)=0.078
        ("nag-asgd", 1, 2, 0.078),
        ("nag-asgd", 2, 2, 0.078),
        ("baseline", 1, 2, 0.078),
        # DANA-Zero's master holds θ: θ=1−0.2−0.2=0.6, then v₀=3.8: 0.6−0.38=0.22
        ("dana-zero", 2, 3, 0.22),
        # multi-asgd's master moves θ as DANA-Zero's does; only its replies differ
        ("multi-asgd", 2, 3, 0.22),
        # DANA's master holds Θ: msg=γv+g=3.8 twice, then 0.9·3.8+2=5.42: 1−0.38−0.38−0.542
        ("dana", 2, 3, -0.302),
        # one round of two: v=2, θ = 1 − 0.2·(2 + 1.8) with η·N = 0.2
        ("ssgd", 2, 2, 0.24),
    ],
)
def test_hand_computed_steps(algorithm, workers, steps, expected):
    grads = dict.fromkeys(range(workers), 2.0)
    assert run(algorithm, workers, steps, grads) == pytest.approx(expected, abs=1e-12)


def test_dana_zero_replies_with_lookahead():
    # After worker 0 then 1 (g=2 each): θ = 0.6, Σv = 4, reply θ̂ = 0.6 − 0.09·4 = 0.24,
    # which is what DANA's master holds at the same point.
    rule = make_rule("dana-zero", momentum=GAMMA)
    state = rule.init_master(torch.tensor([1.0], dtype=torch.float64), workers=2)
    first = rule.master_step(state, torch.tensor([2.0], dtype=torch.float64), 0, LR).clone()
    second = rule.master_step(state, torch.tensor([2.0], dtype=torch.float64), 1, LR)
    assert first.item() == pytest.approx(0.8 - 0.18)
    assert second.item() == pytest.approx(0.24)
    assert state.velocity_sum.item() == pytest.approx(4.0)


def test_multi_asgd_looks_ahead_by_the_senders_velocity_only():
    # Worker 0 then 1 (g=2 each): θ = 0.8 then 0.6; each reply subtracts ηγ·vᵢ = 0.09·2 only,
    # where DANA-Zero's second reply subtracts ηγ·(v₀ + v₁) = 0.36 (0.24 above).
    rule = make_rule("multi-asgd", momentum=GAMMA)
    state = rule.init_master(torch.tensor([1.0], dtype=torch.float64), workers=2)
    first = rule.master_step(state, torch.tensor([2.0], dtype=torch.float64), 0, LR).clone()
    second = rule.master_step(state, torch.tensor([2.0], dtype=torch.float64), 1, LR).clone()
    assert first.item() == pytest.approx(0.62)
    assert second.item() == pytest.approx(0.42)
    # Worker 0 again: v₀ = 0.9·2 + 2 = 3.8, θ = 0.6 − 0.38 = 0.22, reply 0.22 − 0.09·3.8.
    third = rule.master_step(state, torch.tensor([2.0], dtype=torch.float64), 0, LR)
    assert state.params.item() == pytest.approx(0.22)
    assert third.item() == pytest.approx(0.22 - 0.342)


def test_multi_asgd_has_a_larger_gap_than_dana_zero():
    # Same θ trajectory (constant gradients), but its workers miss the other N − 1 velocities'
    # look-ahead, so every update after the first block arrives further from the master.
    results = {
        name: dana.simulate(
            torch.ones(1, dtype=torch.float64),
            constant_grads(dict.fromkeys(range(4), 2.0)),
            algorithm=name,
            workers=4,
            steps=40,
            lr=LR,
            momentum=GAMMA,
        )
        for name in ("multi-asgd", "dana-zero")
    }
    torch.testing.assert_close(results["multi-asgd"].params[0], results["dana-zero"].params[0])
    multi, zero = results["multi-asgd"].gap[8:], results["dana-zero"].gap[8:]
    assert len(multi) == 32
    assert all(m > d for m, d in zip(multi, zero, strict=True))


def test_ssgd_averages_and_scales_lr_linearly():
    # Gradients 1 and 3 average to 2; one NAG step with η·N = 0.2: 1 − 0.2(2 + 1.8) = 0.24.
    assert run("ssgd", 2, 2, {0: 1.0, 1: 3.0}) == pytest.approx(0.24)
    # Half a round changes nothing until the end of training flushes it (scaled by 1).
    rule = make_rule("ssgd", momentum=GAMMA)
    state = rule.init_master(torch.tensor([1.0], dtype=torch.float64), workers=4)
    assert rule.master_step(state, torch.tensor([2.0], dtype=torch.float64), 0, LR) is None
    assert state.params.item() == 1.0
    assert rule.flush(state, LR).item() == pytest.approx(1 - 0.1 * 3.8)


def test_weight_decay_is_added_on_the_worker():
    # g' = g + λθ = 2 + 0.5·1 = 2.5; θ = 1 − 0.1·2.5
    assert run("asgd", 1, 1, {0: 2.0}, weight_decay=0.5) == pytest.approx(0.75)


def test_asgd_ignores_momentum():
    grads = {0: 1.0, 1: 2.0, 2: 3.0}
    # 7 steps of g ∈ {1,2,3,1,2,3,1} at η = 0.1: 1 − 0.1·13
    assert run("asgd", 3, 7, grads, momentum=0.9) == pytest.approx(1 - 1.3)
    assert run("asgd", 3, 7, grads, momentum=0.0) == run("asgd", 3, 7, grads, momentum=0.5)


# -- N = 1 equivalences with torch.optim.SGD (SPEC fact 1) -------------------------------


def mlp_problem(seed: int = 0):
    """A small MLP regression problem; the batch depends on the gradient count."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (16,), (3, 16), (3,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.3 for s in shapes]
    xs = torch.randn(50, 32, 8, generator=gen, dtype=torch.float64)
    ys = torch.randn(50, 32, 3, generator=gen, dtype=torch.float64)

    def loss(ps, k):
        w1, b1, w2, b2 = ps
        h = torch.tanh(xs[k % 50] @ w1.T + b1)
        return ((h @ w2.T + b2 - ys[k % 50]) ** 2).mean()

    def make_grad_fn():
        calls = [0]

        def grad_fn(ps, worker):
            leaves = [p.detach().clone().requires_grad_() for p in ps]
            grads = torch.autograd.grad(loss(leaves, calls[0]), leaves)
            calls[0] += 1
            return grads

        return grad_fn

    return params, loss, make_grad_fn


def torch_sgd(params, loss, steps, lr, momentum, nesterov, weight_decay=0.0):
    leaves = [p.detach().clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(
        leaves, lr=lr(0), momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )
    for k in range(steps):
        opt.param_groups[0]["lr"] = lr(k)
        opt.zero_grad()
        loss(leaves, k).backward()
        opt.step()
    return [p.detach() for p in leaves]


def schedule(k: int) -> float:
    return 0.05 if k < 10 else 0.02 + 0.001 * (k % 3)


@pytest.mark.parametrize("algorithm", ["dana", "nag-asgd", "baseline"])
@pytest.mark.parametrize("lr", [0.05, schedule], ids=["constant", "scheduled"])
def test_nesterov_family_with_one_worker_is_torch_nesterov(algorithm, lr):
    params, loss, make_grad_fn = mlp_problem()
    rate = lr if callable(lr) else (lambda _: lr)
    expected = torch_sgd(params, loss, 30, rate, 0.9, True, weight_decay=1e-3)
    got = dana.simulate(
        params,
        make_grad_fn(),
        algorithm=algorithm,
        workers=1,
        steps=30,
        lr=lr,
        momentum=0.9,
        weight_decay=1e-3,
    )
    for a, b in zip(got.params, expected, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("algorithm", ["dana-zero", "multi-asgd"])
def test_lookahead_masters_with_one_worker_send_torch_nesterov_parameters(algorithm):
    # These masters hold θ and send θ̂ = θ − ηγv, which is torch's parameter.
    params, loss, make_grad_fn = mlp_problem()
    expected = torch_sgd(params, loss, 30, lambda _: 0.05, 0.9, True)
    sent = []
    inner = make_grad_fn()

    def grad_fn(ps, worker):
        sent.append([p.clone() for p in ps])
        return inner(ps, worker)

    dana.simulate(params, grad_fn, algorithm=algorithm, workers=1, steps=31, lr=0.05)
    for a, b in zip(sent[30], expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_asgd_with_one_worker_is_plain_sgd():
    params, loss, make_grad_fn = mlp_problem()
    expected = torch_sgd(params, loss, 30, schedule, 0.0, False)
    got = dana.simulate(
        params, make_grad_fn(), algorithm="asgd", workers=1, steps=30, lr=schedule, momentum=0.9
    )
    for a, b in zip(got.params, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


# -- DANA ≡ DANA-Zero for any N and order (SPEC fact 2) -----------------------------------


@pytest.mark.parametrize(
    ("workers", "schedule_name"), [(3, "block-random"), (5, "gamma"), (4, "round-robin")]
)
def test_dana_and_dana_zero_send_the_same_parameters(workers, schedule_name):
    params, _, make_grad_fn = mlp_problem(seed=1)
    sent: dict[str, list] = {}
    for algorithm in ("dana", "dana-zero"):
        log = sent[algorithm] = []
        inner = make_grad_fn()

        def grad_fn(ps, worker, log=log, inner=inner):
            log.append((worker, torch.cat([p.reshape(-1) for p in ps])))
            return inner(ps, worker)

        result = dana.simulate(
            params,
            grad_fn,
            algorithm=algorithm,
            workers=workers,
            steps=60,
            lr=0.05,
            momentum=0.9,
            weight_decay=1e-3,
            schedule=schedule_name,
            seed=7,
        )
        sent[algorithm + ":gap"] = result.gap
    assert [w for w, _ in sent["dana"]] == [w for w, _ in sent["dana-zero"]]
    for (_, a), (_, b) in zip(sent["dana"], sent["dana-zero"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # The gap is logged in θ form for both, so they log the same gaps.
    assert sent["dana:gap"] == pytest.approx(sent["dana-zero:gap"], rel=1e-9, abs=1e-14)


def test_dana_zero_keeps_a_running_sum_of_velocities():
    rule = make_rule("dana-zero", momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    state = rule.init_master(torch.zeros(10, dtype=torch.float64), workers=4)
    for k in range(40):
        grad = torch.randn(10, generator=gen, dtype=torch.float64)
        rule.master_step(state, grad, k * 7 % 4, 0.1)
        torch.testing.assert_close(state.velocity_sum, state.velocities.sum(0))


# -- O(model) master work, no per-worker state for DANA (SPEC facts 2–3) -------------------


class ElementCounter(TorchDispatchMode):
    """Counts the elements every aten op writes: a measure of work independent of time."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.elements += t.numel()
        return out


def master_work(algorithm: str, workers: int, size: int = 1000) -> int:
    rule = make_rule(algorithm, momentum=0.9)
    state = rule.init_master(torch.zeros(size), workers=workers)
    grad = torch.ones(size)
    rule.master_step(state, grad, workers - 1, 0.1)
    with ElementCounter() as counter:
        rule.master_step(state, grad, 0, 0.1)
    return counter.elements


@pytest.mark.parametrize("algorithm", ["asgd", "nag-asgd", "multi-asgd", "dana-zero", "dana"])
def test_master_step_is_order_model_whatever_n(algorithm):
    small, large = master_work(algorithm, 2), master_work(algorithm, 256)
    assert small == large
    assert large <= 8 * 1000


def test_dana_master_does_exactly_asgd_work_and_keeps_no_worker_state():
    assert master_work("dana", 64) == master_work("asgd", 64)
    rule = make_rule("dana")
    state = rule.init_master(torch.zeros(100), workers=64)
    tensors = [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in tensors) == 100
    assert rule.init_worker(torch.zeros(100)).velocity.shape == (100,)


def test_asgd_and_dana_write_theta_out_of_place_bit_for_bit_and_only_they_can():
    # What a shard uses to write θ straight into the memory it publishes from: the same
    # θ as in place, the old buffer untouched (a reply a worker may still be reading).
    import inspect

    gen = torch.Generator().manual_seed(0)
    start, messages = torch.randn(50, generator=gen), torch.randn(6, 50, generator=gen)
    for algorithm in ("asgd", "dana"):
        rule = make_rule(algorithm)
        in_place, out_of_place = rule.init_master(start, 2), rule.init_master(start, 2)
        for i, message in enumerate(messages):
            lr = 0.1 / (i + 1)
            expected = rule.master_step(in_place, message, i % 2, lr).clone()
            old, before = out_of_place.params, out_of_place.params.clone()
            out = torch.empty(50)
            reply = rule.master_step(out_of_place, message, i % 2, lr, out=out)
            assert reply is out and out_of_place.params is out
            assert torch.equal(reply, expected) and torch.equal(old, before)
        assert out_of_place.applied == in_place.applied == [3, 3]
    # Only the masters that are plain ASGD take ``out`` (dana-nadam's is DANA's); a rule
    # whose reply is not its θ, or that changes the step, does not.
    for algorithm in ALGORITHMS:
        takes = "out" in inspect.signature(make_rule(algorithm).master_step).parameters
        assert takes == (algorithm in ("asgd", "dana", "dana-nadam")), algorithm


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"algorithm": "adam"}, "unknown algorithm 'adam'"),
        ({"workers": 0}, "workers must be"),
        ({"lr": 0.0}, "lr must be"),
        ({"lr": -1.0}, "lr must be"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\)"),
        ({"weight_decay": -1.0}, "weight decay"),
        ({"schedule": "fifo"}, "unknown schedule 'fifo'"),
        ({"algorithm": "baseline", "workers": 2}, "--workers 1"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs, match):
    args = {"algorithm": "dana", "workers": 2, "steps": 2, "lr": 0.1} | kwargs
    with pytest.raises(dana.DanaError, match=match) as info:
        dana.simulate(torch.zeros(3), lambda p, w: [torch.zeros(3)], **args)
    assert "\n" not in str(info.value)


def test_every_spec_algorithm_exists_plus_the_adam_family():
    paper = ["baseline", "asgd", "nag-asgd", "multi-asgd", "dana-zero", "dana", "ssgd"]
    beyond = ["dc-asgd", "dc-asgd-a", "sa-asgd", "gap-aware", "delay-adaptive", "dana-dc"]
    assert list(ALGORITHMS) == [*paper, *beyond, "adam-asgd", "nadam-asgd", "dana-nadam"]
