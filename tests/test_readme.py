"""The README's examples of the open API run as written, and their loss goes down."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SECTION = README[README.index("## Your own model, data and loss") : README.index("## Python API")]
EXAMPLES = re.findall(r"```python\n(.*?)```", SECTION, flags=re.S)


def test_the_section_has_the_four_examples_each_short():
    assert len(EXAMPLES) == 4
    # Each under 20 lines of code (blank lines do not count).
    assert all(len([line for line in code.splitlines() if line.strip()]) < 20 for code in EXAMPLES)


@pytest.mark.parametrize("index", range(3), ids=["regression", "gru-copy", "classification"])
def test_a_task_example_trains_with_four_workers_and_its_loss_goes_down(index, capsys):
    code = EXAMPLES[index]
    assert "workers=4" in code
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, f"README example {index}", "exec"), scope)
    result = scope["result"]
    losses = [record["train_loss"] for record in result.history]
    assert not result.diverged and losses[-1] < 0.8 * losses[0], losses
    assert capsys.readouterr().out.strip()  # it prints its figure


def test_the_training_loop_example_runs_the_simulated_workers():
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(EXAMPLES[3], "README loop example", "exec"), scope)
    workers, model, X, Y = scope["workers"], scope["model"], scope["X"], scope["Y"]
    assert workers.workers == 8 and workers.gradients == 3 * len(scope["loader"])
    with torch.no_grad():
        error = (model(X).argmax(1) != Y).float().mean().item()
    assert error < 0.1  # the model holds the master's (trained) parameters
