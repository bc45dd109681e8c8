"""The staleness mitigations of SPEC "Beyond the paper": hand-computed steps, an independent
reference implementation under skewed orders, the λ = 0 and N = 1 reductions, τ, resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

import dana
from dana.rules import ALGORITHMS, make_rule
from dana.rules.mitigations import _Lagged
from dana.simulation import Scheduler, Simulation, make_scheduler

LR, GAMMA = 0.1, 0.9
LAGGED = ["dc-asgd", "dc-asgd-a", "sa-asgd", "gap-aware", "delay-adaptive", "dana-dc"]
NEW = [*LAGGED, "adam-asgd", "nadam-asgd", "dana-nadam"]
F64 = torch.float64


class Fixed(Scheduler):
    """A given order of workers (any order is a valid schedule)."""

    def __init__(self, order: list[int], workers: int) -> None:
        super().__init__(workers)
        self.order, self.position = list(order), 0

    def next_worker(self) -> int:
        self.position += 1
        return self.order[self.position - 1]


def skewed_order(workers: int, steps: int, seed: int = 0) -> list[int]:
    """A random order where worker 0 is fast and the last worker slow: lags up to ≫ N."""
    p = np.array([2.0**-w for w in range(workers)])
    return np.random.default_rng(seed).choice(workers, size=steps, p=p / p.sum()).tolist()


def problem(size: int = 6, seed: int = 0):
    """``g(x, k) = A_k x − b_k``: a noisy quadratic whose gradient depends on the step."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(40, size, size, generator=gen, dtype=F64) * 0.3
    a = a @ a.transpose(1, 2) + torch.eye(size, dtype=F64)
    b = torch.randn(40, size, generator=gen, dtype=F64)
    x0 = torch.randn(size, generator=gen, dtype=F64)
    return x0, lambda x, k: a[k % 40] @ x - b[k % 40]


def counting(grad):
    """``grad(x, k)`` as a ``dana.simulate`` grad_fn, k counting the calls."""
    calls = []

    def grad_fn(params, worker):
        calls.append(0)
        return [grad(params[0], len(calls) - 1)]

    return grad_fn


def run_rule(algorithm: str, order: list[int], workers: int, **options):
    """Run the rule in the simulator on ``order``; return (params each gradient saw, final)."""
    x0, grad = problem()
    rule = make_rule(algorithm, momentum=GAMMA, **options)
    sim = Simulation(rule, x0, workers=workers, scheduler=Fixed(order, workers))
    seen = []

    def grad_fn(params, worker):
        seen.append(params.clone())
        return grad(params, len(seen) - 1)

    for _ in order:
        sim.step(grad_fn, LR)
    return seen, sim.params.clone()


def reference(algorithm: str, order: list[int], workers: int, **options):
    """SPEC's formulas, written out plainly (out of place, θᵢ = what worker i holds)."""
    x0, grad = problem()
    lam = options.get("lam", 0.04)
    lam0 = options.get("lam0", 2.0)
    theta, v, ms, s, t = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0), 0 * x0, 0
    vs = [torch.zeros_like(x0) for _ in range(workers)]
    held, received, seen = [x0.clone()] * workers, [0] * workers, []
    for k, i in enumerate(order):
        x, tau = held[i], k - received[i]  # k updates were applied before this one
        seen.append(x)
        g = grad(x, k)
        if algorithm == "delay-adaptive":
            factor = 1.0 if tau == 0 else min(1.0, workers / tau)
            theta = theta - LR * factor * g
            reply = theta
        elif algorithm == "dana-dc":
            lookahead = theta - LR * GAMMA * sum(vs)
            g = g + lam * g * g * (lookahead - x)
            vs[i] = GAMMA * vs[i] + g
            theta = theta - LR * vs[i]
            reply = theta - LR * GAMMA * sum(vs)
        else:
            if algorithm == "dc-asgd":
                g = g + lam * g * g * (theta - x)
            elif algorithm == "dc-asgd-a":
                ms = 0.95 * ms + 0.05 * g * g
                g = g + lam0 / torch.sqrt(ms + 1e-7) * g * g * (theta - x)
            elif algorithm == "sa-asgd":
                g = g / max(1, tau)
            elif algorithm == "gap-aware" and t > 0:
                c = LR * (torch.sqrt(s / (1 - 0.999**t)) + 1e-8)
                g = g / (1 + (theta - x).abs() / c)
            v = GAMMA * v + g
            theta = theta - LR * (g + GAMMA * v)
            if algorithm == "gap-aware":
                s, t = 0.999 * s + 0.001 * v * v, t + 1
            reply = theta
        held[i], received[i] = reply.clone(), k + 1
    return seen, theta


# -- hand-computed steps with lags ----------------------------------------------------------


def steps(algorithm: str, workers: int, order: list[int], g: float = 2.0, **options):
    """Scalar θ₀ = 1, constant gradient ``g``; the replies and the master's θ after each."""
    rule = make_rule(algorithm, momentum=GAMMA, **options)
    state = rule.init_master(torch.tensor([1.0], dtype=F64), workers)
    out = []
    for worker in order:
        reply = rule.master_step(state, torch.tensor([g], dtype=F64), worker, LR)
        out.append((reply.item(), state.params.item()))
    return out


def test_dc_asgd_compensates_the_second_workers_lag():
    # w0 (θ₀ = θ): g̃ = 2, v = 2, θ = 1 − 0.1(2 + 1.8) = 0.62.
    # w1 holds θ₀ = 1: θ − θ₁ = −0.38, g̃ = 2 + 0.04·4·(−0.38) = 1.9392,
    # v = 1.8 + 1.9392 = 3.7392, θ = 0.62 − 0.1(1.9392 + 3.36528) = 0.089552.
    (first, _), (second, _) = steps("dc-asgd", 2, [0, 1])
    assert first == pytest.approx(0.62, abs=1e-15)
    assert second == pytest.approx(0.089552, abs=1e-15)


def test_dc_asgd_a_scales_by_the_mean_square():
    # w0: ms = 0.05·4 = 0.2, no gap: θ = 0.62. w1: ms = 0.95·0.2 + 0.2 = 0.39,
    # g̃ = 2 + 2/√(0.39 + 1e-7)·4·(−0.38); v = 1.8 + g̃; θ = 0.62 − 0.1(g̃ + 0.9v).
    (_, theta1), (_, theta2) = steps("dc-asgd-a", 2, [0, 1])
    gt = 2 + 2 / math.sqrt(0.39 + 1e-7) * 4 * -0.38
    assert theta1 == pytest.approx(0.62, abs=1e-15)
    assert theta2 == pytest.approx(0.62 - 0.1 * (gt + 0.9 * (1.8 + gt)), abs=1e-13)
    # λ₀ scales the correction linearly.
    (_, _), (_, half) = steps("dc-asgd-a", 2, [0, 1], lam0=1.0)
    gt = 2 + 1 / math.sqrt(0.39 + 1e-7) * 4 * -0.38
    assert half == pytest.approx(0.62 - 0.1 * (gt + 0.9 * (1.8 + gt)), abs=1e-13)


def test_sa_asgd_divides_by_the_lag():
    # Round-robin over 3: τ = 0, 1, 2. v=2, θ=0.62; v=3.8, θ=0.078; g̃=1: v=4.42,
    # θ = 0.078 − 0.1(1 + 3.978) = −0.4198.
    thetas = [theta for _, theta in steps("sa-asgd", 3, [0, 1, 2])]
    assert thetas == pytest.approx([0.62, 0.078, -0.4198], abs=1e-14)


def test_sa_asgd_with_round_robin_divides_every_gradient_after_the_first_n_by_n_minus_1():
    # The same trajectory as nag-asgd fed g/max(1, k) for the first N gradients and
    # g/(N − 1) after: bit for bit.
    workers, total = 4, 30
    x0, grad = problem()

    def divided(params, worker, seen=[]):  # noqa: B006 (the call counter)
        k = len(seen)
        seen.append(k)
        return [grad(params[0], k) / max(1, k if k < workers else workers - 1)]

    sa = dana.simulate(x0, counting(grad), algorithm="sa-asgd", workers=workers, steps=total, lr=LR)
    nag = dana.simulate(x0, divided, algorithm="nag-asgd", workers=workers, steps=total, lr=LR)
    assert sa.lag == list(range(workers)) + [workers - 1] * (total - workers)
    assert torch.equal(sa.params[0], nag.params[0])


def test_gap_aware_bias_correction_and_no_penalty_before_the_first_step():
    # w0 at t = 0: C = ∞, g̃ = 2, v = 2, θ = 0.62, s = 0.001·4. w1 at t = 1: ŝ = s/(1 − 0.999)
    # = 4, C = 0.1·(2 + 1e-8), g̃ = 2/(1 + 0.38/C); v = 1.8 + g̃; θ = 0.62 − 0.1(g̃ + 0.9v).
    rule = make_rule("gap-aware", momentum=GAMMA)
    state = rule.init_master(torch.tensor([1.0], dtype=F64), 2)
    rule.master_step(state, torch.tensor([2.0], dtype=F64), 0, LR)
    assert state.params.item() == pytest.approx(0.62, abs=1e-15)
    assert state.exp_avg_sq.item() == pytest.approx(0.004, abs=1e-18) and state.steps == 1
    rule.master_step(state, torch.tensor([2.0], dtype=F64), 1, LR)
    c = 0.1 * (math.sqrt(0.004 / (1 - 0.999)) + 1e-8)
    gt = 2 / (1 + 0.38 / c)
    assert state.params.item() == pytest.approx(0.62 - 0.1 * (gt + 0.9 * (1.8 + gt)), abs=1e-14)
    # t = 0: no penalty whatever the gap (C = ∞): the step is nag-asgd's.
    fresh = rule.init_master(torch.tensor([1.0], dtype=F64), 2)
    fresh.sent[1].fill_(-100.0)
    rule.master_step(fresh, torch.tensor([2.0], dtype=F64), 1, LR)
    assert fresh.params.item() == pytest.approx(0.62, abs=1e-15)


def test_delay_adaptive_factor():
    # Worker 0 updates 4 times (τ = 0: factor 1) while worker 1 holds θ₀; then worker 1
    # with τ = 4 > N = 2: factor 2/4. θ = 1 − 4·0.2 = 0.2, then 0.2 − 0.1·0.5·2 = 0.1.
    thetas = [theta for _, theta in steps("delay-adaptive", 2, [0, 0, 0, 0, 1])]
    assert thetas == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.1], abs=1e-14)
    # τ ≤ N keeps the full step: worker 1 at τ = 2 = N.
    thetas = [theta for _, theta in steps("delay-adaptive", 2, [0, 0, 1])]
    assert thetas == pytest.approx([0.8, 0.6, 0.4], abs=1e-14)


def test_dana_dc_compensates_between_look_aheads():
    # w0: θ̂ = 1 = θ̂₀, g̃ = 2, v₀ = 2, θ = 0.8, reply 0.8 − 0.09·2 = 0.62.
    # w1: θ̂ = 0.62, θ̂₁ = 1: g̃ = 2 + 0.04·4·(−0.38) = 1.9392, v₁ = 1.9392, θ = 0.60608,
    # reply 0.60608 − 0.09·3.9392 = 0.251552.
    (r1, t1), (r2, t2) = steps("dana-dc", 2, [0, 1])
    assert (r1, t1) == pytest.approx((0.62, 0.8), abs=1e-15)
    assert (r2, t2) == pytest.approx((0.251552, 0.60608), abs=1e-15)


# -- an independent reference under a skewed order (lags ≫ N) ------------------------------


@pytest.mark.parametrize("algorithm", LAGGED)
def test_rules_match_a_plain_reference_implementation(algorithm):
    order = skewed_order(3, 60)
    assert max(np.diff([i for i, w in enumerate(order) if w == 2])) > 3  # lags beyond N
    # λ₀ = 2 makes dc-asgd-a diverge on this problem (NaN on both sides would prove nothing).
    options = {"lam0": 0.2} if algorithm == "dc-asgd-a" else {}
    seen, final = run_rule(algorithm, order, 3, **options)
    expected_seen, expected = reference(algorithm, order, 3, **options)
    assert torch.isfinite(final).all()
    for a, b in zip(seen, expected_seen, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, expected, rtol=1e-12, atol=1e-12)


def test_lambda_changes_the_compensation():
    order = skewed_order(3, 40)
    for algorithm in ("dc-asgd", "dana-dc"):
        final = run_rule(algorithm, order, 3, lam=0.3)[1]
        expected = reference(algorithm, order, 3, lam=0.3)[1]
        torch.testing.assert_close(final, expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(final, run_rule(algorithm, order, 3)[1])


# -- λ = 0 and N = 1 reductions (exact) -----------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "plain"), [("dc-asgd", "nag-asgd"), ("dana-dc", "dana-zero")]
)
def test_lambda_zero_is_the_uncompensated_rule_bit_for_bit(algorithm, plain):
    order = skewed_order(4, 80, seed=1)
    seen, final = run_rule(algorithm, order, 4, lam=0.0)
    plain_seen, plain_final = run_rule(plain, order, 4)
    assert all(torch.equal(a, b) for a, b in zip(seen, plain_seen, strict=True))
    assert torch.equal(final, plain_final)


def torch_sgd(x0, grad, total, lr, nesterov, weight_decay):
    x = x0.clone().requires_grad_()
    opt = torch.optim.SGD(
        [x], lr=lr(0), momentum=GAMMA if nesterov else 0.0, nesterov=nesterov,
        weight_decay=weight_decay,
    )  # fmt: skip
    for k in range(total):
        opt.param_groups[0]["lr"] = lr(k)
        x.grad = grad(x.detach(), k)
        opt.step()
    return x.detach()


def schedule(k: int) -> float:
    return 0.05 if k < 10 else 0.02 + 0.001 * (k % 3)


@pytest.mark.parametrize("algorithm", ["dc-asgd", "dc-asgd-a", "sa-asgd", "gap-aware"])
def test_with_one_worker_these_are_torch_nesterov(algorithm):
    x0, grad = problem()
    expected = torch_sgd(x0, grad, 30, schedule, True, 1e-3)
    got = dana.simulate(
        x0, counting(grad),
        algorithm=algorithm, workers=1, steps=30, lr=schedule, weight_decay=1e-3,
    )  # fmt: skip
    torch.testing.assert_close(got.params[0], expected, rtol=0, atol=1e-13)


def test_delay_adaptive_with_one_worker_is_plain_sgd():
    x0, grad = problem()
    expected = torch_sgd(x0, grad, 30, schedule, False, 1e-3)
    got = dana.simulate(
        x0, counting(grad),
        algorithm="delay-adaptive", workers=1, steps=30, lr=schedule, weight_decay=1e-3,
    )  # fmt: skip
    torch.testing.assert_close(got.params[0], expected, rtol=0, atol=1e-13)


def test_dana_dc_with_one_worker_sends_torch_nesterov_parameters():
    x0, grad = problem()
    expected = torch_sgd(x0, grad, 30, lambda _: 0.05, True, 0.0)
    sent = []

    def grad_fn(p, w):
        sent.append(p[0].clone())
        return [grad(p[0], len(sent) - 1)]

    dana.simulate(x0, grad_fn, algorithm="dana-dc", workers=1, steps=31, lr=0.05)
    torch.testing.assert_close(sent[30], expected, rtol=0, atol=1e-13)


# -- τ at the master is the simulator's lag; resume; O(model) -------------------------------


@pytest.mark.parametrize("schedule_name", ["gamma", "block-random", "round-robin"])
def test_the_masters_tau_is_the_simulators_lag(schedule_name):
    x0, grad = problem()
    for algorithm in LAGGED:
        rule = make_rule(algorithm, momentum=GAMMA)
        scheduler = make_scheduler(schedule_name, 5, seed=3)
        sim = Simulation(rule, x0, workers=5, scheduler=scheduler)
        taus = []

        def grad_fn(params, worker, sim=sim, taus=taus):
            taus.append(_Lagged.lag(sim.master, worker))
            return grad(params, len(taus))

        lags = [sim.step(grad_fn, LR).lag for _ in range(120)]
        assert taus == lags and max(lags) >= 4
        assert sim.master.replies == sim.updates == 120


@pytest.mark.parametrize("algorithm", NEW)
def test_a_simulation_resumes_bit_for_bit_from_a_saved_state(algorithm):
    x0, grad = problem()
    options = {"workers": 4, "layer_sizes": [2, 4]}

    def build():
        lam0 = {"lam0": 0.2} if algorithm == "dc-asgd-a" else {}  # λ₀ = 2 diverges here
        rule = make_rule(algorithm, momentum=GAMMA, weight_decay=1e-3, **lam0)
        return Simulation(rule, x0, scheduler=make_scheduler("gamma", 4, seed=5), **options)

    def grad_fn(k):
        return lambda params, worker: grad(params, k)

    whole = build()
    for k in range(50):
        whole.step(grad_fn(k), LR)
    part = build()
    for k in range(20):
        part.step(grad_fn(k), LR)
    buffer = io.BytesIO()
    torch.save(part.state_dict(), buffer)
    buffer.seek(0)
    resumed = build()
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    gaps = [resumed.step(grad_fn(k), LR).gap for k in range(20, 50)]
    assert torch.isfinite(whole.params).all()
    assert torch.equal(resumed.params, whole.params)
    assert all(torch.isfinite(g) for g in gaps)


@pytest.mark.parametrize("algorithm", NEW)
def test_every_new_rule_trains_a_quadratic_in_the_simulator(algorithm):
    target = torch.tensor([1.0, -2.0], dtype=F64)
    result = dana.simulate(
        torch.zeros(2, dtype=F64), lambda p, w: [p[0] - target], algorithm=algorithm,
        workers=4, steps=2000, lr=0.02, schedule="gamma",
    )  # fmt: skip
    torch.testing.assert_close(result.params[0], target, atol=1e-8, rtol=0)


@pytest.mark.parametrize("algorithm", NEW)
def test_master_step_is_order_model_whatever_n(algorithm):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor):
                    Counter.elements += t.numel()
            return out

    def work(workers: int) -> int:
        rule = make_rule(algorithm, momentum=0.9)
        state = rule.init_master(torch.zeros(1000), workers=workers)
        grad = torch.ones(1000)
        rule.master_step(state, grad, workers - 1, 0.1)
        rule.master_step(state, grad, 0, 0.1)
        Counter.elements = 0
        with Counter():
            rule.master_step(state, grad, workers - 1, 0.1)  # a lagged message
        return Counter.elements

    small, large = work(2), work(256)
    assert small == large and large <= 24 * 1000  # a few passes over the model


def test_options_are_checked_and_unknown_ones_are_one_line_errors():
    assert make_rule("dc-asgd").option == {"lam": 0.04}
    assert make_rule("dc-asgd-a", lam0=1).option == {"lam0": 1.0}
    assert set(ALGORITHMS) >= set(NEW)
    for algorithm, options, match in [
        ("dc-asgd", {"lamb": 0.1}, "unknown option 'lamb' for dc-asgd: its options are lam"),
        ("dana", {"lam": 0.1}, "unknown option 'lam' for dana: it takes none"),
        ("dana-dc", {"lam": -1.0}, "option lam of dana-dc must be >= 0"),
        ("adam-asgd", {"eps": 0.0}, "option eps of adam-asgd must be > 0"),
        ("dc-asgd", {"lam": "big"}, "must be a finite number"),
    ]:
        with pytest.raises(dana.DanaError, match=match) as info:
            dana.simulate(
                torch.zeros(2), lambda p, w: [p[0]], algorithm=algorithm, workers=2, steps=1,
                lr=0.1, options=options,
            )  # fmt: skip
        assert "\n" not in str(info.value)


# -- options through the config, the command line and sweep files --------------------------


def test_rule_options_in_configs_are_left_out_of_to_dict_when_empty():
    from dana.training import preset_config

    base = preset_config("lenet-fashion-mnist")
    assert "rule_options" not in base.to_dict()  # committed results' configs still match
    config = base.replace(algorithm="dc-asgd", workers=8, rule_options={"lam": 0.1})
    assert config.to_dict()["rule_options"] == {"lam": 0.1}
    assert config.run_name == "lenet-fashion-mnist/dc-asgd-n8-block-random-s0-lam0.1"
    hash(config)  # still usable as a key
    with pytest.raises(dana.DanaError, match="unknown option 'lam' for dana: it takes none"):
        base.replace(rule_options={"lam": 0.1})
    with pytest.raises(dana.DanaError, match="rule_options must be a table"):
        base.replace(rule_options=[("lam", 0.1)])


def test_rule_option_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from dana.cli import main
    from dana.options import config_from_options

    config, _ = config_from_options(
        "cnn-fashion-mnist", algorithm="dana-dc", rule_option=("lam=0.5",), workers=4
    )
    assert config.rule_options == {"lam": 0.5}
    assert config_from_options("cnn-fashion-mnist", algorithm="dana")[0].rule_options == {}
    for args, fragment in [
        (["-a", "dana", "--rule-option", "lam=1"], "unknown option 'lam' for dana"),
        (["-a", "dc-asgd", "--rule-option", "lam"], "--rule-option takes KEY=NUMBER"),
        (["-a", "dc-asgd", "--rule-option", "lamb=2"], "its options are lam"),
    ]:
        for command in ("run", "launch"):
            result = CliRunner().invoke(main, [command, *args, "--out", str(tmp_path)])
            assert result.exit_code == 2, result.output
            assert result.stderr.strip().splitlines() == [result.stderr.strip()]
            assert fragment in result.stderr


def test_sweep_files_give_options_per_algorithm(tmp_path):
    from dana.experiments.sweep import SweepSpec

    path = tmp_path / "sweep.toml"
    path.write_text(
        'preset = "cnn-fashion-mnist"\nalgorithms = ["dana", "dc-asgd", "dana-dc"]\n'
        "workers = [4]\n[rule_options.dc-asgd]\nlam = 0.1\n[rule_options.dana-dc]\nlam = 0\n"
    )
    configs = SweepSpec.from_toml(path).configs()
    assert [c.rule_options for c in configs] == [{}, {"lam": 0.1}, {"lam": 0.0}]
    assert configs[1].run_name.endswith("dc-asgd-n4-block-random-s0-lam0.1")
    path.write_text(
        'preset = "cnn-fashion-mnist"\nalgorithms = ["dc-asgd", "dana-dc"]\n'
        "[overrides]\nrule_options = {lam = 0.2}\n"
    )
    assert {c.rule_options["lam"] for c in SweepSpec.from_toml(path).configs()} == {0.2}
    for text, match in [
        ('algorithms = ["dana"]\n[overrides]\nrule_options = {lam = 0.2}\n', "for dana"),
        ('algorithms = ["dana"]\n[rule_options.dc-asgd]\nlam = 0.1\n', "do not hold"),
        ('algorithms = ["dc-asgd"]\nrule_options = 3\n', "a table per algorithm"),
    ]:
        path.write_text('preset = "cnn-fashion-mnist"\n' + text)
        with pytest.raises(dana.DanaError, match=match):
            SweepSpec.from_toml(path).configs()
