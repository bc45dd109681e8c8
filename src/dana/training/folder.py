"""A run folder: owned by one process at a time, by one kind of run, left clean.

- **Lock**: :func:`claim_folder` takes an exclusive ``fcntl.flock`` on ``OUT/.dana-lock``
  (non-blocking). The kernel releases it when the process dies, however it dies, so a
  stale lock cannot exist; a second process on the same folder gets :class:`FolderBusy`.
  The lock is re-entrant within a process and held until :func:`release_folder` (or the
  process's end).
- **Kind**: a folder holds a simulator run (``dana run``/``dana sweep``) or a Ray run
  (``dana launch``); :func:`read_result` refuses the other kind.
- **Leftovers**: once the lock is held, temporary files of interrupted atomic writes and a
  checkpoint beside a finished result (a kill between the two) are deleted.
- **Read-back**: :func:`read_result` checks a ``result.json``'s structure, so a damaged
  file is a one-line refusal rather than a wrong report or a traceback.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from dana.errors import DanaError
from dana.training.io import ensure_writable

try:  # POSIX; elsewhere runs are not locked (the rest still holds)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK = ".dana-lock"
RESULT = "result.json"
CHECKPOINT = "checkpoint.pt"
#: What :func:`dana.training.io._atomic` names its temporary files: ``.NAME.XXXX.tmp``.
_TEMPORARY = ("result.json", "checkpoint.pt", "model.pt")
#: The command that writes each kind of run, for the messages.
COMMANDS = {"simulator": "dana run", "ray": "dana launch"}

_held: dict[Path, int] = {}  # folder (resolved) -> the locked descriptor


class FolderBusy(DanaError):
    """Another process holds the run folder."""


def check_out(out: str | os.PathLike[str]) -> Path:
    """``out`` as a path; an empty ``--out`` is refused (``Path('')`` is the current folder)."""
    if not str(out).strip():
        raise DanaError("--out is empty: give the folder to write to, e.g. --out runs/x")
    return Path(out)


def claim_folder(out: str | os.PathLike[str]) -> Path:
    """Create ``out``, lock it for this process and clean what interrupted runs left."""
    out = ensure_writable(check_out(out))
    key = out.resolve()
    if key not in _held and fcntl is not None:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FolderBusy(
                f"{out} is in use by another dana process: wait for it to end, or use another --out"
            ) from None
        _held[key] = fd
    _clean(out)
    return out


def release_folder(out: str | os.PathLike[str]) -> None:
    """Release :func:`claim_folder`'s lock (no-op if this process does not hold it)."""
    fd = _held.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _clean(out: Path) -> None:
    for name in _TEMPORARY:
        for path in out.glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)
    for path in out.glob(".write-test*"):  # the probe of older versions
        path.unlink(missing_ok=True)
    checkpoint = out / CHECKPOINT
    if checkpoint.exists() and _finished(out / RESULT):
        # A finished run deletes its checkpoint right after its final result: a kill in
        # between leaves it, and nothing else ever writes one beside a finished result.
        checkpoint.unlink(missing_ok=True)


def _finished(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("finished") is True


def read_result(path: str | os.PathLike[str], runtime: str) -> dict[str, Any]:
    """``result.json`` at ``path``, checked: a dict of the documented schema, of ``runtime``
    (``"simulator"`` or ``"ray"``), whose final error is its last epoch's."""
    path = Path(path)
    delete = f"delete {path} (or its folder) to start that run over"
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise DanaError(f"cannot read {path} ({_why(err)}): {delete}") from None

    def check(ok: bool, what: str) -> None:
        if not ok:
            raise DanaError(f"{path} is damaged ({what}): {delete}")

    check(isinstance(data, dict), "not a JSON object")
    kind = data.get("runtime") or "simulator"
    if kind != runtime and kind in COMMANDS:
        raise DanaError(
            f"{path.parent} holds a result of `{COMMANDS[kind]}`, not of `{COMMANDS[runtime]}`: "
            "use another --out"
        )
    check(kind == runtime, f"unknown runtime {kind!r}")
    check(isinstance(data.get("config"), dict), "no config")
    check(isinstance(data.get("finished"), bool), "no finished flag")
    check(isinstance(data.get("diverged"), bool), "no diverged flag")
    epochs = data.get("epochs")
    check(isinstance(epochs, list) and all(isinstance(e, dict) for e in epochs), "no epochs")
    # The primary metric: the test error of the presets, a task's own otherwise (a diverged
    # task without diverged_metrics records nulls); results from before tasks have no key.
    metric = data.get("metric") or "test_error"
    check(isinstance(metric, str), "a metric that is not a name")
    label = "a test error" if metric == "test_error" else f"its {metric}"
    check(
        all(
            _number(e.get(metric)) or (metric != "test_error" and e.get(metric, 0) is None)
            for e in epochs
        ),
        f"an epoch without {label}",
    )
    check([e.get("epoch") for e in epochs] == list(range(1, len(epochs) + 1)), "epochs")
    final = data.get("final_test_error") if metric == "test_error" else data.get("final_metric")
    if data["finished"]:
        wanted = data["config"].get("epochs")
        check(bool(epochs), "a finished run without epochs")
        check(data["diverged"] or len(epochs) == wanted, f"{len(epochs)} of {wanted} epochs")
        check(
            data["diverged"] or (_number(final) and final == epochs[-1][metric]),
            f"its final {metric.replace('_', ' ')} is not its last epoch's",
        )
        check(metric != "test_error" or _number(final), "no final test error")
    return data


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _why(err: Exception) -> str:
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return f"not JSON: {err}"


def checked_state(
    state: dict[str, Any], path: Path, config: dict[str, Any], runtime: str
) -> dict[str, Any]:
    """A loaded checkpoint ``state`` if it is a ``runtime`` run of ``config``, else a
    one-line refusal."""
    kind = state.get("runtime")
    if kind != runtime and kind in COMMANDS:
        raise DanaError(
            f"{path} is a `{COMMANDS[kind]}` checkpoint, not a `{COMMANDS[runtime]}` one: use "
            f"another --out, or delete {path} to start over"
        )
    if state.get("config") != config:
        raise DanaError(
            f"{path.parent} holds a run with another config: use another --out, or delete "
            f"{path} to start over"
        )
    return state


def restore(load: Any, state: Any, path: Path, expected: Any = None) -> None:
    """``load(state)``, a one-line refusal if ``state`` does not fit: a foreign checkpoint
    (another model or N under a matching config) is caught by comparing its tensors'
    names, shapes and dtypes with those of ``expected`` (a fresh state of this run)."""
    refusal = f"{path} does not hold a state of this run"
    if expected is not None and tensor_layout(state) != tensor_layout(expected):
        raise DanaError(f"{refusal} (its tensors differ): delete it to start over")
    try:
        load(state)
    except DanaError:  # the loader's own refusal says it best
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise DanaError(f"{refusal} ({type(err).__name__}): delete it to start over") from None


def tensor_layout(state: Any, path: str = "") -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{path: (shape, dtype)}`` of every tensor in a nested dict/list ``state``."""
    if isinstance(state, torch.Tensor):
        return {path: (tuple(state.shape), state.dtype)}
    if not isinstance(state, dict | list | tuple):
        return {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    layout: dict[str, tuple[tuple[int, ...], Any]] = {}
    for key, value in items:
        layout.update(tensor_layout(value, f"{path}/{key}"))
    return layout
