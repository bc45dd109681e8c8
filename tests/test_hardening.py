"""Issue 13's hardening: folder locks, leftovers, Ctrl-C and orphans of ``dana sweep``, and
the chaos trial (``scripts/chaos.py``) in a reduced form. The bad inputs are in
test_bad_inputs.py."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dana.cli import main
from dana.errors import DanaError
from dana.training.io import ensure_writable
from dana.training.run import CHECKPOINT, RESULT

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
SAMPLES = ["--train-samples", "256", "--test-samples", "200"]
TINY = [*SAMPLES, "--batch-size", "64"]


def dana(*args: str) -> list[str]:
    return [sys.executable, "-m", "dana.cli", *args]


def start(*args: str) -> subprocess.Popen:
    """``dana ARGS`` in a session of its own (as a terminal's job: its own group)."""
    return subprocess.Popen(
        dana(*args),
        env=ENV,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def epochs_on_disk(folder: Path) -> int:
    try:
        return len(json.loads((folder / RESULT).read_text())["epochs"])
    except (OSError, ValueError, KeyError):
        return 0


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies count as gone: only their parent's wait() would remove them.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# -- one writer per folder ------------------------------------------------------------------


def test_concurrent_ensure_writable_calls_do_not_trip_over_each_other(tmp_path):
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(300):
                ensure_writable(tmp_path)
        except BaseException as err:  # collected, asserted below
            errors.append(err)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_folder_has_one_writer_and_its_lock_dies_with_it(tmp_path):
    out = tmp_path / "out"
    args = ["run", *TINY, "--epochs", "40", "-n", "2", "--threads", "1", "--out", str(out)]
    proc = start(*args, "--no-progress")
    try:
        wait_for(lambda: epochs_on_disk(out) >= 1)
        second = CliRunner().invoke(main, [*args, "--epochs", "40"])
        assert second.exit_code == 2, second.output
        assert second.stderr.startswith("dana: error: ") and "in use by another" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    # kill -9 released the lock: the same command resumes.
    from dana.training.folder import claim_folder, release_folder

    claim_folder(out)
    release_folder(out)


def test_a_second_sweep_skips_the_runs_another_holds_and_takes_the_next(tmp_path):
    out = tmp_path / "runs"
    args = ["sweep", "--preset", "cnn-fashion-mnist", "--algorithms", "dana", "--workers", "2"]
    args += ["--train-samples", "1024", "--test-samples", "100", "--epochs", "40"]
    args += ["--threads", "1", "--no-progress", "--out", str(out)]
    first = start(*args, "--seeds", "0")
    seed0 = out / "cnn-fashion-mnist" / "dana-n2-block-random-s0"
    seed1 = out / "cnn-fashion-mnist" / "dana-n2-block-random-s1"
    try:
        wait_for(lambda: epochs_on_disk(seed0) >= 1)
        second = subprocess.run(
            dana(*args, "--seeds", "0,1"), env=ENV, capture_output=True, text=True, timeout=300
        )
    finally:
        _, err_first = first.communicate(timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"in use by another process: {seed0}" in second.stdout
    assert "1 runs finished" in second.stdout  # seed 1, taken while the first held seed 0
    assert first.returncode == 0, err_first
    for folder in (seed0, seed1):
        result = json.loads((folder / RESULT).read_text())
        assert result["finished"] and len(result["epochs"]) == 40


@pytest.mark.parametrize("algorithm", ["asgd", "nag-asgd", "dana-zero", "dana", "ssgd"])
def test_the_memory_estimate_is_the_simulators_state(algorithm):
    # What the memory check counts is what the trainer holds: its state's tensors.
    from dana.training import preset_config
    from dana.training.folder import tensor_layout
    from dana.training.resources import available_memory, state_bytes
    from dana.training.run import build_trainer

    config = preset_config("lenet-fashion-mnist").replace(
        algorithm=algorithm, workers=5, train_samples=256, test_samples=100
    )
    trainer = build_trainer(config)
    held = trainer.state_dict()["sim"]
    actual = sum(
        math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        for shape, dtype in tensor_layout(held).values()
    )
    buffers = sum(b.numel() * b.element_size() for b in trainer.flat.model.buffers())
    estimate = state_bytes(config, trainer.flat.model)
    assert actual + 5 * buffers <= estimate <= 1.05 * (actual + 5 * buffers) + 4096
    assert available_memory() > 0


# -- leftovers ------------------------------------------------------------------------------


def test_orphan_temporaries_and_a_leftover_checkpoint_are_cleaned_on_the_next_run(tmp_path):
    out = tmp_path / "out"
    args = ["run", *TINY, "--epochs", "1", "--threads", "1", "--no-progress", "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    finished = (out / RESULT).read_bytes()
    # What kill -9 leaves: temporaries of interrupted atomic writes, and the checkpoint
    # when the kill falls between the final result and the checkpoint's deletion.
    for name in (".checkpoint.pt.k2j4.tmp", ".result.json.x9_a.tmp", ".model.pt.ab.tmp"):
        (out / name).write_bytes(b"\0" * 1000)
    (out / CHECKPOINT).write_bytes(b"stale")
    assert CliRunner().invoke(main, args).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".dana-lock",
        "metrics.csv",
        "model.pt",
        RESULT,
    ]
    assert (out / RESULT).read_bytes() == finished


# -- Ctrl-C and a killed parent --------------------------------------------------------------


def _sweep_args(out: Path) -> list[str]:
    args = ["sweep", "--preset", "cnn-fashion-mnist", "--algorithms", "dana", "--workers", "2,4"]
    args += ["--seeds", "0,1,2", *SAMPLES, "--epochs", "30", "--jobs", "2", "--threads", "1"]
    return [*args, "--no-progress", "--out", str(out)]


def _interrupt(proc: subprocess.Popen, *, times: int) -> tuple[float, str]:
    began = time.time()
    for i in range(times):
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole group
        if i + 1 < times:
            time.sleep(0.3)
    _, err = proc.communicate(timeout=60)
    return time.time() - began, err


def test_ctrl_c_stops_a_sweep_at_once_and_every_run_resumes(tmp_path):
    # At start-up (the pool's processes importing torch): no child traceback.
    early = start(*_sweep_args(tmp_path / "early"))
    first_line = early.stderr.readline()  # printed just before the pool starts
    assert first_line.startswith("sweep: "), first_line
    time.sleep(0.5)
    seconds, err = _interrupt(early, times=1)
    assert "Traceback" not in err and early.returncode == 130, err
    assert seconds < 10
    wait_for(lambda: not group_alive(early.pid), timeout=5)
    # During training: stopped within seconds, nothing left running, nothing lost.
    out = tmp_path / "runs"
    proc = start(*_sweep_args(out))
    wait_for(lambda: any(epochs_on_disk(p.parent) >= 1 for p in out.rglob(RESULT)))
    seconds, err = _interrupt(proc, times=1)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("dana: interrupted: run the same command")
    assert seconds < 8, seconds
    wait_for(lambda: not group_alive(proc.pid), timeout=5)
    started = [p.parent for p in out.rglob(RESULT)]
    assert started and all(epochs_on_disk(p) < 30 for p in started)
    # Twice, 0.3 s apart: exits at once, never hangs.
    again = start(*_sweep_args(out))
    wait_for(lambda: any(epochs_on_disk(p.parent) >= 2 for p in out.rglob(RESULT)))
    seconds, err = _interrupt(again, times=2)
    assert "Traceback" not in err and again.returncode in (130, -signal.SIGINT), err
    assert seconds < 8
    wait_for(lambda: not group_alive(again.pid), timeout=5)


def test_killing_only_the_sweeps_parent_ends_its_pool(tmp_path):
    out = tmp_path / "runs"
    proc = start(*_sweep_args(out))
    wait_for(lambda: any(epochs_on_disk(p.parent) >= 1 for p in out.rglob(RESULT)))
    pool = children(proc.pid)
    assert pool
    os.kill(proc.pid, signal.SIGKILL)  # the parent alone, not its group
    proc.communicate()
    wait_for(lambda: not group_alive(proc.pid), timeout=10)


# -- the chaos trial ----------------------------------------------------------------------


CHAOS = ["--kills", "3", "--seed", "1", "--no-launch"]


def test_the_chaos_trial_in_a_reduced_form(tmp_path):
    # kill -9 at random moments: `dana run`, `dana sweep` (its group), `dana sweep` (its
    # parent alone); each re-run ends as an uninterrupted run, nothing left behind.
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), *CHAOS, "--work", str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    survived, tried = map(int, re.search(r"kills survived: (\d+)/(\d+)", done.stdout).groups())
    assert survived == tried >= 2, done.stdout  # a command that ends first is not a kill


# -- `dana launch`: the checkpoint keeps up with training -----------------------------------


class Interrupted(Exception):
    pass


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_launch_driver_loses_at_most_the_epoch_in_progress(tmp_path, monkeypatch):
    # The evaluator is slow (10,000 test images) and training fast (32 steps an epoch): the
    # evaluations fall behind. When the first one comes in, every epoch the coordinator had
    # ended must already be in the checkpoint (with the masters still to evaluate), so a
    # driver killed then retrains nothing that had ended. Resumed, the run ends as the
    # simulator's (the simulator's order is imposed; dana-zero keeps its state on the server).
    pytest.importorskip("ray")
    from dana.runtime import driver, launch
    from dana.training import preset_config
    from dana.training.io import load_checkpoint
    from dana.training.run import build_trainer

    config = preset_config("cnn-fashion-mnist").replace(
        algorithm="dana-zero",
        workers=2,
        schedule="round-robin",
        train_samples=1024,
        test_samples=10_000,
        batch_size=32,
        epochs=5,
        warmup_epochs=1.0,
    )
    seen: dict[str, int] = {}
    append = driver._Launch._append

    def first_evaluation(self, record):
        if record["epoch"] == 1:
            steps = self.ray.get(self.shards[0].ping.remote()) // self.steps_per_epoch
            path = tmp_path / CHECKPOINT
            state = load_checkpoint(path) if path.exists() else {"history": [], "pending": []}
            seen.update(ended=steps, saved=len(state["history"]) + len(state["pending"]))
            raise Interrupted  # as a kill -9 would, before anything else is written
        append(self, record)

    monkeypatch.setattr(driver._Launch, "_append", first_evaluation)
    with pytest.raises(Interrupted):
        launch(config, tmp_path, deterministic=True, threads=1, log=False)
    assert seen["ended"] >= 2, seen  # the evaluation did fall behind
    assert seen["saved"] >= seen["ended"] - 1, seen
    monkeypatch.setattr(driver._Launch, "_append", append)
    result = launch(config, tmp_path, deterministic=True, threads=1, log=False)
    trainer = build_trainer(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' arithmetic
    try:
        while not trainer.finished:
            trainer.run_epoch()
    finally:
        torch.set_num_threads(threads)
    assert [e["test_error"] for e in result["epochs"]] == [e["test_error"] for e in trainer.history]
    assert [e["lag_mean"] for e in result["epochs"]] == [e["lag_mean"] for e in trainer.history]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".dana-lock",
        "metrics.csv",
        "model.pt",
        RESULT,
    ]


# -- GPU paths checked without a GPU --------------------------------------------------------


def test_a_pool_process_gets_one_of_the_gpus_this_process_was_given(monkeypatch):
    # A job given GPUs "2,3" (a batch system's CUDA_VISIBLE_DEVICES) hands its pool
    # processes "2" and "3", not the indices 0 and 1 (other jobs' GPUs); names pass as they are.
    from dana.experiments.sweep import gpu_for_job

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [gpu_for_job(j, 2) for j in range(3)] == ["0", "1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [gpu_for_job(j, 2) for j in range(3)] == ["2", "3", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-a, MIG-b")
    assert [gpu_for_job(j, 2) for j in range(2)] == ["MIG-a", "MIG-b"]


def test_a_gpu_index_a_ray_worker_cannot_see_is_one_line():
    # Ray gives each worker (each sweep task) only its own GPUs: cuda:1 with one GPU each
    # would fail inside every worker; it is refused up front.
    from dana.experiments.cluster import ClusterOptions
    from dana.runtime.driver import LaunchOptions
    from dana.training import preset_config

    config = preset_config("cnn-fashion-mnist").replace(device="cuda:1")
    with pytest.raises(DanaError, match=r"--device cuda:1: a worker sees only its own GPU"):
        LaunchOptions(gpus_per_worker=1).validated(config)
    assert LaunchOptions(gpus_per_worker=2).validated(config)
    assert LaunchOptions(gpus_per_worker=1).validated(config.replace(device="cuda:0"))
    with pytest.raises(DanaError, match=r"--device cuda:1: a run on Ray sees only its own"):
        ClusterOptions(None, gpus_per_run=1).validated([config])
    assert ClusterOptions(None, gpus_per_run=1).validated([config.replace(device="cuda")])


def test_runs_on_a_gpu_ask_cudnn_for_deterministic_kernels():
    from dana.training.resources import deterministic_kernels

    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.benchmark
    try:
        cudnn.deterministic, cudnn.benchmark = False, True
        deterministic_kernels(torch.device("cpu"))  # nothing to do off the GPU
        assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
        deterministic_kernels(torch.device("cuda", 0))
        assert (cudnn.deterministic, cudnn.benchmark) == (True, False)
    finally:
        cudnn.deterministic, cudnn.benchmark = before
