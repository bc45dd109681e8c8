"""The command line: one-line errors for every user mistake, and a real `dana run`."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from dana.cli import main
from dana.data import resolve_data_dir
from dana.training import PRESETS

FAST = ["--train-samples", "256", "--test-samples", "200", "--epochs", "1", "--batch-size", "64"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dana: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["-a", "adam"], ["unknown algorithm 'adam'", "dana"]),
        (["--schedule", "fifo"], ["unknown schedule 'fifo'", "block-random"]),
        (["--preset", "resnet1000"], ["unknown preset 'resnet1000'", "cnn-fashion-mnist"]),
        (["--model", "vgg"], ["unknown model", "vgg"]),
        (["--workers", "0"], ["workers must be"]),
        (["--lr", "0"], ["lr must be"]),
        (["--lr", "-0.1"], ["lr must be"]),
        (["--momentum", "1.0"], ["momentum must be in [0, 1)"]),
        (["--momentum", "-0.5"], ["momentum must be in [0, 1)"]),
        (["-a", "baseline", "-n", "4"], ["--workers 1"]),
        (["--device", "cuda:7"], ["CUDA is not available"]),
        (["--threads", "0"], ["--threads"]),
        (["--model", "lenet-300-100-bn", "--batch-size", "1"], ["BatchNorm", "at least 2"]),
        (["--gap-every", "0"], ["gap_every must be an integer >= 1"]),
    ],
)
def test_bad_values_are_one_line_errors(args, fragments, tmp_path):
    result = invoke("run", *FAST, "--out", str(tmp_path / "out"), *args)
    assert_one_line_error(result, *fragments)


def test_launch_and_sweep_refuse_a_bad_thread_count_or_gap_every_in_one_line(tmp_path):
    launch = invoke("launch", "--threads", "0", "--out", str(tmp_path / "launch"))
    assert_one_line_error(launch, "--threads must be >= 1")
    sweep = invoke(
        "sweep",
        "--preset",
        "cnn-fashion-mnist",
        "--algorithms",
        "dana",
        "--workers",
        "2",
        "--gap-every",
        "-1",
        "--out",
        str(tmp_path / "s"),
    )
    assert_one_line_error(sweep, "gap_every must be an integer >= 1")


def test_missing_dataset_says_where_and_what_to_do(tmp_path):
    result = invoke(
        "run", *FAST, "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")
    )
    assert_one_line_error(result, "not found", "--data-dir", "--download")


def test_checksum_mismatch(tmp_path):
    source = resolve_data_dir(None) / "fashion-mnist"
    copy = tmp_path / "data" / "fashion-mnist"
    shutil.copytree(source, copy)
    path = copy / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    result = invoke(
        "run", *FAST, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")
    )
    assert_one_line_error(result, "checksum")


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("run", *FAST, "--out", str(blocker / "sub"))
    assert_one_line_error(result, "cannot write", "--out")


def test_run_writes_a_result_and_a_second_run_skips(tmp_path):
    out = tmp_path / "out"
    first = invoke("run", *FAST, "-a", "dana", "-n", "4", "--schedule", "gamma", "--out", str(out))
    assert first.exit_code == 0, first.output
    assert "final test error" in first.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and result["config"]["workers"] == 4
    assert result["config"]["schedule"] == "gamma"
    stamp = (out / "result.json").stat().st_mtime_ns
    second = invoke("run", *FAST, "-a", "dana", "-n", "4", "--schedule", "gamma", "--out", str(out))
    assert second.exit_code == 0 and second.stdout == first.stdout
    assert (out / "result.json").stat().st_mtime_ns == stamp  # skipped, not re-run
    assert oct((out / "result.json").stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's
    # Another config in the same folder is refused, not silently overwritten.
    third = invoke("run", *FAST, "-a", "dana", "-n", "4", "--seed", "5", "--out", str(out))
    assert_one_line_error(third, "another config")


def test_diverged_run_exits_zero(tmp_path):
    # Enough steps for a wild learning rate to overflow to inf/NaN (the definition).
    many = [*FAST, "--train-samples", "2048", "--epochs", "2"]
    result = invoke(
        "run", *many, "-a", "nag-asgd", "-n", "8", "--lr", "1e12", "--out", str(tmp_path / "out")
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("DIVERGED")
    assert json.loads((tmp_path / "out" / "result.json").read_text())["diverged"] is True


def test_presets_and_help_list_the_choices():
    lines = invoke("presets").stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    # The descriptions start in one column, however long the names.
    assert len({line.index(" on ") - len(line.split()[1]) for line in lines}) == 1
    assert (
        "lenet-300-100-bn on fashion-mnist (all training images): 20 epochs, lr 0.1" in (lines[-2])
    )
    help_text = invoke("run", "--help").stdout
    for word in (
        "--algorithm",
        "--workers",
        "--schedule",
        "--epochs",
        "--seed",
        "--data-dir",
        "--out",
        "--train-samples",
        "--download",
    ):
        assert word in help_text


def test_run_sets_warm_up_milestones_decay_and_augmentation(tmp_path):
    # Before: dana run could not set them; a preset's values stood.
    out = tmp_path / "out"
    extra = [
        "--warmup-epochs",
        "0.25",
        "--milestones",
        "1",
        "--decay",
        "3",
        "--augment",
        "crop-flip",
    ]
    result = invoke("run", *FAST, "--epochs", "2", *extra, "--out", str(out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "result.json").read_text())["config"]
    assert (config["warmup_epochs"], config["milestones"], config["decay"]) == (0.25, [1], 3.0)
    assert config["augment"] == "crop-flip"
    assert (out / "model.pt").exists() and (out / "metrics.csv").exists()
    none = invoke("run", *FAST, "--milestones", "none", "--out", str(tmp_path / "none"))
    assert none.exit_code == 0, none.output
    assert json.loads((tmp_path / "none" / "result.json").read_text())["config"]["milestones"] == []
    bad = invoke("run", *FAST, "--milestones", "ten", "--out", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "80,120" in bad.output


def test_run_with_a_task_module(tmp_path, monkeypatch):
    (tmp_path / "clitask.py").write_text(
        "import torch\nimport dana\n"
        "def make():\n"
        "    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))\n"
        "    y = x.sum(1, keepdim=True)\n"
        "    return dana.Task('cli-reg', lambda: torch.nn.Linear(4, 1), (x[:192], y[:192]),\n"
        "        lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),\n"
        "        eval_data=(x[192:], y[192:]), defaults={'epochs': 2, 'batch_size': 32})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    result = invoke("run", "--task", "clitask:make", "-n", "2", "--lr", "0.05", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("finished: dana N=2 final loss ")
    saved = json.loads((out / "result.json").read_text())
    assert saved["config"]["task"] == "clitask:make" and saved["config"]["epochs"] == 2
    assert_one_line_error(
        invoke("run", "--task", "clitask:make", "--preset", "cnn-fashion-mnist"), "not both"
    )
    assert_one_line_error(invoke("run", "--task", "clitask:make", "--model", "cnn"), "--model")
    assert_one_line_error(invoke("run", "--task", "nowhere:make"), "cannot import")
