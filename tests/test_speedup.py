"""The theoretical speedup model of paper Figure 5: exact, Monte Carlo, event simulation."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import matplotlib.image
import pytest
from click.testing import CliRunner

from dana.errors import DanaError
from dana.experiments import (
    expected_max_gamma,
    gamma_parameters,
    monte_carlo_max_gamma,
    plot_speedup,
    simulate_speedup,
    speedup_table,
)
from dana.experiments.commands import speedup_command


def expected_max_of_two(shape: float, scale: float) -> float:
    """E[max(X₁, X₂)] for i.i.d. Gamma(shape, scale), in closed form.

    max = (X₁ + X₂ + |X₁ − X₂|) / 2 and the Gamma's mean difference is
    E|X₁ − X₂| = 2·scale·Γ(shape + ½) / (√π·Γ(shape)).
    """
    half_difference = scale * math.exp(math.lgamma(shape + 0.5) - math.lgamma(shape))
    return shape * scale + half_difference / math.sqrt(math.pi)


def test_gamma_parameters_of_the_paper() -> None:
    shape, scale = gamma_parameters(128, 0.1)
    assert shape == pytest.approx(100.0) and scale == pytest.approx(1.28)


def test_one_worker_has_no_synchronisation_cost() -> None:
    assert expected_max_gamma(1) == 128.0
    [row] = speedup_table([1])
    assert row == {"workers": 1, "async_speedup": 1.0, "sync_speedup": 1.0, "ratio": 1.0}


@pytest.mark.parametrize(("batch_size", "variation"), [(128, 0.1), (128, 0.3), (10, 1.0)])
def test_two_workers_match_the_closed_form(batch_size: float, variation: float) -> None:
    shape, scale = gamma_parameters(batch_size, variation)
    exact = expected_max_gamma(2, batch_size=batch_size, variation=variation)
    assert exact == pytest.approx(expected_max_of_two(shape, scale), rel=1e-10)


@pytest.mark.parametrize("n", [2, 3, 7, 64])
def test_exponential_batch_times_give_harmonic_numbers(n: int) -> None:
    # V = 1 makes T exponential with mean B, and E[max of n] = B·(1 + 1/2 + … + 1/n).
    harmonic = sum(1.0 / k for k in range(1, n + 1))
    assert expected_max_gamma(n, batch_size=3.0, variation=1.0) == pytest.approx(
        3.0 * harmonic, rel=1e-10
    )


def test_ratios_reported_by_the_paper() -> None:
    rows = {row["workers"]: row for row in speedup_table([8, 16, 32])}
    assert rows[8]["ratio"] == pytest.approx(1.15, abs=0.005)
    assert rows[16]["ratio"] == pytest.approx(1.18, abs=0.006)
    assert rows[32]["ratio"] == pytest.approx(1.22, abs=0.005)
    for n, row in rows.items():
        assert row["async_speedup"] == n
        assert row["sync_speedup"] * row["ratio"] == pytest.approx(n)


def test_ratio_grows_with_workers_and_with_variation() -> None:
    ratios = [row["ratio"] for row in speedup_table([1, 2, 4, 8, 16, 32, 64])]
    assert all(b > a for a, b in itertools.pairwise(ratios))
    calm, noisy = (speedup_table([16], variation=v)[0]["ratio"] for v in (0.05, 0.2))
    assert 1 < calm < ratios[4] < noisy


@pytest.mark.parametrize("n", [2, 8, 32])
def test_monte_carlo_agrees_with_the_integral(n: int) -> None:
    estimate = monte_carlo_max_gamma(n, samples=40_000, seed=n)
    assert 0 < estimate.stderr < 0.1
    assert abs(estimate.mean - expected_max_gamma(n)) < 4 * estimate.stderr


def test_monte_carlo_table_reports_standard_errors() -> None:
    exact = speedup_table([4, 16])
    sampled = speedup_table([4, 16], method="monte-carlo", samples=20_000, seed=3)
    for e, s in zip(exact, sampled, strict=True):
        assert abs(s["ratio"] - e["ratio"]) < 4 * s["ratio_stderr"]
        assert abs(s["sync_speedup"] - e["sync_speedup"]) < 4 * s["sync_speedup_stderr"]
    again = speedup_table([4, 16], method="monte-carlo", samples=20_000, seed=3)
    assert again == sampled  # seeded


@pytest.mark.parametrize("n", [1, 4, 16])
def test_event_simulation_agrees_with_the_formulas(n: int) -> None:
    simulated = simulate_speedup(n, rounds=3_000, seed=11)
    [row] = speedup_table([n])
    assert simulated.sync_batches == 3_000 * n
    assert simulated.async_speedup == pytest.approx(n, rel=0.01)
    assert simulated.sync_speedup == pytest.approx(row["sync_speedup"], rel=0.005)
    assert simulated.ratio == pytest.approx(row["ratio"], rel=0.01)


def test_event_simulation_with_stragglers() -> None:
    # Highly variable batch times (V = 0.5): SSGD with 8 workers loses far more.
    simulated = simulate_speedup(8, rounds=4_000, seed=2, variation=0.5)
    [row] = speedup_table([8], variation=0.5)
    assert row["ratio"] > 1.7
    assert simulated.ratio == pytest.approx(row["ratio"], rel=0.02)
    assert simulated.async_speedup == pytest.approx(8, rel=0.02)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: expected_max_gamma(0), "workers must be an integer >= 1"),
        (lambda: expected_max_gamma(2.5), "workers must be an integer"),
        (lambda: expected_max_gamma(4, variation=0), "variation must be a positive"),
        (lambda: expected_max_gamma(4, batch_size=-1), "batch size must be a positive"),
        (lambda: monte_carlo_max_gamma(4, samples=1), "samples must be an integer >= 2"),
        (lambda: speedup_table([]), "at least one worker count"),
        (lambda: speedup_table([4], method="guess"), "method must be one of"),
    ],
)
def test_bad_values_are_user_errors(call, message: str) -> None:
    with pytest.raises(DanaError, match=message):
        call()


def test_plot_writes_readable_png_and_svg(tmp_path: Path) -> None:
    paths = plot_speedup(speedup_table([1, 2, 4, 8, 16, 32]), tmp_path / "fig" / "speedup.png")
    assert [path.name for path in paths] == ["speedup.png", "speedup.svg"]
    height, width, _ = matplotlib.image.imread(paths[0]).shape
    assert width > 1000 and 400 < height < width
    assert "workers N" in paths[1].read_text()


def test_json_command_prints_only_the_rows() -> None:
    outcome = CliRunner().invoke(speedup_command, ["--workers", "1,8,16,32", "--json"])
    assert outcome.exit_code == 0, outcome.output
    rows = json.loads(outcome.stdout)
    assert [row["workers"] for row in rows] == [1, 8, 16, 32]
    assert set(rows[0]) == {"workers", "async_speedup", "sync_speedup", "ratio"}
    assert [round(row["ratio"], 2) for row in rows] == [1.0, 1.15, 1.18, 1.22]


def test_command_writes_figure_and_table(tmp_path: Path) -> None:
    arguments = ["--workers", "4,2", "--method", "monte-carlo", "--samples", "2000"]
    outcome = CliRunner().invoke(speedup_command, [*arguments, "--out", str(tmp_path)])
    assert outcome.exit_code == 0, outcome.output
    assert {path.name for path in tmp_path.iterdir()} == {
        "speedup.png",
        "speedup.svg",
        "speedup.md",
    }
    table = (tmp_path / "speedup.md").read_text()
    assert "| 2 | 2 |" in table and "| 4 | 4 |" in table and "standard errors" in table
    assert f"wrote {tmp_path / 'speedup.png'}" in outcome.stdout


@pytest.mark.parametrize("workers", ["0,2", "1,,2", "two", "-4"])
def test_command_rejects_bad_worker_lists(workers: str) -> None:
    outcome = CliRunner().invoke(speedup_command, ["--workers", workers])
    assert isinstance(outcome.exception, DanaError)
    assert "--workers" in str(outcome.exception)
