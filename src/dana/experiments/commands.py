"""Click commands ``dana speedup`` and ``dana report`` (wired into the ``dana`` group by cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dana.errors import DanaError
from dana.experiments.report import write_report
from dana.experiments.speedup import (
    METHODS,
    plot_speedup,
    speedup_markdown,
    speedup_table,
)

DEFAULT_WORKERS = "1,2,4,8,16,24,32,48,64"


def parse_workers(text: str) -> list[int]:
    """Parse ``"1,2,4"`` into sorted distinct positive worker counts."""
    counts = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise DanaError(
                f"--workers takes a comma-separated list of positive integers, got {text!r} "
                f"(bad item {item!r}); for example --workers 1,2,4,8"
            )
        counts.append(int(item))
    return sorted(set(counts))


@click.command("speedup")
@click.option(
    "--workers",
    default=DEFAULT_WORKERS,
    show_default=True,
    help="Comma-separated worker counts N.",
)
@click.option(
    "--batch-size",
    type=float,
    default=128.0,
    show_default=True,
    help="Mean batch execution time B (simulated time units; the paper uses the batch size).",
)
@click.option(
    "--variation",
    type=float,
    default=0.1,
    show_default=True,
    help="Coefficient of variation V of the batch time: Gamma(1/V², B·V²).",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="exact",
    show_default=True,
    help="exact: numerical integration; monte-carlo: sampling (adds standard errors).",
)
@click.option(
    "--samples",
    type=int,
    default=100_000,
    show_default=True,
    help="Sampled rounds per N (monte-carlo only).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (monte-carlo only).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write speedup.png, speedup.svg and speedup.md into this folder.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print only a JSON list of {workers, async_speedup, sync_speedup, ratio}.",
)
def speedup_command(
    workers: str,
    batch_size: float,
    variation: float,
    method: str,
    samples: int,
    seed: int,
    out_dir: Path | None,
    as_json: bool,
) -> None:
    """Theoretical speedup of asynchronous training (DANA, any ASGD) over SSGD (Figure 5).

    Batch times are i.i.d. Gamma with mean B and coefficient of variation V; N async
    workers run N× faster than one, SSGD waits each round for the slowest of N batches.
    """
    rows = speedup_table(
        parse_workers(workers),
        batch_size=batch_size,
        variation=variation,
        samples=samples,
        seed=seed,
        method=method,  # type: ignore[arg-type]  # click.Choice guarantees a Method
    )
    table = speedup_markdown(rows, batch_size=batch_size, variation=variation)
    written: list[Path] = []
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "speedup.md").write_text(table, encoding="utf-8")
        except OSError as exc:
            raise DanaError(
                f"cannot write to {out_dir}: {exc.strerror}; choose another --out"
            ) from None
        written = [
            *plot_speedup(
                rows, out_dir / "speedup.png", batch_size=batch_size, variation=variation
            ),
            out_dir / "speedup.md",
        ]
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(table, nl=False)
    for path in written:
        click.echo(f"wrote {path}")


@click.command("report")
@click.argument("results", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (default: RESULTS/report).",
)
def report_command(results: Path, out_dir: Path | None) -> None:
    """Figures and markdown tables from every result.json below RESULTS."""
    for path in write_report(results, out_dir, warn=lambda line: click.echo(line, err=True)):
        click.echo(str(path))
