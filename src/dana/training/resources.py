"""What a run needs of the machine, checked before anything big is allocated."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
from torch import nn

from dana.errors import DanaError
from dana.rules import make_rule
from dana.training.config import RunConfig


def state_bytes(config: RunConfig, model: nn.Module) -> int:
    """Bytes of the simulator's state for ``config``: each worker's copy of the parameters
    (what it computed at), the rule's master and worker states (measured by building them
    on the ``meta`` device, which allocates nothing) and each worker's BatchNorm buffers."""
    numel = sum(p.numel() for p in model.parameters())
    params = torch.empty(numel, device="meta")
    rule = make_rule(config.algorithm)
    n = config.workers
    per_element = params.element_size()
    total = n * numel * per_element  # the parameters each worker holds
    total += _tensor_bytes(rule.init_master(params, n))
    total += n * _tensor_bytes(rule.init_worker(params))
    if rule.worker_momentum:  # the simulator's running sum of the workers' velocities
        total += numel * per_element
    total += n * sum(b.numel() * b.element_size() for b in model.buffers())
    return total


def _tensor_bytes(state: object) -> int:
    values = [getattr(state, f.name) for f in dataclasses.fields(state)]  # type: ignore[arg-type]
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping (``MemAvailable``), or ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(config: RunConfig | Sequence[RunConfig], model: nn.Module) -> None:
    """A one-line error when the state of ``config`` (twice: a checkpoint serialises a copy)
    does not fit in the memory available; CPU runs only (a GPU's memory is its own).
    Several configs: runs of ``model`` trained together (``batch_runs``), all held at once."""
    configs = [config] if isinstance(config, RunConfig) else list(config)
    on_cpu = [c for c in configs if torch.device(c.device).type == "cpu"]
    if not on_cpu:
        return
    need = 2 * sum(state_bytes(c, model) for c in on_cpu)
    have = available_memory()
    if have is None or need <= have:
        return
    first = on_cpu[0]
    if len(configs) == 1:
        what = f"{first.workers} workers of {first.algorithm} on {first.model}"
        advice = "use fewer workers or a smaller model"
    else:
        what = f"{len(configs)} runs of {first.workers} workers on {first.model} trained together"
        advice = "train fewer runs together (batch_runs, --batch-runs) or use fewer workers"
    raise DanaError(
        f"{what} need about {need / 2**30:.1f} GiB of memory (N copies of the parameters "
        f"and the rule's state per run, and a checkpoint's copy) but {have / 2**30:.1f} GiB "
        f"are available: {advice}"
    )


def max_threads() -> int:
    """The most PyTorch threads accepted: 4 per core (more only thrash, far more crash)."""
    return 4 * (os.cpu_count() or 1)


def check_threads(threads: int | None, flag: str = "--threads") -> None:
    """A one-line error for a thread count outside ``[1, max_threads()]``."""
    if threads is not None and not 1 <= threads <= max_threads():
        raise DanaError(
            f"{flag} must be in [1, {max_threads()}] (4 per core of this machine), got {threads}"
        )


def deterministic_kernels(device: torch.device) -> None:
    """On a GPU, make cuDNN choose deterministic kernels (and not autotune): its fastest
    convolution backward may use atomics, and then a resumed run, or the same run twice,
    would not be bit-identical as dana promises. Process-wide, as cuDNN's flags are."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
