"""Delay models (SPEC "Delay models"): heterogeneous speeds and V, heavy tails, replay."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import numpy as np
import pytest
import torch

import dana
from dana.runtime.server import ShardServer, ShardSpec
from dana.simulation import BatchTimes, make_scheduler, parse_schedule
from dana.training import LRSchedule, preset_config


def orders(schedule: str, workers: int, steps: int, seed: int = 0) -> list[int]:
    scheduler = make_scheduler(schedule, workers, seed=seed)
    return [scheduler.next_worker() for _ in range(steps)]


def lags_of(order: list[int], workers: int) -> list[int]:
    """SPEC's lag, computed from the order alone (each reply goes to the sender)."""
    received, out = [0] * workers, []
    for k, w in enumerate(order):
        out.append(k - received[w])
        received[w] = k + 1
    return out


@pytest.mark.parametrize(
    ("schedule", "speeds"),
    [
        ("gamma:slow=0.25x2", [1.0] * 6 + [2.0] * 2),
        ("gamma:speeds=1/1/3/1.5/1/2,v=0.2", [1, 1, 3, 1.5, 1, 2]),
        ("lognormal:sigma=0.5,slow=0.5x3", [1.0] * 2 + [3.0] * 2),
        ("pareto:alpha=4,speeds=2/1/1", [2, 1, 1]),
    ],
)
def test_update_shares_follow_one_over_the_speed_factor_and_lags_the_others_rates(schedule, speeds):
    n, steps = len(speeds), 30_000
    order = orders(schedule, n, steps, seed=1)
    counts = Counter(order)
    rates = 1 / np.asarray(speeds, dtype=float)
    expected = rates / rates.sum()
    shares = np.array([counts[w] / steps for w in range(n)])
    np.testing.assert_allclose(shares, expected, rtol=0.03)
    # Worker i's lag is the others' updates during its batch: sᵢ·Σ_{j≠i} 1/sⱼ on average,
    # and over all updates N − 1 (each update delays every other in-flight message once).
    lags = np.array(lags_of(order, n))
    steady = np.array(order) >= 0
    steady[: 20 * n] = False
    for w in range(n):
        mine = lags[steady & (np.array(order) == w)]
        assert mine.mean() == pytest.approx(speeds[w] * (rates.sum() - rates[w]), rel=0.04)
    assert lags[steady].mean() == pytest.approx(n - 1, rel=0.01)


def test_plain_gamma_is_unchanged_by_its_default_options():
    plain = orders("gamma", 5, 500, seed=4)
    assert orders("gamma:v=0.1", 5, 500, seed=4) == plain
    assert orders("gamma:speeds=1/1/1/1/1", 5, 500, seed=4) == plain
    assert orders("gamma:slow=0x3", 5, 500, seed=4) == plain


def test_slow_counts_round_half_up_and_takes_the_last_workers():
    spec = parse_schedule("gamma:slow=0.25x2")
    assert spec.speed_factors(4) == (1, 1, 1, 2)
    assert spec.speed_factors(2) == (1, 2)  # a quarter of 2 rounds up to 1
    assert spec.speed_factors(6) == (1, 1, 1, 1, 2, 2)  # 1.5 → 2
    assert parse_schedule("gamma").speed_factors(3) is None


@pytest.mark.parametrize(
    ("times", "cv"),
    [
        (BatchTimes("gamma", 128, 0.3), 0.3),
        (BatchTimes("lognormal", 128, 0.8), np.sqrt(np.exp(0.8**2) - 1)),
        (BatchTimes("pareto", 128, 3.0), 1 / np.sqrt(3.0 * 1.0)),
    ],
)
def test_batch_times_have_the_stated_mean_and_spread(times, cv):
    draws = times.draw(np.random.default_rng(0), 400_000)
    assert draws.mean() == pytest.approx(128, rel=0.01)
    assert draws.std() / draws.mean() == pytest.approx(cv, rel=0.05)
    scaled = BatchTimes(times.kind, 128, times.shape, (1.0, 2.5))
    rng = np.random.default_rng(1)
    pairs = np.array([scaled.draw(rng, 2) for _ in range(100_000)])
    np.testing.assert_allclose(pairs.mean(0), [128, 320], rtol=0.015)


def test_pareto_has_a_power_law_tail_and_lognormal_its_sigma():
    draws = BatchTimes("pareto", 1, 2.5).draw(np.random.default_rng(2), 1_000_000)
    x_m = 1.5 / 2.5  # scale B(α − 1)/α with B = 1: the smallest time
    assert draws.min() >= x_m
    # P(T > 4 x_m) / P(T > 2 x_m) = 2^−α
    ratio = (draws > 4 * x_m).mean() / (draws > 2 * x_m).mean()
    assert ratio == pytest.approx(2**-2.5, rel=0.03)
    logs = np.log(BatchTimes("lognormal", 128, 0.7).draw(np.random.default_rng(3), 200_000))
    assert logs.std() == pytest.approx(0.7, rel=0.01)


@pytest.mark.parametrize(
    "schedule",
    [
        "round-robin",
        "block-random",
        "gamma",
        "gamma:slow=0.25x2,v=0.2",
        "lognormal",
        "pareto:alpha=2.5,speeds=1/2/1/4",
        "replay",
    ],
)
@pytest.mark.parametrize("synchronous", [False, True])
def test_every_scheduler_resumes_exactly_from_its_state(schedule, synchronous, tmp_path):
    if schedule == "replay":
        if synchronous:
            return  # ssgd cannot replay (tested below)
        path = tmp_path / "result.json"
        path.write_text(
            json.dumps({"config": {"workers": 4}, "update_order": orders("gamma", 4, 90)})
        )
        schedule = f"replay:{path}"
    a = make_scheduler(schedule, 4, seed=3, synchronous=synchronous)
    [a.next_worker() for _ in range(37)]
    state = json.loads(json.dumps(a.state_dict()))  # plain values only
    b = make_scheduler(schedule, 4, seed=99, synchronous=synchronous)
    b.load_state_dict(state)
    assert [a.next_worker() for _ in range(50)] == [b.next_worker() for _ in range(50)]


# -- replay -------------------------------------------------------------------------------


def record_a_free_server_run(workers: int = 3, total: int = 24):
    """A free parameter server (no imposed order) fed messages as real workers would send
    them, in an arbitrary arrival order; returns the server and the lag of each update."""
    schedule = LRSchedule(0.1, workers, total, (), 10.0, warmup_epochs=0.0)
    spec = ShardSpec(0, (0, 5), "sa-asgd", 0.9, 0.0, workers, schedule, total, 1)
    server = ShardServer(spec, params=np.zeros(5, np.float32), buffers=None)
    arrivals = [0, 0, 1, 0, 2, 2, 0, 1, 1, 1, 0, 2, 0, 0, 0, 1, 2, 0, 1, 2, 2, 0, 1, 0]
    lags = []
    server.granted = [arrivals[:total].count(w) for w in range(workers)]  # the arithmetic here

    async def run():
        stamps = {w: r.stamp for w, r in enumerate(await asyncio.gather(
            *(server.join(w) for w in range(workers))))}  # fmt: skip
        seqs = [0] * workers
        for w in arrivals[:total]:
            lags.append(server.updates - stamps[w])
            reply = await server.push(w, seqs[w], stamps[w], np.ones(5, np.float32), 1.0)
            stamps[w], seqs[w] = reply.stamp, seqs[w] + 1

    asyncio.run(run())
    return server, arrivals[:total], lags


def test_replay_reproduces_a_recorded_order_and_its_lags_exactly(tmp_path):
    server, arrivals, lags = record_a_free_server_run()
    assert server.order == arrivals and Counter(lags) == server.lags
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"config": {"workers": 3}, "update_order": server.order}))
    for algorithm in ("dana", "sa-asgd", "dc-asgd"):
        r = dana.simulate(
            torch.zeros(3), lambda p, w: [p[0] - 1], algorithm=algorithm, workers=3,
            steps=len(arrivals), lr=0.1, schedule=f"replay:{path}",
        )  # fmt: skip
        assert r.order == arrivals and r.lag == lags


def test_the_servers_order_survives_a_checkpoint():
    server, arrivals, _ = record_a_free_server_run()
    restored = ShardServer(server.spec, state=server.state())
    assert restored.order == arrivals


def test_replay_and_schedule_mistakes_are_one_line_errors(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"config": {"workers": 2}, "update_order": [0, 1, 1, 0]}))
    (tmp_path / "none.json").write_text(json.dumps({"config": {"workers": 2}}))
    (tmp_path / "bad.json").write_text("{")
    cases = [
        ({"schedule": "fifo"}, "unknown schedule 'fifo'"),
        ({"schedule": "gamma:w=2"}, "unknown option 'w' of schedule gamma"),
        ({"schedule": "gamma:v=big"}, "cannot read 'v=big'"),
        ({"schedule": "gamma:v=-1"}, "v must be > 0"),
        ({"schedule": "pareto:alpha=1"}, "alpha must be > 1"),
        ({"schedule": "gamma:slow=0.5x2,speeds=1/2"}, "not both"),
        ({"schedule": "gamma:speeds=1/2/3"}, "3 factors for 2 workers"),
        ({"schedule": "gamma:slow=2x2"}, "0 <= FRACTION <= 1"),
        ({"schedule": "replay:"}, "replay needs a result file"),
        ({"schedule": f"replay:{tmp_path / 'missing.json'}"}, "cannot read the replayed run"),
        ({"schedule": f"replay:{tmp_path / 'bad.json'}"}, "not valid JSON"),
        ({"schedule": f"replay:{tmp_path / 'none.json'}"}, "records no update order"),
        ({"schedule": f"replay:{good}", "workers": 3}, "run it with --workers 2"),
        ({"schedule": f"replay:{good}", "steps": 5}, "holds 4 updates but the run needs 5"),
        ({"schedule": f"replay:{good}", "algorithm": "ssgd"}, "cannot replay"),
    ]
    for kwargs, match in cases:
        args = {"algorithm": "dana", "workers": 2, "steps": 4, "lr": 0.1} | kwargs
        with pytest.raises(dana.DanaError, match=match) as info:
            dana.simulate(torch.zeros(2), lambda p, w: [p[0]], **args)
        assert "\n" not in str(info.value)


def test_schedules_fit_configs_and_folder_names(tmp_path):
    base = preset_config("cnn-fashion-mnist")
    config = base.replace(schedule="gamma:slow=0.25x2,v=0.2", workers=8)
    assert config.run_name.endswith("-n8-gamma-slow0.25x2-v0.2-s0")
    path = tmp_path / "launch-a" / "result.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"config": {"workers": 4}, "update_order": [0, 1, 2, 3]}))
    assert base.replace(schedule=f"replay:{path}", workers=4).run_name.endswith(
        "-n4-replay-launch-a-s0"
    )
    with pytest.raises(dana.DanaError, match="run it with --workers 4"):
        base.replace(schedule=f"replay:{path}", workers=2)
