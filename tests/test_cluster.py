"""Ray at cluster scale: ``dana sweep --address`` (runs as Ray tasks, files shipped back,
a killed task requeued and resumed), a parameter-server shard killed mid-launch, and the
launch's ergonomics (an unreachable address, Ray's log lines hidden)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dana.errors import DanaError
from dana.experiments import cluster
from dana.experiments.cluster import ClusterOptions
from dana.experiments.sweep import SweepSpec, run_sweep
from dana.runtime import driver, launch

ROOT = Path(__file__).resolve().parents[1]
TINY = {"train_samples": 512, "test_samples": 200, "epochs": 2, "batch_size": 64}
GRID = {"preset": "cnn-fashion-mnist", "algorithms": ("baseline", "dana"), "workers": (2,)}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance (the session's, if a test file started one already)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


def spec() -> SweepSpec:
    return SweepSpec.from_values(**GRID, overrides=dict(TINY))


def comparable(root: Path) -> dict[str, Any]:
    """Every run's result.json but its timings (and the files each run folder holds)."""
    runs = {}
    for path in sorted(root.rglob("result.json")):
        result = json.loads(path.read_text())
        result.pop("wall_seconds")
        for record in result["epochs"]:
            record.pop("seconds")
        files = sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("."))
        runs[str(path.parent.relative_to(root))] = (result, files)
    return runs


def same_models(a: Path, b: Path) -> bool:
    for path in sorted(a.rglob("model.pt")):
        x = torch.load(path, weights_only=True)
        y = torch.load(b / path.relative_to(a), weights_only=True)
        if list(x) != list(y) or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """The reference: the same grid in the local pool, one thread per run as the tasks."""
    out = tmp_path_factory.mktemp("local")
    summary = run_sweep(spec(), out, jobs=1, threads_per_job=1, progress=False)
    assert len(summary.finished) == 2 and not summary.failed
    return out


def dana_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "dana", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.mark.ray
def test_a_sweep_on_a_ray_cluster_equals_the_local_sweep(ray_cluster, local_sweep, tmp_path):
    # `dana sweep --address` from another process (a driver joining the cluster): every
    # run is a Ray task in a temporary folder; its files come back to --out, and equal
    # the local pool's (result.json but timings, model.pt bit for bit). Ray's own log
    # lines (e.g. its start-up warnings) stay out of the output.
    address = ray_cluster.get_runtime_context().gcs_address
    args = ["--preset", GRID["preset"], "--algorithms", "baseline,dana", "--workers", "2"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    out = tmp_path / "ray"
    done = dana_cli("sweep", *args, "--address", address, "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"sweep: 2 runs into {out} as Ray tasks on {address}"]
    assert done.stdout.splitlines()[0].startswith("2 runs finished, 0 already done")
    assert comparable(out) == comparable(local_sweep)
    assert same_models(out, local_sweep)
    # Run again: both runs are found finished on the driver's disk, nothing is sent.
    again = dana_cli("sweep", *args, "--address", address, "--out", str(out), "--no-progress")
    assert again.returncode == 0 and "0 runs finished, 2 already done" in again.stdout


@pytest.mark.ray
def test_a_killed_task_is_requeued_and_resumes_from_its_last_epoch(
    ray_cluster, local_sweep, tmp_path, monkeypatch
):
    # dana N=2's task SIGKILLs its own process once epoch 1's files are shipped: Ray
    # retries it, the new attempt resumes from the shipped checkpoint (epoch 1 is not
    # redone: its record is the first attempt's), and the sweep ends equal to the local one.
    killed = "cnn-fashion-mnist/dana-n2-block-random-s0"
    first: list[dict[str, Any]] = []  # epoch 1's record as the driver first wrote it
    deliver = cluster._deliver

    def watch(ray: Any, mailbox: Any) -> dict[str, int]:
        attempts = deliver(ray, mailbox)
        path = tmp_path / killed / "result.json"
        if not first and path.exists():
            first.extend(json.loads(path.read_text())["epochs"][:1])
        return attempts

    monkeypatch.setattr(cluster, "_deliver", watch)
    options = ClusterOptions(None, cpus_per_run=1, kill_after={killed: 1})
    summary = run_sweep(spec(), tmp_path, cluster=options, progress=False, poll_seconds=0.1)
    assert summary.requeued == [tmp_path / killed]
    assert len(summary.finished) == 2 and not summary.failed
    assert "requeued (its Ray task died, it resumed)" in summary.lines()[-1]
    assert comparable(tmp_path) == comparable(local_sweep)
    assert same_models(tmp_path, local_sweep)
    epochs = json.loads((tmp_path / killed / "result.json").read_text())["epochs"]
    assert first == epochs[:1]  # the same record, timing included: epoch 1 was not redone


@pytest.mark.ray
def test_a_run_too_large_for_any_node_and_cuda_without_gpus_are_one_line(ray_cluster, tmp_path):
    with pytest.raises(DanaError, match=r"asks for 64 CPUs but the largest node .* has 4"):
        run_sweep(spec(), tmp_path, cluster=ClusterOptions(None, cpus_per_run=64))
    cuda = SweepSpec.from_values(**GRID, overrides={**TINY, "device": "cuda"})
    with pytest.raises(DanaError, match="needs --gpus-per-run > 0"):
        run_sweep(cuda, tmp_path, cluster=ClusterOptions(None))


class _NotConnected:
    """A stand-in for the ``ray`` module of a process not connected to Ray."""

    def is_initialized(self) -> bool:
        return False

    def init(self, **options: Any) -> None:
        time.sleep(30)  # as Ray's retries would


def test_an_unreachable_address_is_one_line_within_30_seconds(tmp_path):
    # Nothing listens on port 1: Ray itself would retry for minutes; the check before
    # ray.init answers at once (timed in-process: the CLI's own start-up, importing torch,
    # is not the check's and varies with the machine's load).
    start = time.monotonic()
    with pytest.raises(DanaError, match=r"cannot reach the Ray cluster at 127.0.0.1:1 \("):
        driver.connect(_NotConnected(), "127.0.0.1:1")
    assert time.monotonic() - start < 30
    with pytest.raises(DanaError, match="is not auto, HOST:PORT or ray://HOST:PORT"):
        driver.connect(_NotConnected(), "head-node")
    for command in ("sweep", "launch"):  # the commands say it in one line
        args = ["--preset", "cnn-fashion-mnist", "--address", "127.0.0.1:1"]
        args += ["--algorithms", "dana"] if command == "sweep" else []
        done = dana_cli(command, *args, "--out", str(tmp_path / command), timeout=300)
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("dana: error: cannot reach the Ray cluster at 127.0.0.1:1")
        assert "Traceback" not in done.stderr and len(lines) <= 2, done.stderr


def test_a_cluster_that_accepts_the_connection_but_never_answers_is_one_line(monkeypatch):
    # The TCP probe passes (e.g. a proxy on the port) and ray.init hangs: the deadline ends it.
    monkeypatch.setattr(driver, "_check_reachable", lambda address: None)
    monkeypatch.setattr(driver, "CONNECT_DEADLINE", 0.5)
    start = time.monotonic()
    with pytest.raises(DanaError, match=r"at 10.0.0.1:6379 did not answer within 0.5 s"):
        driver.connect(_NotConnected(), "10.0.0.1:6379")
    assert time.monotonic() - start < 5


def _kill_shard_when(launch: Any, shard: int, count: int, done: list[int]) -> None:
    """SIGKILL the process of ``shard`` once the coordinator has applied ``count`` updates
    (a thread; once per test: ``done`` records the gradients applied at the kill)."""
    ray = launch.ray
    pid = ray.get(launch.shards[shard].__ray_call__.remote(lambda _: os.getpid()))
    coordinator = launch.shards[0]
    while (applied := ray.get(coordinator.ping.remote())) < count:
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    done.append(applied)


@pytest.mark.ray
@pytest.mark.parametrize("shard", [0, 1])
def test_a_killed_shard_is_restarted_from_the_checkpoint_and_the_result_is_exact(
    ray_cluster, tmp_path, monkeypatch, capfd, shard
):
    # Shard `shard` of 2 (0: the coordinator, which holds the grants and the clock) is
    # SIGKILLed 4 updates into epoch 2 of a deterministic launch: the driver restarts the
    # whole server from epoch 1's checkpoint (the workers rejoin), redoes those updates and
    # ends exactly where the uninterrupted simulation does, with exactly the budget applied.
    from test_runtime import assert_same_history, assert_same_model, budget, simulate, small

    config = small(algorithm="dana-zero", workers=2, schedule="round-robin", train_samples=512)
    per_epoch = budget(config) // config.epochs
    killed: list[int] = []
    start = driver._Launch._start

    def start_and_kill(self: Any) -> None:
        start(self)
        if not killed:
            kill = (self, shard, per_epoch + 4, killed)
            threading.Thread(target=_kill_shard_when, args=kill, daemon=True).start()

    monkeypatch.setattr(driver._Launch, "_start", start_and_kill)
    monkeypatch.setattr(driver, "PROGRESS_SECONDS", 0.01)
    result = launch(config, tmp_path, servers=2, deterministic=True, progress=True)
    assert killed and per_epoch + 4 <= killed[0] < budget(config)
    assert result["server_restarts"] == 1 and result["worker_restarts"] == [0, 0]
    assert result["updates_per_worker"] == [budget(config) // 2] * 2
    assert sum(result["lag_histogram"].values()) == budget(config)
    expected, history = simulate(config)
    assert_same_model(tmp_path, expected)
    assert_same_history(result, history)
    err = capfd.readouterr().err
    assert "a parameter-server shard failed" in err
    assert "restarting the server from the checkpoint of epoch 1" in err
    # The progress bar moved within the epochs (not only at their ends), with the lag.
    shown = [int(n) for n in re.findall(rf"(\d+)/{budget(config)} \[", err)]
    assert any(n % per_epoch > 0 for n in shown) and "lag " in err


def test_the_mailbox_resumes_an_attempt_from_the_last_files_and_ignores_stale_ones():
    # Without Ray: the actor's class. Attempt 2 gets what attempt 1 shipped last; a late
    # shipment from attempt 1 is refused; the final shipment deletes the checkpoint and
    # frees the run's files; the driver takes every accepted shipment once, in order.
    box = cluster.Mailbox({"r": {"result.json": b"0"}})
    assert box.start("r") == (1, {"result.json": b"0"})
    assert box.put("r", 1, [("checkpoint.pt", b"c1"), ("result.json", b"1")])
    assert box.start("r") == (2, {"result.json": b"1", "checkpoint.pt": b"c1"})
    assert not box.put("r", 1, [("result.json", b"stale")])
    assert box.put("r", 2, [("model.pt", b"m"), ("checkpoint.pt", None)], final=True)
    shipped, attempts = box.take()
    assert [files for _, files in shipped] == [
        [("checkpoint.pt", b"c1"), ("result.json", b"1")],
        [("model.pt", b"m"), ("checkpoint.pt", None)],
    ]
    assert attempts == {"r": 2} and box.latest == {} and box.take()[0] == []


def test_a_killed_task_s_run_folder_is_removed_by_the_next_task(tmp_path):
    # A SIGKILLed task cannot clean up its temporary run folder; the next task on the node
    # deletes the folders whose process is gone, and only those.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"{cluster.RUN_FOLDER_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{cluster.RUN_FOLDER_PREFIX}{os.getpid()}-def"
    other = tmp_path / "dana-run-notapid-x"
    for folder in (orphan, live, other):
        folder.mkdir()
        (folder / "checkpoint.pt").write_bytes(b"x" * 10)
    assert cluster.remove_orphaned_run_folders(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and other.exists()
