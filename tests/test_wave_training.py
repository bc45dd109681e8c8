"""Waves and batched runs in the training path (Trainer, run_group, dana sweep --batch-runs)
against the sequential trainer, in float64 where exactness is checked."""

from __future__ import annotations

import copy
import io
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dana.errors import DanaError
from dana.rules import ALGORITHMS
from dana.simulation import SCHEDULES
from dana.training import RunConfig, Trainer, run_experiment
from dana.training.folder import tensor_layout
from dana.training.group import train_group
from dana.training.run import CHECKPOINT, METRICS, MODEL, RESULT, OpenRun, run_group

ALL_SCHEDULES = (*SCHEDULES, "gamma:slow=0.25x2")
WORKERS, BATCH = 4, 8


def mlp(batch_norm: bool = True) -> nn.Module:
    norm = [nn.BatchNorm1d(10)] if batch_norm else []
    return nn.Sequential(nn.Linear(6, 10), *norm, nn.ReLU(), nn.Linear(10, 3)).double()


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def data(samples: int = 48, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 6, generator=gen, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


TRAIN, EVAL = data(48), data(24, seed=1)  # epochs of 6 gradients: waves and rounds cut short


def trainer(algorithm="dana", schedule="gamma", *, waves="on", batch_norm=True, **changes):
    args = {
        "algorithm": algorithm,
        "workers": 1 if algorithm == "baseline" else WORKERS,
        "epochs": 2,
        "lr": 0.05,
        "weight_decay": 1e-3,
        "batch_size": BATCH,
        "warmup_epochs": 1.5,  # a rate per update, and a milestone: the lr changes mid-run
        "milestones": (1,),
        "schedule": schedule,
        "seed": 3,
        "loss": cross_entropy,
        "waves": waves,
        **changes,
    }
    train_data, eval_data = args.pop("train_data", TRAIN), args.pop("eval_data", EVAL)
    return logged(Trainer(lambda: mlp(batch_norm), train_data, eval_data, **args))


def logged(t: Trainer) -> Trainer:
    """Log every update the master applies (worker, lag, gap, lr), whichever path applies it,
    and count the batched (vmap) calls."""
    t.log, t.vmap_calls = [], []
    apply, vmapped = t.sim.apply, t.worker_grads._vmapped

    def apply_logged(worker, grad, lr):
        update = apply(worker, grad, lr)
        t.log.append((update.worker, update.lag, float(update.gap), lr))
        return update

    def vmapped_counted(*args):
        t.vmap_calls.append(len(args[0]))
        return vmapped(*args)

    t.sim.apply = apply_logged
    t.worker_grads._vmapped = vmapped_counted
    return t


def train_all(t: Trainer) -> Trainer:
    while not t.finished:
        t.run_epoch()
    return t


def assert_same_run(a: Trainer, b: Trainer, tol: float = 1e-10) -> None:
    """Same updates (order, lags, learning rates; gaps to ``tol``), parameters, held
    parameters, per-worker statistics (but after a divergence) and history."""
    assert [u[:2] + u[3:] for u in a.log] == [u[:2] + u[3:] for u in b.log]
    close = {"rtol": 0, "atol": tol, "equal_nan": True}
    gaps_a, gaps_b = (torch.tensor([u[2] for u in t.log]) for t in (a, b))
    torch.testing.assert_close(gaps_a, gaps_b, rtol=tol, atol=0, equal_nan=True)
    torch.testing.assert_close(a.sim.params, b.sim.params, **close)
    torch.testing.assert_close(a.sim.held, b.sim.held, **close)
    if not a.diverged:  # the rest of a wave cut by a divergence moved its workers' statistics
        for x, y in zip(a.workers.buffers, b.workers.buffers, strict=True):
            torch.testing.assert_close(x, y, **close)
    assert a.lags == b.lags and a.diverged == b.diverged and a.last_worker == b.last_worker
    assert_same_history(a.history, b.history, tol)


def assert_same_history(a: list[dict], b: list[dict], tol: float = 1e-10) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key == "seconds":
                continue
            if isinstance(ra[key], float):
                assert rb[key] == pytest.approx(ra[key], rel=tol, abs=tol), key
            else:
                assert ra[key] == rb[key], key


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_a_trainer_in_waves_makes_the_sequential_run(algorithm):
    for schedule in ALL_SCHEDULES:
        for batch_norm in (True, False):
            seq = train_all(trainer(algorithm, schedule, waves="off", batch_norm=batch_norm))
            wave = train_all(trainer(algorithm, schedule, waves="on", batch_norm=batch_norm))
            assert wave.uses_waves and not seq.uses_waves and wave.worker_grads.batched
            # Batched for real (a wave of one is the sequential code).
            assert (max(wave.vmap_calls, default=0) > 1) == (seq.workers.workers > 1)
            assert not seq.vmap_calls
            assert len(wave.log) == 2 * 6  # no update beyond the epochs, ssgd's flush aside
            assert_same_run(seq, wave)
            if batch_norm and seq.workers.workers > 1:  # each worker has its own statistics
                means = wave.workers.buffers[0]
                assert len({tuple(row.tolist()) for row in means}) > 1


def test_waves_default_to_off_on_a_cpu_and_bad_values_are_refused():
    from dana.errors import DanaError

    assert not trainer(waves="auto").uses_waves
    with pytest.raises(DanaError, match="waves must be one of auto, on, off"):
        trainer(waves="yes")
    with pytest.raises(DanaError, match="waves must be auto, on or off"):
        RunConfig.for_task(trainer().task, waves="sometimes")


def state_round_trip(state):
    """Through torch.save and torch.load, as a checkpoint file goes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("algorithm", ["dana", "ssgd", "baseline"])
def test_a_checkpoint_resumes_in_the_other_mode_as_if_uninterrupted(algorithm):
    whole = train_all(trainer(algorithm, "gamma", waves="on", epochs=3))
    for first_mode, then_mode in (("on", "off"), ("off", "on")):
        first = trainer(algorithm, "gamma", waves=first_mode, epochs=3)
        first.run_epoch()
        state = state_round_trip(copy.deepcopy(first.state_dict()))
        resumed = trainer(algorithm, "gamma", waves=then_mode, epochs=3)
        # One checkpoint layout for both modes (what restore() checks a file against).
        assert tensor_layout(state) == tensor_layout(resumed.state_dict())
        resumed.load_state_dict(state)
        train_all(resumed)
        resumed.log = first.log + resumed.log
        assert_same_run(whole, resumed)


class ItemModel(nn.Module):
    """``.item()`` in forward: torch.func.vmap cannot batch it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x) * (1.0 + 0.0 * x.abs().max().item())


@pytest.mark.parametrize("kind", ["item", "dropout"])
def test_a_model_vmap_cannot_batch_trains_one_worker_at_a_time_after_one_notice(kind, capsys):
    def model():
        if kind == "item":
            return ItemModel()
        return nn.Sequential(
            nn.Linear(6, 10), nn.Dropout(0.3), nn.ReLU(), nn.Linear(10, 3)
        ).double()

    runs = {}
    for waves in ("off", "on"):
        torch.manual_seed(7)  # dropout draws from torch's generator: the same for both
        t = logged(
            Trainer(model, TRAIN, EVAL, loss=cross_entropy, algorithm="dana", workers=WORKERS,
                    epochs=2, lr=0.05, batch_size=BATCH, schedule="gamma", seed=3, waves=waves)
        )  # fmt: skip
        runs[waves] = train_all(t)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "one worker at a time" in notice[0]
    assert (".item()" if kind == "item" else "random") in notice[0]
    assert not runs["on"].worker_grads.batched
    # The fallback is the sequential path: bit for bit.
    assert runs["on"].log == runs["off"].log
    assert torch.equal(runs["on"].sim.params, runs["off"].sim.params)
    assert_same_history(runs["on"].history, runs["off"].history, tol=0)


def poisoned(step: int = 20):
    """320 samples (epochs of 40 gradients) with a NaN in the batch of gradient ``step``."""
    from dana.data.streams import epoch_generator, epoch_order

    x, y = data(320, seed=2)
    x = x.clone()
    x[epoch_order(epoch_generator(3, 0), 320)[step * BATCH + 1], 2] = float("nan")
    return x, y


def test_a_wave_run_stops_where_the_sequential_run_finds_its_divergence():
    # The loss turns NaN at gradient 20 and the sequential loop stops at the end of that
    # block of 16 (after 32 updates), not at the epoch's end; waves must stop there too.
    seq = train_all(trainer("asgd", "gamma", waves="off", train_data=poisoned()))
    wave = train_all(trainer("asgd", "gamma", waves="on", train_data=poisoned()))
    assert seq.diverged and len(seq.log) == 32 and len(seq.history) == 1
    assert [u[:2] + u[3:] for u in wave.log] == [u[:2] + u[3:] for u in seq.log]
    assert wave.diverged and wave.history[0]["train_loss"] is None
    assert_same_history(seq.history, wave.history)


# -- several runs in one computation ------------------------------------------------------
GROUP = [  # algorithm, schedule, seed, lr
    ("dana", "gamma", 1, 0.05),
    ("nag-asgd", "block-random", 2, 0.02),
    ("ssgd", "round-robin", 3, 0.01),
    ("dc-asgd", "gamma:slow=0.25x2", 4, 0.05),
]


def group_trainers(specs, waves):
    return [
        trainer(algorithm, schedule, seed=seed, lr=lr, waves=waves)
        for algorithm, schedule, seed, lr in specs
    ]


def test_runs_trained_together_make_the_runs_made_alone():
    alone = [train_all(t) for t in group_trainers(GROUP, "off")]
    together = group_trainers(GROUP, "off")  # the group batches whatever the option says
    train_group(together)
    assert max(together[0].vmap_calls) > WORKERS  # rows of several runs in one call
    for a, b in zip(alone, together, strict=True):
        assert_same_run(a, b)


def test_a_diverging_run_of_a_group_is_recorded_and_the_others_go_on():
    specs = [*GROUP[:2], ("asgd", "gamma", 3, 0.05)]
    datas = [data(320, seed=2), data(320, seed=2), poisoned()]

    def make():
        return [
            trainer(a, s, seed=seed, lr=lr, train_data=d, waves="off")
            for (a, s, seed, lr), d in zip(specs, datas, strict=True)
        ]

    alone, together = [train_all(t) for t in make()], make()
    train_group(together)
    assert [t.diverged for t in together] == [False, False, True]
    assert len(together[2].history) == 1 and together[0].finished
    for a, b in zip(alone, together, strict=True):
        assert_same_run(a, b)


def test_runs_of_different_models_are_not_trained_together():
    from dana.errors import DanaError

    with pytest.raises(DanaError, match="runs trained together need one task"):
        train_group([trainer(batch_norm=True), trainer(batch_norm=False)])


# -- run folders: dana sweep --batch-runs --------------------------------------------------
TASK_MODULE = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    import dana

    def loss(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    def model():
        return torch.nn.Sequential(
            torch.nn.Linear(6, 10), torch.nn.BatchNorm1d(10), torch.nn.ReLU(),
            torch.nn.Linear(10, 3),
        ).double()

    def make():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return dana.Task("wave-mlp", model, (x, y), loss, eval_data=(x[:32], y[:32]),
                         defaults={"epochs": 3, "batch_size": 8, "lr": 0.05,
                                   "warmup_epochs": 1, "milestones": [2]})
    """
)


@pytest.fixture
def task_module(tmp_path, monkeypatch):
    (tmp_path / "wavetask.py").write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}")  # for the sweep's pool processes
    return "wavetask:make"


def configs_of(spec: str) -> list[RunConfig]:
    from dana.tasks import load_task

    base = RunConfig.for_task(load_task(spec), spec, workers=WORKERS)
    return [base.replace(algorithm=a, schedule=s, seed=seed, lr=lr) for a, s, seed, lr in GROUP[:3]]


def assert_same_folder(a, b, tol: float = 1e-10) -> None:
    """Two run folders hold the same run: result.json (timings aside), metrics.csv, model.pt."""
    ra, rb = (json.loads((f / RESULT).read_text()) for f in (a, b))
    timing = ("wall_seconds", "epochs", "final_metric")
    assert {k: v for k, v in ra.items() if k not in timing} == {
        k: v for k, v in rb.items() if k not in timing
    }
    assert ra["finished"] and rb["finished"] and not (b / CHECKPOINT).exists()
    assert rb["final_metric"] == pytest.approx(ra["final_metric"], rel=tol)
    assert_same_history(ra["epochs"], rb["epochs"], tol)
    rows_a, rows_b = ((f / METRICS).read_text().splitlines() for f in (a, b))
    assert rows_a[0] == rows_b[0] and len(rows_a) == len(rows_b)
    ma, mb = (torch.load(f / MODEL, weights_only=True) for f in (a, b))
    for key in ma:
        torch.testing.assert_close(ma[key], mb[key], rtol=0, atol=tol)


def test_a_batched_group_writes_each_run_as_alone_and_resumes_after_a_kill(
    task_module, tmp_path, monkeypatch
):
    configs = configs_of(task_module)
    for i, config in enumerate(configs):
        run_experiment(config, tmp_path / "alone" / str(i), log=False)
    whole = run_group(configs, [tmp_path / "whole" / str(i) for i in range(3)], log=False)
    assert all(not isinstance(r, Exception) and r["finished"] for r in whole.values())
    for i in range(3):
        assert_same_folder(tmp_path / "alone" / str(i), tmp_path / "whole" / str(i))

    # Killed after 4 epoch saves: run 0 at epoch 2, runs 1 and 2 at epoch 1, mid-group.
    saves, save = [], OpenRun.save_epoch

    def killed_after_four(self, record, write=None):
        if len(saves) == 4:
            raise KeyboardInterrupt
        saves.append(self.out)
        save(self, record, write)

    cut = [tmp_path / "cut" / str(i) for i in range(3)]
    monkeypatch.setattr(OpenRun, "save_epoch", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        run_group(configs, cut, log=False)
    monkeypatch.setattr(OpenRun, "save_epoch", save)
    done = [len(json.loads((f / RESULT).read_text())["epochs"]) for f in cut]
    assert done == [2, 1, 1] and all((f / CHECKPOINT).exists() for f in cut)
    resumed = run_group(configs, cut, log=False)
    assert all(r["finished"] for r in resumed.values())
    for i in range(3):
        assert_same_folder(tmp_path / "whole" / str(i), cut[i])
    # Finished runs are skipped: nothing trains, the results are those on disk.
    again = run_group(configs, cut, log=False)
    assert again == resumed


def test_a_group_that_fits_only_run_by_run_is_refused_for_each_run(
    task_module, tmp_path, monkeypatch
):
    # The memory check counts the runs of a group together: with room for two runs' states
    # but not three, each folder gets the one-line error and nothing is written.
    from dana.training import resources
    from dana.training.run import resolve_task

    configs = configs_of(task_module)
    model = resolve_task(configs[0]).build_model(0)
    together = 2 * sum(resources.state_bytes(c, model) for c in configs)
    monkeypatch.setattr(resources, "available_memory", lambda: together - 1)
    outs = [tmp_path / str(i) for i in range(3)]
    outcomes = run_group(configs, outs, log=False)
    assert set(outcomes) == set(outs)
    for error in outcomes.values():
        assert isinstance(error, DanaError)
        assert str(error).startswith("3 runs of 4 workers")
        assert "train fewer runs together (batch_runs, --batch-runs)" in str(error)
    assert not any(out.exists() and any(out.iterdir()) for out in outs)
    assert run_group(configs[:2], outs[:2], log=False)[outs[0]]["finished"]  # two fit


def test_dana_sweep_batch_runs_groups_compatible_runs_and_skips_finished_ones(
    task_module, tmp_path
):
    from click.testing import CliRunner

    from dana.cli import main
    from dana.experiments.sweep import SweepSpec

    (tmp_path / "grid.toml").write_text(
        f'task = "{task_module}"\nalgorithms = ["dana", "nag-asgd"]\nworkers = [2, 4]\n'
        'seeds = [0, 1]\nbatch_runs = 3\nwaves = "on"\n'
    )
    configs = SweepSpec.from_toml(tmp_path / "grid.toml").configs()
    assert len(configs) == 8 and all(c.waves == "on" for c in configs)
    first = configs[0]
    run_experiment(first, tmp_path / "runs" / first.run_name, log=False)  # done beforehand
    runner = CliRunner()
    out = runner.invoke(
        main,
        ["sweep", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "runs"), "--no-progress"],
    )
    assert out.exit_code == 0, out.output
    assert "7 runs finished, 1 already done" in out.output
    for config in configs:
        alone = tmp_path / "alone" / config.run_name
        run_experiment(config.replace(waves="off"), alone, log=False)
        assert_same_folder(alone, tmp_path / "runs" / config.run_name)


def test_batch_groups_keep_incompatible_runs_apart():
    from dana.experiments.sweep import batch_groups
    from dana.training import preset_config

    base = preset_config("cnn-fashion-mnist")
    runs = {
        f"r{i}": base.replace(workers=n, seed=s, algorithm=a)
        for i, (n, s, a) in enumerate(
            [(4, 0, "dana"), (4, 1, "asgd"), (8, 0, "dana"), (4, 2, "ssgd"), (4, 3, "dana")]
        )
    }
    groups = [[name for name, _ in g] for g in batch_groups(runs, 3)]
    assert groups == [["r0", "r1", "r3"], ["r4"], ["r2"]]


def test_the_cli_takes_waves_and_batch_runs():
    from click.testing import CliRunner

    from dana.cli import main

    runner = CliRunner()
    help_text = runner.invoke(main, ["sweep", "--help"]).output
    assert "--batch-runs" in help_text and "--waves" in help_text and "slower" in help_text
    assert "--waves" in runner.invoke(main, ["run", "--help"]).output
    bad = runner.invoke(main, ["sweep", "--preset", "cnn-fashion-mnist", "--algorithms",
                               "dana", "--batch-runs", "0", "--dry-run"])  # fmt: skip
    assert bad.exit_code == 2 and "batch_runs must be an integer >= 1" in bad.output


@pytest.mark.slow
def test_the_reduced_preset_in_waves_ends_at_the_sequential_test_error(tmp_path):
    """lenet-fashion-mnist at N = 8, all 20 epochs (float32, the real data): waves only round
    differently. A run pair of about 1.5 min on two quiet CPU cores."""
    from dana.training import preset_config

    config = preset_config("lenet-fashion-mnist").replace(workers=8)
    errors = {}
    for waves in ("off", "on"):
        result = run_experiment(config.replace(waves=waves), tmp_path / waves, log=False)
        errors[waves] = result["final_test_error"]
    assert abs(errors["on"] - errors["off"]) <= 0.3, errors
