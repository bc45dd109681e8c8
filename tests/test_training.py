"""Training real models through the simulator: equivalence, BatchNorm policy, schedule, resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dana.data import Dataset, TrainLoader, load_dataset, resolve_data_dir
from dana.errors import DanaError
from dana.training import LRSchedule, RunConfig, Trainer, preset_config, run_experiment, train
from dana.training.run import CHECKPOINT, RESULT


def tiny_dataset(n: int = 512, seed: int = 0, classes: int = 4) -> Dataset:
    """Random 1×8×8 images whose label is readable from the pixels (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    images = torch.randint(0, 120, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    images[:, 0, 0, :] = (labels * 60).to(torch.uint8)[:, None]
    return Dataset("tiny", images.contiguous(), labels, classes, (0.3,), (0.3,))


def tiny_model(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 64, classes),
    )


def test_one_worker_is_a_plain_pytorch_training_loop():
    # Same init, same batches: DANA with N = 1 is torch.optim.SGD(nesterov=True), BatchNorm
    # statistics included, and the test error is that of the plain model.
    data = tiny_dataset()
    reference = tiny_model()
    sim_model = tiny_model()
    opt = torch.optim.SGD(
        reference.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    )
    loader = TrainLoader(data, 32, seed=3)
    for epoch in range(2):
        for x, y in loader.epoch(epoch):
            opt.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            opt.step()
    result = train(
        sim_model,
        data,
        data,
        algorithm="dana",
        workers=1,
        epochs=2,
        lr=0.05,
        weight_decay=1e-3,
        batch_size=32,
        seed=3,
    )
    for a, b in zip(sim_model.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    reference.eval()
    with torch.no_grad():
        x = (data.images.float() / 255 - 0.3) / 0.3
        wrong = (reference(x).argmax(1) != data.labels).float().mean().item() * 100
    assert result.final_test_error == pytest.approx(wrong, abs=1e-9)


@pytest.mark.parametrize(
    "algorithm",
    [
        "dc-asgd",
        "dc-asgd-a",
        "sa-asgd",
        "gap-aware",
        "delay-adaptive",
        "dana-dc",
        "adam-asgd",
        "nadam-asgd",
        "dana-nadam",
    ],
)
def test_every_new_rule_trains_a_tiny_model(algorithm):
    # A tiny model, 3 workers, gamma order with a slow worker: the loss goes down, the gap
    # is logged, options reach the rule.
    data = tiny_dataset()
    lr = 0.005 if "adam" in algorithm else 0.02  # nag-asgd itself is unstable here at 0.05
    options = {"lam": 0.1} if algorithm in ("dc-asgd", "dana-dc") else {}
    trainer = Trainer(
        tiny_model(), data, data, algorithm=algorithm, workers=3, epochs=2, lr=lr,
        batch_size=32, warmup_epochs=0.0, schedule="gamma:slow=0.34x2", rule_options=options,
    )  # fmt: skip
    assert trainer.sim.rule.option.get("lam", 0.1) == 0.1
    history = [trainer.run_epoch() for _ in range(2)]
    assert not trainer.diverged
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(r["gap_mean"] > 0 for r in history)


def test_batchnorm_statistics_are_per_worker_and_the_master_keeps_the_last_sent():
    data = tiny_dataset()
    trainer = Trainer(
        tiny_model(),
        data,
        data,
        algorithm="dana",
        workers=3,
        epochs=1,
        lr=0.05,
        batch_size=32,
        schedule="round-robin",
    )
    trainer.run_epoch()
    means = [bufs[0] for bufs in trainer.worker_buffers]  # running_mean of each worker
    assert not torch.equal(means[0], means[1]) and not torch.equal(means[1], means[2])
    # 16 batches round-robin over 3 workers: the last message came from worker 0.
    assert trainer.last_worker == 15 % 3
    trainer.load_master_into_model()
    bn = trainer.model[1]
    torch.testing.assert_close(bn.running_mean, means[0])
    assert int(bn.num_batches_tracked) == 6  # worker 0 ran batches 0, 3, …, 15


def test_lr_schedule_warm_up_and_step_decay():
    s = LRSchedule(
        lr=0.1, workers=8, steps_per_epoch=100, milestones=(80, 120), decay=10, warmup_epochs=5
    )
    assert s(0) == pytest.approx(0.1 / 8)
    assert s(250) == pytest.approx(0.1 / 8 + (0.1 - 0.1 / 8) * 2.5 / 5)
    assert s(500) == pytest.approx(0.1)
    assert s(7999) == pytest.approx(0.1)
    assert s(8000) == pytest.approx(0.01)
    assert s(12000) == pytest.approx(0.001)
    one = LRSchedule(lr=0.1, workers=1, steps_per_epoch=100, milestones=(2,), warmup_epochs=5)
    assert [one(k) for k in (0, 150, 199)] == [0.1, 0.1, 0.1]
    assert one(200) == pytest.approx(0.01)  # decay inside the warm-up window multiplies


def test_ssgd_warm_up_ramps_from_lr_to_n_times_lr():
    # The schedule gives η/N → η; ssgd's rule scales by N: η → η·N (SPEC).
    s = LRSchedule(lr=0.1, workers=4, steps_per_epoch=10, warmup_epochs=5)
    assert 4 * s(0) == pytest.approx(0.1) and 4 * s(50) == pytest.approx(0.4)


def test_a_diverging_run_is_a_result():
    data = tiny_dataset()
    result = train(
        tiny_model(),
        data,
        data,
        algorithm="nag-asgd",
        workers=8,
        epochs=3,
        lr=1e12,
        batch_size=16,
        warmup_epochs=0,
    )
    assert result.diverged
    assert result.final_test_error == pytest.approx(75.0)  # chance error with 4 classes
    assert len(result.history) == 1


def test_presets_hold_the_papers_recipes():
    r20 = preset_config("resnet20-cifar10")
    assert (r20.model, r20.dataset, r20.epochs, r20.lr, r20.milestones, r20.decay) == (
        "resnet20",
        "cifar10",
        160,
        0.1,
        (80, 120),
        10.0,
    )
    assert (r20.batch_size, r20.momentum, r20.weight_decay, r20.warmup_epochs) == (
        128,
        0.9,
        1e-4,
        5.0,
    )
    wrn = preset_config("wrn16-4-cifar100")
    assert (wrn.model, wrn.dataset, wrn.epochs, wrn.milestones, wrn.decay, wrn.weight_decay) == (
        "wrn-16-4",
        "cifar100",
        200,
        (60, 120, 160),
        5.0,
        5e-4,
    )
    assert preset_config("wrn16-4-cifar10").dataset == "cifar10"


def test_the_long_reduced_preset_gives_each_of_32_workers_1500_gradients():
    short, long = preset_config("lenet-fashion-mnist"), preset_config("lenet-fashion-mnist-long")
    assert (long.model, long.dataset, long.batch_size) == (short.model, short.dataset, 128)
    per_epoch = 60_000 // long.batch_size  # all of Fashion-MNIST's training images
    assert long.epochs * per_epoch // 32 >= 1500
    assert [m / long.epochs for m in long.milestones] == [0.5, 0.75]  # as the reduced one's
    assert [m / short.epochs for m in short.milestones] == [0.5, 0.75]
    assert long.lr == 0.05  # the best of its own N = 1 sweep (docs/results/long-lr)


def small_config(**changes) -> RunConfig:
    base = preset_config("cnn-fashion-mnist").replace(
        train_samples=640,
        test_samples=500,
        epochs=3,
        batch_size=64,
        milestones=(2,),
        warmup_epochs=1.0,
    )
    return base.replace(**changes)


def kill_in_second_epoch(monkeypatch):
    """Make ``Trainer.run_epoch`` raise KeyboardInterrupt on its second call, as if the run
    were killed mid-epoch; return the original, to put back."""
    original = Trainer.run_epoch
    calls = {"n": 0}

    def killed_during_second_epoch(self, on_step=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed mid-epoch
        return original(self, on_step)

    monkeypatch.setattr(Trainer, "run_epoch", killed_during_second_epoch)
    return original


@pytest.mark.parametrize(
    ("algorithm", "workers", "schedule"),
    # ssgd with 3 workers and 10 batches an epoch: a round is pending across each epoch
    # boundary; block-random with 3 workers stops mid-block.
    [
        ("dana", 4, "gamma"),
        ("ssgd", 3, "block-random"),
        ("dana-zero", 3, "block-random"),
        # the new master state (sent θᵢ, τ counters, moments) and a slow worker; the other
        # new rules resume from a saved Simulation in test_mitigations.py
        ("gap-aware", 3, "gamma:slow=0.34x2"),
    ],
)
def test_resume_after_a_kill_ends_identical(tmp_path, monkeypatch, algorithm, workers, schedule):
    config = small_config(algorithm=algorithm, workers=workers, schedule=schedule)
    whole = run_experiment(config, tmp_path / "whole", log=False)

    original = kill_in_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "killed", log=False)
    partial = json.loads((tmp_path / "killed" / RESULT).read_text())
    assert not partial["finished"] and len(partial["epochs"]) == 1
    assert (tmp_path / "killed" / CHECKPOINT).exists()
    monkeypatch.setattr(Trainer, "run_epoch", original)
    resumed = run_experiment(config, tmp_path / "killed", log=False)

    def strip(result):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in result["epochs"]]

    assert strip(resumed) == strip(whole)
    assert resumed["final_test_error"] == whole["final_test_error"]
    assert resumed["finished"] and not (tmp_path / "killed" / CHECKPOINT).exists()
    # A finished run is not run again.
    kill_in_second_epoch(monkeypatch)
    assert run_experiment(config, tmp_path / "killed", log=False) == resumed


def test_result_json_schema_on_real_data(tmp_path):
    result = run_experiment(small_config(algorithm="nag-asgd", workers=2), tmp_path, log=False)
    on_disk = json.loads((tmp_path / RESULT).read_text())
    assert on_disk == result
    assert set(result) >= {"config", "epochs", "final_test_error", "diverged", "wall_seconds"}
    assert set(result["epochs"][0]) == {
        "epoch",
        "train_loss",
        "test_error",
        "lr",
        "gap_mean",
        "lag_mean",
        "seconds",
    }
    assert result["config"]["algorithm"] == "nag-asgd" and result["config"]["workers"] == 2
    assert [e["epoch"] for e in result["epochs"]] == [1, 2, 3]
    assert result["epochs"][-1]["lr"] == pytest.approx(result["config"]["lr"] / 10)
    assert result["epochs"][1]["lag_mean"] == pytest.approx(1.0)
    assert result["final_test_error"] == result["epochs"][-1]["test_error"]


def test_a_different_config_in_the_same_folder_is_refused(tmp_path, monkeypatch):
    from dana.errors import DanaError

    config = small_config(workers=2)
    original = kill_in_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path, log=False)
    monkeypatch.setattr(Trainer, "run_epoch", original)
    with pytest.raises(DanaError, match="another config"):
        run_experiment(config.replace(seed=1), tmp_path, log=False)


def test_real_fashion_mnist_loss_goes_down():
    # A few hundred steps on the shipped data (SPEC: one real-data test).
    root = resolve_data_dir(None)
    train_set = load_dataset("fashion-mnist", root, train=True).subset(12_800)
    test_set = load_dataset("fashion-mnist", root, train=False).subset(1000)
    from dana.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, in_channels=1)
    result = train(
        model,
        train_set,
        test_set,
        algorithm="dana",
        workers=4,
        epochs=2,
        lr=0.02,
        weight_decay=5e-4,
        batch_size=128,
        warmup_epochs=2,
        seed=0,
    )
    losses = [e["train_loss"] for e in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.final_test_error < 25.0
    assert not result.diverged


def test_nan_parameters_with_finite_losses_count_as_diverged():
    # 8 workers, 4 batches an epoch, round-robin: in epoch 2 workers 4-7 compute at the
    # finite parameters they hold, so every loss is finite while the master is NaN.
    data = tiny_dataset(n=128)
    trainer = Trainer(
        tiny_model(),
        data,
        data,
        algorithm="asgd",
        workers=8,
        epochs=3,
        lr=0.01,
        batch_size=32,
        schedule="round-robin",
        warmup_epochs=0,
    )
    trainer.run_epoch()
    assert not trainer.diverged
    trainer.sim.master.params.fill_(float("nan"))
    record = trainer.run_epoch()
    assert record["train_loss"] is not None  # finite
    assert trainer.diverged and trainer.finished
    assert trainer.final_test_error == pytest.approx(75.0)


def test_trainer_and_config_reject_bad_values():
    from dana.errors import DanaError

    data = tiny_dataset()
    for kwargs, match in [({"epochs": 0}, "epochs"), ({"decay": 0.0}, "decay")]:
        with pytest.raises(DanaError, match=match):
            train(tiny_model(), data, data, **kwargs)
    with pytest.raises(DanaError, match="unknown config keys"):
        small_config(epoch=3)
    with pytest.raises(DanaError, match="milestones must be a list"):
        small_config(milestones=3)


def test_gap_every_k_changes_only_the_gap_mean_the_mean_of_every_kth_updates_gap():
    def run(gap_every, gaps=None):
        trainer = Trainer(
            tiny_model(),
            tiny_dataset(),
            tiny_dataset(seed=1),
            algorithm="dana",
            workers=3,
            epochs=2,
            lr=0.05,
            batch_size=32,
            warmup_epochs=1.0,
            gap_every=gap_every,
        )
        records = []
        while not trainer.finished:
            on_step = None if gaps is None else (lambda: gaps.append(trainer.workers.last.gap))
            records.append(trainer.run_epoch(on_step))
        return trainer, records

    gaps: list = []
    every, full = run(1, gaps)
    sampled, some = run(4)
    assert torch.equal(every.sim.params, sampled.sim.params)
    per_epoch = every.loader.batches_per_epoch
    for e, (a, b) in enumerate(zip(full, some, strict=True)):
        assert {k: v for k, v in a.items() if k not in ("gap_mean", "seconds")} == {
            k: v for k, v in b.items() if k not in ("gap_mean", "seconds")
        }
        chosen = [float(g) for k, g in enumerate(gaps) if k // per_epoch == e and k % 4 == 0]
        assert b["gap_mean"] == pytest.approx(sum(chosen) / len(chosen), rel=1e-5)
        assert b["gap_mean"] != a["gap_mean"]


def test_simulated_workers_compute_at_the_held_parameters_themselves():
    from dana.training import SimulatedWorkers

    model = tiny_model()
    workers = SimulatedWorkers(model, algorithm="asgd", workers=3, lr=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    held = workers.sim.held
    start, end = held.data_ptr(), held.data_ptr() + held.numel() * held.element_size()
    for _ in range(4):
        with workers.step() as worker:
            first = next(model.parameters())
            assert start <= first.data_ptr() < end  # a view of the worker's row, no copy
            assert torch.equal(
                torch.cat([p.detach().reshape(-1) for p in model.parameters()]), held[worker]
            )
            F.cross_entropy(model(x), y).backward()
        # Between steps the model is on its own buffer: writing to it reaches no worker.
        assert next(model.parameters()).data_ptr() == workers.flat.params.data_ptr()
        before = held.clone()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        assert torch.equal(held, before)
    with pytest.raises(ZeroDivisionError), workers.step():
        raise ZeroDivisionError  # the block fails: nothing applied, the model back home
    assert next(model.parameters()).data_ptr() == workers.flat.params.data_ptr()
    workers.finish()
    flat = workers.flat
    assert next(model.parameters()).data_ptr() == flat.params.data_ptr()  # its own again
    assert torch.equal(flat.params, workers.sim.params)


def test_a_run_resumes_under_another_gap_every(tmp_path, monkeypatch):
    # dana's checkpoint has one layout whatever k (Σⱼvⱼ saved, summed when not kept).
    config = small_config(algorithm="dana", workers=3)
    whole = run_experiment(config, tmp_path / "whole", log=False)
    original = kill_in_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "killed", log=False)
    monkeypatch.setattr(Trainer, "run_epoch", original)
    resumed = run_experiment(config.replace(gap_every=4), tmp_path / "killed", log=False)
    assert resumed["finished"] and resumed["gap_every"] == 4
    keys = ("train_loss", "test_error", "lr", "lag_mean")
    assert [[e[k] for k in keys] for e in resumed["epochs"]] == [
        [e[k] for k in keys] for e in whole["epochs"]
    ]
    assert resumed["epochs"][0]["gap_mean"] == whole["epochs"][0]["gap_mean"]
    assert resumed["epochs"][1]["gap_mean"] != whole["epochs"][1]["gap_mean"]


def test_gap_every_is_how_a_run_logs_not_what_it_is():
    base = small_config()
    sampled = base.replace(gap_every=8)
    assert sampled == base and sampled.to_dict() == base.to_dict()  # resumes, or is skipped
    with pytest.raises(DanaError, match="gap_every must be an integer >= 1"):
        base.replace(gap_every=0)
