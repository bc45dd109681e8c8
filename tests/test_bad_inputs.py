"""Every bad input of the adversarial trial (issue 13), table-driven, through the CLI.

Each row prepares a folder (or a file), runs one ``dana`` command and expects exactly one
line on stderr, ``dana: error: ...`` naming what to do, exit status 2 and no traceback.
A full disk is a real 1 MiB tmpfs where this process may mount one (root), else the
write is made to fail with ``ENOSPC`` (``dana run``) or ``EFBIG`` through a file-size
limit (``dana sweep``, whose runs are other processes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dana.cli import main
from dana.options import config_from_options
from dana.training import run_experiment
from dana.training.run import CHECKPOINT, RESULT

#: A run of two epochs of 4 batches on 2 simulated workers: well under a second.
TINY = ["--train-samples", "256", "--test-samples", "200", "--batch-size", "64", "--epochs", "2"]
TINY_FIELDS = dict(train_samples=256, test_samples=200, batch_size=64, epochs=2)


def tiny_config(**changes):
    fields = {"algorithm": "dana", "workers": 2, "seed": 0, **TINY_FIELDS, **changes}
    return config_from_options("cnn-fashion-mnist", **fields)[0]


def run_args(out: Path, *extra: str) -> list[str]:
    return ["run", *TINY, "-n", "2", "--threads", "1", "--no-progress", "--out", str(out), *extra]


class Stop(Exception):
    pass


def _stop(record):
    raise Stop


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A finished run and an interrupted one (checkpoint of epoch 1 of 2) of ``tiny_config``,
    and an interrupted run of another config (4 workers)."""
    root = tmp_path_factory.mktemp("folders")
    torch.set_num_threads(1)
    run_experiment(tiny_config(), root / "finished", progress=False, log=False)
    for name, config in (("partial", tiny_config()), ("foreign", tiny_config(workers=4))):
        with contextlib.suppress(Stop):
            run_experiment(config, root / name, progress=False, log=False, on_epoch=_stop)
    return {p.name: p for p in root.iterdir()}


def copy(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@contextlib.contextmanager
def tiny_disk(path: Path) -> Iterator[bool]:
    """A 1 MiB tmpfs at ``path``; yields whether it is mounted (root only)."""
    path.mkdir(parents=True)
    mounted = False
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)])
        mounted = done.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


# -- the rows: each returns the command's arguments ---------------------------------------


def seed_minus_one(tmp, folders, mp):
    return run_args(tmp / "out", "--seed", "-1")


def seed_too_big(tmp, folders, mp):
    return run_args(tmp / "out", "--seed", "1180591620717411303424")


def lr_1e39(tmp, folders, mp):
    return run_args(tmp / "out", "--lr", "1e39")


def lr_1e308(tmp, folders, mp):
    return run_args(tmp / "out", "--lr", "1e308")


def out_empty(tmp, folders, mp):
    mp.chdir(tmp)
    return [*run_args(tmp / "x")[:-2], "--out", ""]


def threads_huge(tmp, folders, mp):
    return run_args(tmp / "out", "--threads", "100000")


def epochs_huge(tmp, folders, mp):
    return [*run_args(tmp / "out"), "--epochs", "1000000000"]


def workers_huge(tmp, folders, mp):
    return [*run_args(tmp / "out"), "-n", "1000000"]  # ~300 GiB


def _result(tmp, folders, edit: Callable[[dict], object]) -> Path:
    out = copy(folders["finished"], tmp / "out")
    data = json.loads((out / RESULT).read_text())
    (out / RESULT).write_text(json.dumps(edit(data)))
    return out


def result_random_bytes(tmp, folders, mp):
    out = copy(folders["finished"], tmp / "out")
    (out / RESULT).write_bytes(random.Random(0).randbytes(300))
    return run_args(out)


def result_empty_list(tmp, folders, mp):
    return run_args(_result(tmp, folders, lambda d: []))


def result_finished_only(tmp, folders, mp):
    return run_args(_result(tmp, folders, lambda d: {"finished": True}))


def result_no_epochs(tmp, folders, mp):
    return run_args(_result(tmp, folders, lambda d: {**d, "epochs": []}))


def result_bad_final_error(tmp, folders, mp):
    # One digit changed: the final error no longer is the last epoch's.
    return run_args(_result(tmp, folders, lambda d: {**d, "final_test_error": 3.25}))


def _checkpoint(tmp, folders, payload) -> Path:
    out = copy(folders["partial"], tmp / "out")
    torch.save(payload, out / CHECKPOINT)
    return out


def checkpoint_empty_trainer(tmp, folders, mp):
    return run_args(_checkpoint(tmp, folders, {"trainer": {}}))


def checkpoint_list(tmp, folders, mp):
    return run_args(_checkpoint(tmp, folders, [1, 2, 3]))


def checkpoint_foreign_patched(tmp, folders, mp):
    out = copy(folders["partial"], tmp / "out")
    (out / CHECKPOINT).write_bytes((folders["foreign"] / CHECKPOINT).read_bytes())
    # The trial's forgery: another run's checkpoint, its config patched to match.
    from dana.training.io import load_checkpoint

    state = load_checkpoint(out / CHECKPOINT)
    state["config"] = tiny_config().to_dict()
    torch.save(state, out / CHECKPOINT)
    return run_args(out)


def checkpoint_foreign_redigested(tmp, folders, mp):
    # The same forgery, its digest recomputed: the tensors' shapes (N = 4) give it away.
    from dana.training.io import load_checkpoint, save_checkpoint

    out = copy(folders["partial"], tmp / "out")
    state = load_checkpoint(folders["foreign"] / CHECKPOINT)
    state["config"] = tiny_config().to_dict()
    save_checkpoint(out / CHECKPOINT, state)
    return run_args(out)


def checkpoint_flipped_byte(tmp, folders, mp):
    out = copy(folders["partial"], tmp / "out")
    data = bytearray((out / CHECKPOINT).read_bytes())
    data[int(len(data) * 0.9)] ^= 0x01
    (out / CHECKPOINT).write_bytes(bytes(data))
    return run_args(out)


def checkpoint_truncated(tmp, folders, mp):
    out = copy(folders["partial"], tmp / "out")
    data = (out / CHECKPOINT).read_bytes()
    (out / CHECKPOINT).write_bytes(data[: len(data) // 2])
    return run_args(out)


def full_disk_run(tmp, folders, mp):
    disk = tmp / "disk"
    mounted = mp.enter(tiny_disk(disk))
    if not mounted:  # the same failure, raised where the bytes are written
        import dana.training.io as io

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        mp.setattr(io.os, "fsync", full)
    return run_args(disk / "out", "-n", "16")


def _ray_result(tmp, folders) -> Path:
    def as_launch(d):
        return {**d, "runtime": "ray", "servers": 1, "deterministic": False}

    return _result(tmp, folders, as_launch)


def run_into_a_launch_folder(tmp, folders, mp):
    return run_args(_ray_result(tmp, folders))


def launch_into_a_run_folder(tmp, folders, mp):
    out = copy(folders["finished"], tmp / "out")
    return ["launch", *TINY, "-n", "2", "--quiet", "--out", str(out)]


def launch_out_empty(tmp, folders, mp):
    mp.chdir(tmp)
    return ["launch", *TINY, "-n", "2", "--quiet", "--out", ""]


def _sweep_file(tmp, text: bytes) -> list[str]:
    path = tmp / "sweep.toml"
    path.write_bytes(text)
    return ["sweep", str(path), "--out", str(tmp / "runs"), "--no-progress"]


def sweep_nested_list(tmp, folders, mp):
    return _sweep_file(tmp, b'preset = "cnn-fashion-mnist"\nalgorithms = [["dana"]]\n')


def sweep_not_utf8(tmp, folders, mp):
    return _sweep_file(tmp, b'preset = "cnn-\xff\xfe"\nalgorithms = ["dana"]\n')


def sweep_seed_minus_one(tmp, folders, mp):
    args = ["sweep", "--preset", "cnn-fashion-mnist", "--algorithms", "dana", "--seeds", "-1"]
    return [*args, "--out", str(tmp / "runs")]


def sweep_out_empty(tmp, folders, mp):
    mp.chdir(tmp)
    return ["sweep", "--preset", "cnn-fashion-mnist", "--algorithms", "dana", "--out", ""]


ROWS: list[tuple[Callable, list[str]]] = [
    (seed_minus_one, ["seed must be", "2**63"]),
    (seed_too_big, ["seed must be"]),
    (lr_1e39, ["lr must be"]),
    (lr_1e308, ["lr must be"]),
    (out_empty, ["--out", "empty"]),
    (threads_huge, ["--threads"]),
    (epochs_huge, ["epochs must be"]),
    (workers_huge, ["memory", "fewer workers"]),
    (result_random_bytes, ["result.json", "delete"]),
    (result_empty_list, ["result.json", "delete"]),
    (result_finished_only, ["result.json", "delete"]),
    (result_no_epochs, ["result.json", "delete"]),
    (result_bad_final_error, ["result.json", "delete"]),
    (checkpoint_empty_trainer, ["checkpoint.pt", "delete"]),
    (checkpoint_list, ["checkpoint.pt", "delete"]),
    (checkpoint_foreign_patched, ["checkpoint.pt", "delete"]),
    (checkpoint_foreign_redigested, ["checkpoint.pt", "delete"]),
    (checkpoint_flipped_byte, ["checkpoint.pt", "delete"]),
    (checkpoint_truncated, ["checkpoint.pt", "delete"]),
    (full_disk_run, ["No space left", "free space"]),
    (run_into_a_launch_folder, ["dana launch", "another --out"]),
    (launch_into_a_run_folder, ["dana run", "another --out"]),
    (launch_out_empty, ["--out", "empty"]),
    (sweep_nested_list, ["algorithms"]),
    (sweep_not_utf8, ["sweep.toml", "UTF-8"]),
    (sweep_seed_minus_one, ["seed must be"]),
    (sweep_out_empty, ["--out", "empty"]),
]


class _Patches:
    """``monkeypatch`` plus context managers entered for the row's lifetime."""

    def __init__(self, monkeypatch, stack: contextlib.ExitStack) -> None:
        self._mp, self._stack = monkeypatch, stack

    def __getattr__(self, name):
        return getattr(self._mp, name)

    def enter(self, manager):
        return self._stack.enter_context(manager)


def assert_one_line_error(result, fragments) -> None:
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dana: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(("row", "fragments"), ROWS, ids=[row.__name__ for row, _ in ROWS])
def test_a_bad_input_is_one_line_that_says_what_to_do(
    row, fragments, folders, tmp_path, monkeypatch
):
    with contextlib.ExitStack() as stack:
        args = row(tmp_path, folders, _Patches(monkeypatch, stack))
        result = CliRunner().invoke(main, args)
        assert_one_line_error(result, fragments)


def test_a_checkpoint_refused_keeps_the_folder_as_it_was(folders, tmp_path):
    # The refusal happens before anything is written: the user's evidence stays.
    out = copy(folders["partial"], tmp_path / "out")
    data = bytearray((out / CHECKPOINT).read_bytes())
    data[int(len(data) * 0.9)] ^= 0x01
    (out / CHECKPOINT).write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    CliRunner().invoke(main, run_args(out))
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before


def test_a_full_disk_inside_a_sweep_is_one_line(tmp_path):
    # The runs are pool processes: the disk is a real tmpfs, else a file-size limit makes
    # every write over 64 KiB fail (EFBIG) in them, as a full disk does.
    with tiny_disk(tmp_path / "disk") as mounted:
        out = tmp_path / "disk" / "runs"
        limit = None if mounted else 64 * 1024

        def preexec():
            if limit is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        args = ["sweep", "--preset", "cnn-fashion-mnist", "--algorithms", "dana"]
        args += ["--workers", "16", "--train-samples", "256", "--test-samples", "200"]
        args += ["--epochs", "2", "--threads", "1", "--no-progress", "--out", str(out)]
        done = subprocess.run(
            [sys.executable, "-m", "dana.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=preexec,
        )
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[-1].startswith("dana: error: ") and "failed" in lines[-1], lines
    assert "space" in lines[-1] or "too large" in lines[-1], lines[-1]
    assert "RuntimeError" not in lines[-1] and "enforce fail" not in lines[-1]
