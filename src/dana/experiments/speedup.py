"""Theoretical speedup of asynchronous over synchronous training (paper Figure 5).

Batch execution times ``T`` are i.i.d. Gamma(shape = 1/V², scale = B·V²): mean ``B`` and
coefficient of variation ``V`` (V = 0.1, B = 128 gives Γ(100, 1.28)). Overheads are not
modelled, exactly as in the paper.

- Asynchronous training (DANA or any ASGD variant): every worker is always busy, so N
  workers complete N/E[T] batches per unit time, N times one worker: speedup ``N``.
- Synchronous training (SSGD): every round waits for the slowest of N batches, so N
  batches take E[max of N draws of T]: speedup ``N·E[T] / E[max_N]``.
- The asynchronous advantage is the ratio of the two, ``E[max_N] / E[T]``.

``E[max_N]`` is computed exactly (quadrature error below 1e-9 relative) from
``E[max_N] = ∫₀^∞ (1 − F(t)^N) dt``, ``F`` the regularized lower incomplete gamma
function; or estimated by Monte Carlo sampling, or by an event simulation of the workers.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from dana.errors import DanaError
from dana.experiments.report import new_figure, save_figure

Method = Literal["exact", "monte-carlo"]
METHODS: tuple[str, ...] = ("exact", "monte-carlo")

# Simpson intervals on [0, t_max]; even. The integrand is smooth for V ≤ 1, so the
# quadrature error is far below float64 noise of the result at this resolution.
_SIMPSON_INTERVALS = 1 << 16
# Stop extending the integration range once N·P(T > t_max) is below this.
_TAIL_TOLERANCE = 1e-17
# Largest number of gamma draws held in memory at once by the Monte Carlo estimator.
_CHUNK_DRAWS = 1 << 22


class MonteCarloEstimate(NamedTuple):
    """A sample mean and its standard error."""

    mean: float
    stderr: float


@dataclass(frozen=True)
class SimulatedSpeedup:
    """Outcome of :func:`simulate_speedup` (speedups relative to one worker, mean time B).

    ``sync_time`` is the simulated time of ``rounds`` synchronous rounds; the asynchronous
    workers run for the same simulated time and complete ``async_batches`` batches.
    """

    workers: int
    rounds: int
    sync_time: float
    sync_batches: int
    async_batches: int
    async_speedup: float
    sync_speedup: float
    ratio: float


def _check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DanaError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive_float(name: str, value: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DanaError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise DanaError(f"{name} must be a positive finite number, got {value!r}")
    return number


def gamma_parameters(batch_size: float, variation: float) -> tuple[float, float]:
    """Return ``(shape, scale)`` of the batch-time Gamma: mean ``batch_size``, CV ``variation``.

    ``(1/V², B·V²)``; for B = 128 and V = 0.1 this is (100, 1.28) up to float rounding.
    """
    batch_size = _check_positive_float("batch size", batch_size)
    variation = _check_positive_float("variation", variation)
    return 1.0 / variation**2, batch_size * variation**2


def _log_cdf(shape: float, x: torch.Tensor) -> torch.Tensor:
    """``log F(x)`` for a unit-scale Gamma(shape), accurate in both tails."""
    a = torch.full_like(x, shape)
    upper = torch.special.gammaincc(a, x)
    # log1p(−Q) keeps precision where F ≈ 1; log(P) where F is small.
    return torch.where(upper < 0.5, torch.log1p(-upper), torch.log(torch.special.gammainc(a, x)))


def _upper_tail(shape: float, x: float) -> float:
    """``P(X > x)`` for a unit-scale Gamma(shape)."""
    as_tensor = partial(torch.tensor, dtype=torch.float64)
    return torch.special.gammaincc(as_tensor(shape), as_tensor(x)).item()


def expected_max_gamma(n: int, *, batch_size: float = 128, variation: float = 0.1) -> float:
    """E[max of ``n`` i.i.d. batch times], by numerical integration.

    Uses ``E[max_n] = E[T] + ∫₀^∞ (F(t) − F(t)^n) dt`` (the difference of
    ``∫ (1 − F^n)`` and ``E[T] = ∫ (1 − F)``) with ``E[T] = B`` exactly and ``F`` the
    Gamma(1/V², B·V²) distribution function (``torch.special.gammainc``, float64).
    Integrating only the excess over the mean makes N = 1 exact (the integrand is 0)
    and keeps the quadrature error far below 1e-9 relative (for V ≤ 1). The range is cut where
    ``n·P(T > t) < 1e-17``; composite Simpson on 2¹⁶ intervals; ``1 − F^(n−1)`` is formed
    as ``−expm1((n−1)·log F)`` so that the upper tail keeps full relative precision.
    """
    n = _check_positive_int("workers", n)
    shape, scale = gamma_parameters(batch_size, variation)
    # Work in units of the scale: T = scale·X with X ~ Gamma(shape, 1).
    std = math.sqrt(shape)
    x_max = shape + 10.0 * std
    while n * _upper_tail(shape, x_max) > _TAIL_TOLERANCE:
        x_max += 5.0 * std
    x = torch.linspace(0.0, x_max, _SIMPSON_INTERVALS + 1, dtype=torch.float64)
    log_cdf = _log_cdf(shape, x)
    # F(0) = 0 gives log F = −inf; a finite floor avoids 0·(−inf) = NaN when n = 1.
    log_cdf = log_cdf.clamp(min=-1e300)
    integrand = torch.exp(log_cdf) * -torch.expm1((n - 1) * log_cdf)
    weights = torch.ones_like(x)
    weights[1:-1:2] = 4.0
    weights[2:-1:2] = 2.0
    step = x_max / _SIMPSON_INTERVALS
    excess = (weights * integrand).sum().item() * step / 3.0
    return float(batch_size + excess * scale)


def monte_carlo_max_gamma(
    n: int,
    *,
    samples: int = 100_000,
    seed: int = 0,
    batch_size: float = 128,
    variation: float = 0.1,
) -> MonteCarloEstimate:
    """E[max of ``n`` i.i.d. batch times] from ``samples`` sampled rounds.

    Draws with ``numpy.random.Generator(PCG64(seed)).gamma`` in chunks (bounded memory);
    returns the sample mean of the per-round maxima and its standard error.
    """
    n = _check_positive_int("workers", n)
    samples = _check_positive_int("samples", samples, minimum=2)
    shape, scale = gamma_parameters(batch_size, variation)
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _CHUNK_DRAWS // n)
    maxima = np.empty(samples)
    for start in range(0, samples, rows_per_chunk):
        stop = min(samples, start + rows_per_chunk)
        maxima[start:stop] = rng.gamma(shape, scale, size=(stop - start, n)).max(axis=1)
    return MonteCarloEstimate(float(maxima.mean()), float(maxima.std(ddof=1) / math.sqrt(samples)))


def speedup_table(
    workers: Sequence[int],
    *,
    batch_size: float = 128,
    variation: float = 0.1,
    samples: int = 100_000,
    seed: int = 0,
    method: Method = "exact",
) -> list[dict[str, float | int]]:
    """Theoretical async and sync speedups for each worker count (paper Figure 5).

    Each row is ``{"workers", "async_speedup", "sync_speedup", "ratio"}`` with
    ``async_speedup = N``, ``sync_speedup = N·B / E[max_N]`` and ``ratio = E[max_N] / B``
    (the mean batch time ``B`` is known exactly). With ``method="monte-carlo"`` the rows
    also hold ``sync_speedup_stderr`` and ``ratio_stderr`` (delta method); ``samples`` and
    ``seed`` are used only by that method.
    """
    if method not in METHODS:
        raise DanaError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if len(workers) == 0:
        raise DanaError("give at least one worker count")
    counts = [_check_positive_int("workers", n) for n in workers]
    mean = _check_positive_float("batch size", batch_size)
    rows: list[dict[str, float | int]] = []
    for n in counts:
        if method == "exact":
            expected_max = expected_max_gamma(n, batch_size=batch_size, variation=variation)
            stderr = None
        else:
            expected_max, stderr = monte_carlo_max_gamma(
                n, samples=samples, seed=seed, batch_size=batch_size, variation=variation
            )
        row: dict[str, float | int] = {
            "workers": n,
            "async_speedup": float(n),
            "sync_speedup": n * mean / expected_max,
            "ratio": expected_max / mean,
        }
        if stderr is not None:
            row["sync_speedup_stderr"] = n * mean * stderr / expected_max**2
            row["ratio_stderr"] = stderr / mean
        rows.append(row)
    return rows


def simulate_speedup(
    n: int,
    *,
    rounds: int = 2_000,
    seed: int = 0,
    batch_size: float = 128,
    variation: float = 0.1,
) -> SimulatedSpeedup:
    """Event simulation of N synchronous and N asynchronous workers on simulated time.

    Synchronous: ``rounds`` rounds; each round every worker draws a batch time and the
    round ends when the slowest finishes. Asynchronous: an event queue of N workers, each
    starting its next batch the moment the previous one finishes, run for the same
    simulated time as the synchronous run; batches finishing by then are counted.
    Speedups are batches per unit time times ``B`` (one worker completes 1/B per unit
    time), and ``ratio = async_batches / sync_batches``: how many more batches the
    asynchronous workers finish in the time SSGD needs.
    """
    n = _check_positive_int("workers", n)
    rounds = _check_positive_int("rounds", rounds)
    shape, scale = gamma_parameters(batch_size, variation)
    rng = np.random.default_rng(seed)

    sync_time = float(rng.gamma(shape, scale, size=(rounds, n)).max(axis=1).sum())
    sync_batches = rounds * n

    # Per-worker batch times drawn in blocks (refilled on demand) keep the queue loop cheap.
    block = int(sync_time / batch_size) + 16
    streams = [np.empty(0) for _ in range(n)]
    used = [0] * n

    def next_duration(worker: int) -> float:
        if used[worker] == len(streams[worker]):
            streams[worker] = rng.gamma(shape, scale, size=block)
            used[worker] = 0
        used[worker] += 1
        return float(streams[worker][used[worker] - 1])

    queue = [(next_duration(worker), worker) for worker in range(n)]
    heapq.heapify(queue)
    async_batches = 0
    while queue[0][0] <= sync_time:
        finish, worker = heapq.heappop(queue)
        async_batches += 1
        heapq.heappush(queue, (finish + next_duration(worker), worker))

    return SimulatedSpeedup(
        workers=n,
        rounds=rounds,
        sync_time=sync_time,
        sync_batches=sync_batches,
        async_batches=async_batches,
        async_speedup=async_batches * batch_size / sync_time,
        sync_speedup=sync_batches * batch_size / sync_time,
        ratio=async_batches / sync_batches,
    )


def speedup_markdown(
    rows: Sequence[dict[str, float | int]], *, batch_size: float = 128, variation: float = 0.1
) -> str:
    """A markdown table of :func:`speedup_table` rows, with the model in a header line."""
    shape, scale = gamma_parameters(batch_size, variation)
    sampled = any("ratio_stderr" in row for row in rows)
    lines = [
        f"Batch times ~ Gamma(shape {shape:g}, scale {scale:g}): mean {batch_size:g}, "
        f"coefficient of variation {variation:g}. Overheads are not modelled.",
        "",
        "| N | async speedup | sync speedup (SSGD) | async / sync |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        sync = f"{row['sync_speedup']:.3f}"
        ratio = f"{row['ratio']:.4f}"
        if sampled:
            sync += f" ± {row['sync_speedup_stderr']:.3f}"
            ratio += f" ± {row['ratio_stderr']:.4f}"
        lines.append(f"| {row['workers']} | {row['async_speedup']:.0f} | {sync} | {ratio} |")
    if sampled:
        lines += ["", "± values are Monte Carlo standard errors."]
    return "\n".join(lines) + "\n"


def plot_speedup(
    rows: Sequence[dict[str, float | int]],
    path: Path,
    *,
    batch_size: float = 128,
    variation: float = 0.1,
) -> list[Path]:
    """Draw paper Figure 5 from :func:`speedup_table` rows; write ``path`` as PNG and SVG.

    Panel (a): speedup over one worker against N for asynchronous and synchronous
    training with the ideal linear line; panel (b): the async / sync ratio against N.
    Returns the two paths written (the suffix of ``path`` is replaced).
    """
    if not rows:
        raise DanaError("nothing to plot: the speedup table is empty")
    ordered = sorted(rows, key=lambda row: row["workers"])
    workers = [row["workers"] for row in ordered]
    shape, scale = gamma_parameters(batch_size, variation)

    fig, axes = new_figure(11.0, 4.4, ncols=2)
    left, right = axes[0, 0], axes[0, 1]
    left.plot(workers, workers, color="0.75", linewidth=5, label="ideal (linear)", zorder=1)
    left.plot(
        workers,
        [row["async_speedup"] for row in ordered],
        "o--",
        color="tab:red",
        label="asynchronous (DANA, any ASGD)",
        zorder=3,
    )
    left.plot(
        workers,
        [row["sync_speedup"] for row in ordered],
        "s-",
        color="tab:brown",
        label="synchronous (SSGD)",
        zorder=2,
    )
    left.set_xlabel("workers N")
    left.set_ylabel("speedup over one worker (×)")
    left.set_title("(a) theoretical speedup")
    left.legend(loc="upper left")

    ratios = [row["ratio"] for row in ordered]
    right.axhline(1.0, color="0.6", linestyle=":", linewidth=1)
    right.plot(workers, ratios, "o-", color="tab:red", label="async / sync")
    if "ratio_stderr" in ordered[0]:
        errors = [2 * row["ratio_stderr"] for row in ordered]
        right.errorbar(workers, ratios, yerr=errors, fmt="none", ecolor="tab:red", capsize=3)
    for n, ratio in zip(workers, ratios, strict=True):
        right.annotate(
            f"{ratio:.3f}",
            (n, ratio),
            textcoords="offset points",
            # Below-right of a rising, concave curve is empty.
            xytext=(5, -12),
            ha="left",
            fontsize=8,
        )
    right.margins(y=0.12)
    right.set_xlabel("workers N")
    right.set_ylabel("async speedup / sync speedup (×)")
    right.set_title("(b) DANA (any ASGD) speedup over SSGD")
    right.legend(loc="upper left")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0, max(workers) * 1.08 + 0.5)
    fig.suptitle(
        f"Batch times ~ Γ({shape:g}, {scale:g}) (mean {batch_size:g} time units, "
        f"CV {variation:g}); overheads not modelled"
    )
    return save_figure(fig, path)
